"""A local SageMaker asynchronous inference endpoint.

`InvokeEndpointAsync` is answered by a botocore `before-call.sagemaker-runtime.
InvokeEndpointAsync` hook (as the lambda hook answers lambda:Invoke): the request is
queued and the call returns the InferenceId and the output/failure locations SageMaker
would. One worker thread then does what the endpoint does: reads the input object, POSTs it
to the inference container's own Flask app (containers/inference/inference_server.py, over
the in-process test client: same routes, same error codes) backed by one resident base
pipeline, writes the response body to the output (2xx) or failure location, and publishes
the success or error notice (SageMaker's JSON shape) to the endpoint's SNS topics.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import boto3

from avatarflow import erasure, keys
from avatarflow import generations as gen
from avatarflow_local import iam
from avatarflow_local.functions import REPO_ROOT
from avatarflow_local.lambda_hook import _Response
from avatarflow_local.workflow_stack import REGION

LOG = logging.getLogger(__name__)
INFERENCE_DIR = REPO_ROOT / "containers" / "inference"


def _import_container():
    """The inference container's modules (they import each other as top-level modules)."""
    if str(INFERENCE_DIR) not in sys.path:
        sys.path.insert(0, str(INFERENCE_DIR))
    import adapter_cache
    import inference_engine
    import inference_server

    return adapter_cache, inference_engine, inference_server


@dataclass
class Invocation:
    inference_id: str
    input_location: str
    output_location: str
    failure_location: str
    queued_at: float


