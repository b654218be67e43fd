"""The whole system on 127.0.0.1, in one process.

`LocalRuntime.start()`:
  1. moto's ThreadedMotoServer on 127.0.0.1:<port> (S3, SQS, SNS, DynamoDB, Step Functions
     with `execute_state_machine` switched on through moto's /moto-api/config endpoint);
     boto3 in this process (handlers, moto's ASL interpreter) is pointed at it;
  2. every resource from template.yaml (workflow_stack.create_local_stack): bucket with its
     uploads/ -> SQS notification, queues, tables, topics, the real state machine;
  3. the Lambda handlers of functions/ in process (lambda_hook), with the environment the
     template gives them; the createTrainingJob.sync stand-in (training_job);
  4. the SQS event source mapping of on_upload, SNS -> Lambda for on_generation_done, email
     capture to out/mail/ (event_sources);
  5. the async inference endpoint on the resident base model (async_inference);
  6. the local OIDC issuer (local_issuer: per-run RSA key, JWKS, RS256 tokens like Cognito's,
     sign-in with code + PKCE) and the HTTP API adapter whose JWT authorizer trusts it (http_api);
  7. with `Settings.web_dist`, the web app laid out as the CloudFront distribution serves it
     (web_server: the app, config.json, the API under /api/*), its origin registered as the
     issuer's callback and allowed by the bucket's CORS rules, as the deploy-time publisher
     (functions/publish_web) does in the cloud.

The base model is the tiny random model (built once under .cache/, no download) unless a
diffusers folder is given; the GPU is used when torch sees one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import boto3

from avatarflow import webapp
from avatarflow.workflow import execution_name
from avatarflow_local import forkserver, iam, training_job
from avatarflow_local.async_inference import AsyncEndpoint
from avatarflow_local.event_sources import ExecutionStatusEvents, MailCapture, SnsToLambda, SqsEventSource
from avatarflow_local.functions import REPO_ROOT, load_fresh_handler
from avatarflow_local.http_api import HttpApi
from avatarflow_local.lambda_hook import LambdaHook
from avatarflow_local.local_issuer import LocalIssuer
from avatarflow_local.moderation_stand_in import ModerationStandIn
from avatarflow_local.web_server import WebServer, security_headers
from avatarflow_local.workflow_stack import REGION, LocalStackResources, create_local_stack

LOG = logging.getLogger(__name__)
CACHE_DIR = REPO_ROOT / ".cache" / "local"
TINY_MODEL = CACHE_DIR / "tiny-sd"
TINY_BASE_PREFIX = "base-models/tiny-sd/"


def tiny_base_model(path: Path = TINY_MODEL) -> Path:
    """The tiny random SD model, built on first use and cached (a few MB, no download)."""
    from avatarflow.tiny_model import build_tiny_pipeline

    try:
        return build_tiny_pipeline(path)
    except (FileExistsError, OSError):
        if (path / ".avatarflow_tiny_ready").is_file():  # another process built it meanwhile
            return path
        raise


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@dataclass
class Settings:
    out_dir: Path = Path("out")
    base_model: Path | None = None  # None: the tiny random model
    host: str = "127.0.0.1"
    port: int = 0  # moto (S3 and the other AWS APIs); 0 picks a free port
    api_port: int = 0
    issuer_port: int = 0  # the local OIDC issuer (JWKS, discovery document)
    stack_name: str = "avatarflow-local"
    train_steps: int | None = None  # tiny: 40, real: 400
    resolution: int | None = None  # tiny: 64, real: 512
    min_images: int | None = None  # None: the template's default (8)
    settle_seconds: int = 1
    batching_window_s: float = 1.0  # the template's 20 s would only make a demo wait
    max_training_seconds: int = 3600
    # The erasure's pace (avatarflow.erasure.Timing; the template's are 15 min between passes
    # and 20 min at least): locally a pass a second, done once nothing is in flight.
    erasure_sweep_interval_s: int = 1
    erasure_min_age_s: int = 0
    erasure_generation_wait_s: int = 120  # the template's 6 h 15 min is SageMaker's queue TTL
    # The pack after MODEL_READY (template PackStyles/ImagesPerStyle/KeepPerStyle: 10 x 4, keep 2):
    # locally 2 styles x 1 image; no regeneration round (the tiny model's random pixels show no
    # face, so every style would be "below the likeness threshold"). pack_styles 0: no pack.
    pack_styles: int = 2
    pack_images_per_style: int = 1
    pack_keep_per_style: int = 1
    pack_regenerations: int = 0
    progress: bool = False  # tqdm bars (denoising steps) on stderr
    verbose: bool = False  # the functions' JSON logs and metrics on stdout
    users: tuple[str, ...] = ("me",)
    web_dist: Path | None = None  # the built web app (web/dist): served when given
    web_port: int = 0
    web_poll_ms: int = 1000  # how often the app polls a running step (the cloud's: 3 s)
    # A stand-in for Rekognition/Comprehend (moto has neither): with one, the stack runs the
    # moderation layers as deployed (the template's defaults); without, they are off and the
    # results say so (workflow_stack.LOCAL_PARAMETERS).
    moderation: ModerationStandIn | None = None

    @property
    def tiny(self) -> bool:
        return self.base_model is None


@dataclass
class Timer:
    stages: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds


class LocalRuntime:
    def __init__(self, settings: Settings | None = None, on_event: Callable[[str, str], None] | None = None):
        self.settings = settings or Settings()
        self.on_event = on_event or (lambda kind, text: LOG.info("%s: %s", kind, text))
        self.timer = Timer()
        self.issuer: LocalIssuer | None = None
        self.resources: LocalStackResources | None = None
        self.server = None
        self.hook: LambdaHook | None = None
        self.endpoint: AsyncEndpoint | None = None
        self.api: HttpApi | None = None
        self.web: WebServer | None = None
        self.mail: MailCapture | None = None
        self.pollers: list = []
        self.base_model_path: Path | None = None
        self._saved_env: dict[str, str | None] = {}
        self._saved_sfn_config = None
        self._saved_session = None
        self._listener = None
        self._started = False
        self._enforcing = None

    # ------------------------------------------------------------------ properties
    @property
    def endpoint_url(self) -> str:
        host, port = self.server.get_host_and_port()
        return f"http://{host}:{port}"

    @property
    def api_url(self) -> str:
        return self.api.url

    @property
    def web_url(self) -> str:
        return self.web.url

    @property
    def bucket(self) -> str:
        return self.resources.bucket

    @property
    def mail_dir(self) -> Path:
        return Path(self.settings.out_dir) / "mail"

    def token(self, user_id: str) -> str:
        """A Cognito-style access token for this user from the local issuer."""
        return self.issuer.access_token(user_id)

    def admin_token(self) -> str:
        """A client-credentials access token of the backend client (scope avatarflow/admin)."""
        return self.issuer.client_credentials_token()

    # ------------------------------------------------------------------ lifecycle
    def _setenv(self, **values: str | None) -> None:
        for name, value in values.items():
            if name not in self._saved_env:
                self._saved_env[name] = os.environ.get(name)
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def start(self) -> LocalRuntime:
        from moto.core.config import default_user_config
        from moto.server import ThreadedMotoServer

        s = self.settings
        t0 = time.monotonic()
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        # Metrics are off unless --verbose; Powertools then warns on every invocation.
        warnings.filterwarnings("ignore", message="No application metrics to publish")
        self._setenv(
            AWS_ACCESS_KEY_ID="local",
            AWS_SECRET_ACCESS_KEY="local",  # noqa: S106 - moto's fake credentials
            AWS_SESSION_TOKEN=None,
            AWS_PROFILE=None,
            AWS_DEFAULT_REGION=REGION,
            AWS_REGION=REGION,
            POWERTOOLS_TRACE_DISABLED="true",
            POWERTOOLS_METRICS_NAMESPACE="avatarflow-local",
            POWERTOOLS_LOG_LEVEL="INFO" if s.verbose else "WARNING",
            POWERTOOLS_METRICS_DISABLED="false" if s.verbose else "true",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
        )
        self.server = ThreadedMotoServer(ip_address=s.host, port=s.port, verbose=False)
        self.server.start()
        self._started = True
        port = self.server.get_host_and_port()[1]
        self._setenv(AWS_ENDPOINT_URL=self.endpoint_url, MOTO_PORT=str(port))
        self._saved_sfn_config = dict(default_user_config.get("stepfunctions", {}))
        # moto keeps its state in this process across servers: start from an empty account,
        # as a new stack would (a second runtime in one process otherwise finds the first's tables).
        reset = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")  # noqa: S310
        urllib.request.urlopen(reset, timeout=10).read()  # noqa: S310 - our own 127.0.0.1 server
        request = urllib.request.Request(  # noqa: S310 - our own 127.0.0.1 server
            f"{self.endpoint_url}/moto-api/config",
            method="POST",
            data=json.dumps({"stepfunctions": {"execute_state_machine": True}}).encode(),
        )
        urllib.request.urlopen(request, timeout=10).read()  # noqa: S310 - our own 127.0.0.1 server
        self._saved_session = boto3.DEFAULT_SESSION
        boto3.setup_default_session(region_name=REGION)
        self.timer.add("start AWS emulation (moto)", time.monotonic() - t0)

        t = time.monotonic()
        gpu = cuda_available()
        if s.tiny:
            self.base_model_path = tiny_base_model()
        else:
            self.base_model_path = Path(s.base_model).resolve()
            if not (self.base_model_path / "model_index.json").is_file():
                raise FileNotFoundError(
                    f"{self.base_model_path} is not a diffusers folder (no model_index.json)"
                )
        self.timer.add("base model (build or find)", time.monotonic() - t)

        t = time.monotonic()
        resolution = s.resolution or (64 if s.tiny else 512)
        steps = s.train_steps or (40 if s.tiny else 400)
        overrides = {
            "TrainingSteps": str(steps),
            "Resolution": str(resolution),
            "SettleSeconds": str(s.settle_seconds),
            "MixedPrecision": "fp16" if gpu and not s.tiny else "no",
            "MaxRuntimeSeconds": str(s.max_training_seconds),
            "MaxWaitSeconds": str(2 * s.max_training_seconds),
            "PackStyles": str(s.pack_styles),
            "ImagesPerStyle": str(s.pack_images_per_style),
            "KeepPerStyle": str(s.pack_keep_per_style),
        }
        if s.min_images is not None:
            overrides["MinImages"] = str(s.min_images)
        if not s.tiny:
            # SageMaker local mode accepts file:// channels: a multi-GB model is linked, not copied.
            overrides["BaseModelS3Uri"] = self.base_model_path.as_uri() + "/"
        else:
            # The operator's base-model bucket, apart from the data bucket (as deployed: the
            # roles' grants on it must not stand in for grants on the data bucket).
            overrides["BaseModelS3Uri"] = f"s3://{s.stack_name}-base-models/{TINY_BASE_PREFIX}"
        # The local issuer is the template's "OIDC issuer given as parameters" (JwtIssuer,
        # JwtAudience, JwtBackendAudience): the HttpApi's JwtConfiguration resolves to its URL
        # and both client ids (users' and the backend's).
        self.issuer = LocalIssuer(s.host, s.issuer_port).start()
        parameters = {"JwtIssuer": self.issuer.issuer, "JwtAudience": self.issuer.client_id,
                      "JwtBackendAudience": self.issuer.backend_client_id}
        if s.moderation is not None:
            parameters.update(PromptToxicityCheck="comprehend", OutputModeration="rekognition",
                              UploadModeration="rekognition")
            s.moderation.__enter__()
        forkserver.warm_up()  # training's interpreter imports torch while the stack is built
        self.resources = r = create_local_stack(s.stack_name, parameters, **overrides)
        if s.tiny:  # the template's contract: the base model is an S3 prefix (a few MB here)
            s3 = boto3.client("s3", region_name=REGION)
            base_bucket = f"{s.stack_name}-base-models"
            s3.create_bucket(Bucket=base_bucket)
            for path in sorted(self.base_model_path.rglob("*")):
                if path.is_file():
                    key = TINY_BASE_PREFIX + path.relative_to(self.base_model_path).as_posix()
                    s3.upload_file(str(path), base_bucket, key)

        # Each function runs with its own environment from the template; two local changes:
        # the log level stays the runtime's (WARNING unless --verbose), not the Globals' INFO,
        # and with the tiny model the API accepts its 64 px size.
        local = {"POWERTOOLS_LOG_LEVEL": "INFO" if s.verbose else "WARNING"}
        if s.tiny:
            local.update(MIN_IMAGE_SIZE=str(resolution), DEFAULT_IMAGE_SIZE=str(resolution))
        paced = {"ERASURE_SWEEP_INTERVAL_SECONDS": str(s.erasure_sweep_interval_s),
                        "ERASURE_MIN_AGE_SECONDS": str(s.erasure_min_age_s),
                        "ERASURE_GENERATION_WAIT_SECONDS": str(s.erasure_generation_wait_s),
                        "PACK_REGENERATIONS": str(s.pack_regenerations)}
        specs = {name: replace(spec, environment={
                     **spec.environment, **local,
                     **{k: v for k, v in paced.items() if k in spec.environment}})
                 for name, spec in r.function_specs.items()}
        self.hook = LambdaHook(specs, loader=load_fresh_handler).install()
        # From here on every AWS call of a function, the state machine, a training job or
        # the endpoint is checked against its role from template.yaml.
        self._enforcing = iam.enforcing(r.enforcer)
        self._enforcing.__enter__()
        self._listener = self._on_training_output
        training_job.LISTENERS.append(self._listener)
        self.timer.add("create resources from template.yaml", time.monotonic() - t)

        t = time.monotonic()
        self.endpoint = AsyncEndpoint(
            r.endpoint_name,
            r.bucket,
            r.inference_success_topic,
            r.inference_error_topic,
            self.base_model_path,
            Path(s.out_dir) / ".adapter-cache",
            progress=s.progress,
            role_arn=r.inference_role_arn,
            erasures_table=r.inference_environment.get("ERASURES_TABLE"),
            environment=r.inference_environment,
            on_done=lambda job, status, body: self.on_event(
                "endpoint",
                f"generation {job.inference_id}: HTTP {status} ({len(body.get('images', []))} images)"
                if status < 300
                else f"generation {job.inference_id}: HTTP {status} {body.get('error')}",
            ),
        ).install()
        self.endpoint.load()
        self.endpoint.start()
        self.timer.add("load base model on the endpoint", time.monotonic() - t)

        t = time.monotonic()
        for source in r.event_sources:
            if source.kind == "SQS":
                on_batch = self._on_upload_batch if source.function == "on_upload" else self._on_sqs_batch
                poller = SqsEventSource(source, self.hook.invoke, window_s=s.batching_window_s,
                                        on_batch=on_batch)
                self.pollers.append(poller.start())
            elif source.kind == "SNS":
                name = f"{s.stack_name}-{source.function}-{source.source_arn.rsplit(':', 1)[1]}"[:80]
                self.pollers.append(SnsToLambda(source, self.hook.invoke, name).start())
        if any(source.kind == "EventBridge" for source in r.event_sources):
            self.pollers.append(ExecutionStatusEvents(r.event_sources, self.hook.invoke).start())
        self.mail = MailCapture(
            r.topic_arn,
            self.mail_dir,
            s.stack_name,
            on_mail=lambda path, info: self.on_event(
                "mail", f"{info.get('event', 'notification')} to {info['to']}: {path}"
            ),
        )
        self.pollers.append(self.mail.start())
        self.api = HttpApi(
            [rt for rt in r.http_routes],
            self.hook.invoke,
            r.authorizers,
            cors=r.cors,
            throttle=r.throttle,
            host=s.host,
            port=s.api_port,
        ).start()
        self.timer.add("start pollers and HTTP API", time.monotonic() - t)
        if s.web_dist is not None:
            self._start_web()
        return self

    def _start_web(self) -> None:
        s, issuer = self.settings, self.issuer
        config = webapp.app_config(api_base="/api", client_id=issuer.client_id,
                                   authorize_url=issuer.authorize_url, token_url=issuer.token_url,
                                   logout_url=None, poll_ms=s.web_poll_ms)
        headers = security_headers(self.endpoint_url, issuer.base_url)
        self.web = WebServer(Path(s.web_dist), config, self.api_url, headers, s.host, s.web_port).start()
        issuer.allow_callback(self.web.url + "/")
        self.client("s3").put_bucket_cors(Bucket=self.bucket,
                                          CORSConfiguration=webapp.upload_cors_rules(self.web.url))

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self.web is not None:
            self.web.stop()
        if self.api is not None:
            self.api.stop()
        if self.issuer is not None:
            self.issuer.stop()
        for poller in self.pollers:
            poller.stop()
        if self.endpoint is not None:
            self.endpoint.stop()
        if self._listener in training_job.LISTENERS:
            training_job.LISTENERS.remove(self._listener)
        if self.hook is not None:
            self.hook.uninstall()
        if self._enforcing is not None:
            self._enforcing.__exit__(None, None, None)
            self._enforcing = None
        if self.settings.moderation is not None:
            self.settings.moderation.__exit__(None, None, None)
        from moto.core.config import default_user_config

        if self._saved_sfn_config is not None:
            default_user_config["stepfunctions"] = self._saved_sfn_config
        self.server.stop()
        boto3.DEFAULT_SESSION = self._saved_session
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env = {}

    def __enter__(self) -> LocalRuntime:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ events
    def _on_upload_batch(self, event: dict, payload) -> None:
        failures = len((payload or {}).get("batchItemFailures") or []) if isinstance(payload, dict) else "?"
        self.on_event("on_upload", f"{len(event['Records'])} S3 event message(s), {failures} failed")

    def _on_sqs_batch(self, event: dict, payload) -> None:
        failures = len((payload or {}).get("batchItemFailures") or []) if isinstance(payload, dict) else "?"
        self.on_event("sqs", f"{len(event['Records'])} message(s) handled, {failures} failed")

    def _on_training_output(self, job: str, line: str) -> None:
        if line.startswith("step="):
            self.on_event("train", f"{job} {line}")

    # ------------------------------------------------------------------ helpers
    def client(self, service: str):
        return boto3.client(service, region_name=REGION, endpoint_url=self.endpoint_url)

    def execution_arn(self, user_id: str, batch_id: str) -> str | None:
        name = execution_name(user_id, batch_id)
        sfn = self.client("stepfunctions")
        for page in sfn.get_paginator("list_executions").paginate(
            stateMachineArn=self.resources.state_machine_arn
        ):
            for item in page["executions"]:
                if item["name"] == name:
                    return item["executionArn"]
        return None

    def wait_for_execution(
        self, user_id: str, batch_id: str, timeout: float = 600, stop: threading.Event | None = None
    ) -> dict:
        """The finished execution of this batch (DescribeExecution), waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        sfn = self.client("stepfunctions")
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            arn = self.execution_arn(user_id, batch_id)
            if arn:
                desc = sfn.describe_execution(executionArn=arn)
                if desc["status"] != "RUNNING":
                    return desc
            time.sleep(0.25)
        raise TimeoutError(f"execution for {user_id}/{batch_id} not finished after {timeout} s")

    def history(self, execution_arn: str) -> list[dict]:
        sfn = self.client("stepfunctions")
        events, token = [], None
        while True:
            page = sfn.get_execution_history(
                executionArn=execution_arn, maxResults=1000, **({"nextToken": token} if token else {})
            )
            events += page["events"]
            token = page.get("nextToken")
            if not token:
                return events