class AsyncEndpoint:
    def __init__(
        self,
        endpoint_name: str,
        bucket: str,
        success_topic: str,
        error_topic: str,
        base_model: Path,
        cache_dir: Path,
        *,
        progress: bool = False,
        on_done: Callable[[Invocation, int, dict], None] | None = None,
        role_arn: str | None = None,
        erasures_table: str | None = None,
        environment: dict[str, str] | None = None,
    ):
        self.endpoint_name = endpoint_name
        self.bucket = bucket
        self.success_topic = success_topic
        self.error_topic = error_topic
        self.base_model = Path(base_model)
        self.cache_dir = Path(cache_dir)
        self.progress = progress
        self.on_done = on_done
        # The model's execution role: SageMaker reads the input, writes the output and
        # publishes the notices with it (avatarflow_local.iam checks every call).
        self.role_arn = role_arn
        # The container's ERASURES_TABLE: it checks the erasure mark before generating and writing.
        self.erasures_table = erasures_table
        # The model's Environment from the template (OUTPUT_MODERATION and its policy).
        self.environment = dict(environment or {})
        self.jobs: queue.Queue[Invocation] = queue.Queue()
        self.done: list[tuple[Invocation, int]] = []
        self.app = None
        self.engine = None
        self.load_seconds: float | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._session = None
        self.s3 = boto3.client("s3", region_name=REGION)
        self.sns = boto3.client("sns", region_name=REGION)

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        """Load the base pipeline once (the container's startup before /ping is healthy)."""
        adapter_cache, engine_mod, server = _import_container()
        t0 = time.monotonic()
        device, _ = engine_mod.pick_device_dtype()
        pipe = engine_mod.load_base_pipeline(self.base_model, device)
        if self.progress:
            pipe.set_progress_bar_config(
                disable=False, desc="generate (denoising steps)", leave=False, dynamic_ncols=True
            )
        cache = adapter_cache.AdapterCache(self.s3, self.bucket, self.cache_dir)
        erased = None
        if self.erasures_table:
            table = boto3.resource("dynamodb", region_name=REGION).Table(self.erasures_table)
            erased = erasure.checker(table)
        safety = engine_mod.safety_from_env(self.base_model, device)
        # OUTPUT_MODERATION=rekognition needs a Rekognition: locally only a stand-in answers it
        # (avatarflow_local.moderation_stand_in), else the model's own checker or "not_moderated".
        rekognition = boto3.client("rekognition", region_name=REGION)
        moderation = engine_mod.output_moderation_from_env(self.environment, safety, rekognition)
        self.engine = engine_mod.Engine(
            pipe, cache, self.s3, self.bucket, safety=safety, erased=erased, moderation=moderation,
        )
        self.app = server.create_app(self.engine).test_client()
        self.load_seconds = time.monotonic() - t0
        self._ready.set()

    def install(self, session: boto3.Session | None = None) -> AsyncEndpoint:
        if session is None:
            if boto3.DEFAULT_SESSION is None:
                boto3.setup_default_session()
            session = boto3.DEFAULT_SESSION
        session.events.register("before-call.sagemaker-runtime.InvokeEndpointAsync", self._on_invoke)
        self._session = session
        return self

    def start(self) -> AsyncEndpoint:
        self._thread = threading.Thread(target=self._loop, name="async-endpoint", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        if self._session is not None:
            self._session.events.unregister(
                "before-call.sagemaker-runtime.InvokeEndpointAsync", self._on_invoke
            )
            self._session = None
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the API call
    def _on_invoke(self, params: dict, **_kwargs):
        path = unquote(params["url_path"].split("?")[0])
        name = path.split("/endpoints/", 1)[1].split("/", 1)[0]
        headers = {k.lower(): v for k, v in params.get("headers", {}).items()}
        if name != self.endpoint_name:
            raise_error = {
                "Error": {
                    "Code": "ValidationError",
                    "Message": f"Endpoint {name} of account 123456789012 not found.",
                },
                "ResponseMetadata": {"HTTPStatusCode": 400},
            }
            return _Response(400, {}), raise_error
        inference_id = headers.get("x-amzn-sagemaker-inference-id") or str(uuid.uuid4())
        out_id = str(uuid.uuid4())
        job = Invocation(
            inference_id=inference_id,
            input_location=headers["x-amzn-sagemaker-inputlocation"],
            output_location=f"s3://{self.bucket}/{keys.ASYNC_OUTPUT}{out_id}.out",
            failure_location=f"s3://{self.bucket}/{keys.ASYNC_FAILURES}{out_id}-error.out",
            queued_at=time.monotonic(),
        )
        self.jobs.put(job)
        return _Response(202, {}), {
            "InferenceId": inference_id,
            "OutputLocation": job.output_location,
            "FailureLocation": job.failure_location,
            "ResponseMetadata": {"HTTPStatusCode": 202, "RequestId": "local"},
        }

    # ------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        try:
            if not self._ready.is_set():
                self.load()
        except Exception:
            LOG.exception("the base model could not be loaded: every invocation will fail")
        while not self._stop.is_set():
            try:
                job = self.jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                with iam.acting_as(self.role_arn):
                    self._serve(job)
            except Exception:  # noqa: BLE001 - one bad invocation never stops the endpoint
                LOG.exception("async invocation %s could not be served", job.inference_id)

    def _serve(self, job: Invocation) -> None:
        bucket, key = gen.parse_s3_uri(job.input_location)
        if self.app is None:
            status, body = 500, {"error": "internal_error", "message": "the base model failed to load"}
        else:
            data = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            response = self.app.post("/invocations", data=data, content_type="application/json")
            status, body = response.status_code, response.get_json(silent=True) or {}
        encoded = json.dumps(body).encode()
        common = {"endpoint_name": self.endpoint_name, "input_location": job.input_location}
        if 200 <= status < 300:
            out_bucket, out_key = gen.parse_s3_uri(job.output_location)
            self.s3.put_object(Bucket=out_bucket, Key=out_key, Body=encoded, ContentType="application/json")
            notice = gen.async_notice(job.inference_id, output_location=job.output_location, **common)
            topic = self.success_topic
        else:
            fail_bucket, fail_key = gen.parse_s3_uri(job.failure_location)
            self.s3.put_object(Bucket=fail_bucket, Key=fail_key, Body=encoded, ContentType="application/json")
            reason = (
                f"ClientError: Received client error ({status}) from primary with message "
                f'"{encoded.decode()[:500]}".'
            )
            notice = gen.async_notice(
                job.inference_id, failure_location=job.failure_location, failure_reason=reason, **common
            )
            topic = self.error_topic
        self.sns.publish(TopicArn=topic, Message=json.dumps(notice))
        self.done.append((job, status))
        if self.on_done is not None:
            self.on_done(job, status, body)
