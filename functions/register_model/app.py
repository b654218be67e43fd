"""Publish a trained adapter under models/<user_id>/<version>/ and mark the registry row READY.

Input (from the state machine): {user_id, batch_id, version, model_artifacts (s3://.../model.tar.gz),
training_job, execution_arn, dataset}. The copy comes first and the conditional write last, so
a row is READY only when its files exist. Running it again for the same training job is a
no-op; a READY version is never overwritten by another job.

A user erased while the run was in flight (avatarflow.erasure) gets nothing: no models/
objects, no READY row, and {"erased": true} tells the state machine to end without the
MODEL_READY email. The mark is checked first and again after the writes, so a DELETE that
lands meanwhile still stops the email; the erasure's sweep removes what was written."""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from datetime import UTC, datetime
from decimal import Decimal
from urllib.parse import urlparse

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from botocore.exceptions import ClientError

from avatarflow import erasure, keys, notifications, usage
from avatarflow.ids import validate_id
from avatarflow.workflow import READY

logger = Logger()
tracer = Tracer()
metrics = Metrics()

WANTED = (keys.ADAPTER_WEIGHTS, keys.ADAPTER_CONFIG)
MAX_MEMBER_BYTES = 2 * 1024**3  # an SDXL LoRA is ~100s of MB; anything larger is not an adapter


class ModelArtifactError(ValueError):
    """The training output is not where or what it should be."""


class VersionConflictError(RuntimeError):
    """The version is already READY with another training job's adapter."""


def _clients():
    return boto3.client("s3"), boto3.resource("dynamodb").Table(os.environ["MODELS_TABLE"])


def _erased(user_id: str) -> bool:
    return erasure.is_erased(boto3.resource("dynamodb").Table(os.environ["ERASURES_TABLE"]), user_id)


def _meter(user_id: str, training_job: str, event: dict) -> None:
    """Adds the job's billable seconds (DescribeTrainingJob's BillableTimeInSeconds, which the
    state machine passes on from createTrainingJob.sync) to the user's usage, once per job."""
    seconds = event.get("billable_seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0 or not training_job:
        logger.warning("no billable seconds for the training job: usage not metered")
        return
    instance_type = event.get("instance_type") if isinstance(event.get("instance_type"), str) else None
    recorded = usage.record_training(boto3.client("dynamodb"), os.environ["USAGE_TABLE"], user_id,
                                     training_job, seconds, instance_type)
    logger.info("training metered", extra={"billable_seconds": seconds, "counted_before": not recorded})
    if recorded:
        metrics.add_metric(name="TrainingBillableSeconds", unit=MetricUnit.Seconds, value=seconds)


def _erased_result(user_id: str, version: str, prefix: str) -> dict:
    """What the state machine reads from a run whose user was erased: the same keys, nothing to send."""
    logger.info("user erased: model not registered, no notification")
    metrics.add_metric(name="ModelsForErasedUsers", unit=MetricUnit.Count, value=1)
    return {"user_id": user_id, "version": version, "model_prefix": prefix, "adapter_key": None,
            "adapter_config_key": None, "metrics": {}, "notification": None, "erased": True}


def _parse_artifacts(uri: str, bucket: str) -> str:
    parsed = urlparse(uri or "")
    if parsed.scheme != "s3" or parsed.netloc != bucket:
        raise ModelArtifactError("model_artifacts must be an s3:// URI in the avatarflow bucket")
    key = parsed.path.lstrip("/")
    if not key.startswith(keys.TRAINING) or not key.endswith("model.tar.gz") or ".." in key.split("/"):
        raise ModelArtifactError("model_artifacts must be training/<job>/output/model.tar.gz")
    return key


def _extract(s3, bucket: str, key: str, workdir: str) -> dict[str, str]:
    """Download model.tar.gz and pull out the two adapter files (never extracting paths)."""
    archive = os.path.join(workdir, "model.tar.gz")
    s3.download_file(bucket, key, archive)
    found: dict[str, str] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            name = os.path.basename(member.name)
            if name in WANTED and member.isfile() and os.path.normpath(member.name) == name:
                if member.size > MAX_MEMBER_BYTES:
                    raise ModelArtifactError(f"{name} is larger than {MAX_MEMBER_BYTES} bytes")
                target = os.path.join(workdir, name)
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    dst.write(src.read())
                found[name] = target
    missing = [n for n in WANTED if n not in found]
    if missing:
        raise ModelArtifactError(f"model.tar.gz lacks {', '.join(missing)}")
    return found


def _to_dynamo(value):
    return json.loads(json.dumps(value), parse_float=Decimal)


def base_model_of(adapter: dict) -> str:
    """What the adapter was trained on, as adapter.json says it: the operator's model id when
    the job had one, else the base model folder's fingerprint (the trainer writes
    `base_model_id` and `base_model_fingerprint`; older adapters wrote `base_model`).

    >>> base_model_of({"base_model_id": None, "base_model_fingerprint": "sha256:ab"})
    'sha256:ab'
    """
    for field in ("base_model_id", "base_model", "base_model_fingerprint"):
        if adapter.get(field):
            return str(adapter[field])
    return ""


@logger.inject_lambda_context(log_event=False)
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict, context) -> dict:
    user_id = validate_id(event.get("user_id"), "user_id")
    batch_id = validate_id(event.get("batch_id"), "batch_id")
    version = validate_id(event.get("version", batch_id), "version")
    training_job = str(event.get("training_job") or "")
    logger.append_keys(user_id=user_id, batch_id=batch_id, version=version, training_job=training_job,
                       execution=event.get("execution_arn"))
    bucket = os.environ["BUCKET_NAME"]
    artifacts_key = _parse_artifacts(event.get("model_artifacts"), bucket)
    prefix = keys.model_prefix(user_id, version)
    if _erased(user_id):
        return _erased_result(user_id, version, prefix)
    s3, table = _clients()
    adapter_key = prefix + keys.ADAPTER_WEIGHTS
    config_key = prefix + keys.ADAPTER_CONFIG

    existing = table.get_item(Key={"user_id": user_id, "version": version}, ConsistentRead=True).get("Item")
    if existing and existing.get("status") == READY:
        if existing.get("training_job") != training_job:
            raise VersionConflictError(f"version {version} is already READY with another training job")
        logger.info("already registered: no-op")
        adapter = json.loads(s3.get_object(Bucket=bucket, Key=config_key)["Body"].read())
    else:
        with tempfile.TemporaryDirectory() as workdir:
            files = _extract(s3, bucket, artifacts_key, workdir)
            with open(files[keys.ADAPTER_CONFIG], "rb") as fh:
                try:
                    adapter = json.load(fh)
                except ValueError as err:
                    raise ModelArtifactError("adapter.json is not valid JSON") from err
            if not isinstance(adapter, dict):
                raise ModelArtifactError("adapter.json must be a JSON object")
            s3.upload_file(files[keys.ADAPTER_WEIGHTS], bucket, adapter_key)
            s3.upload_file(files[keys.ADAPTER_CONFIG], bucket, config_key,
                           ExtraArgs={"ContentType": "application/json"})
        now = datetime.now(UTC).isoformat()
        try:
            table.update_item(
                Key={"user_id": user_id, "version": version},
                UpdateExpression=(
                    "SET #status = :ready, batch_id = :batch, model_prefix = :prefix,"
                    " adapter_key = :adapter, adapter_config_key = :config, training_job = :job,"
                    " execution_arn = :exec, #metrics = :metrics,"
                    " base_model = :base, #token = :token, created_at = if_not_exists(created_at, :now),"
                    " updated_at = :now REMOVE failure_error, failure_cause"
                ),
                ConditionExpression="attribute_not_exists(#status) OR #status <> :ready",
                ExpressionAttributeNames={"#status": "status", "#token": "token", "#metrics": "metrics"},
                ExpressionAttributeValues={
                    ":ready": READY, ":batch": batch_id, ":prefix": prefix, ":adapter": adapter_key,
                    ":config": config_key, ":job": training_job,
                    ":exec": str(event.get("execution_arn") or ""),
                    ":metrics": _to_dynamo(adapter.get("metrics") or {}),
                    ":base": base_model_of(adapter), ":token": str(adapter.get("token") or ""),
                    ":now": now,
                },
            )
        except ClientError as err:
            if err.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
            # A concurrent retry won the race: fine if it registered this very job.
            key = {"user_id": user_id, "version": version}
            current = table.get_item(Key=key, ConsistentRead=True)["Item"]
            if current.get("training_job") != training_job:
                raise VersionConflictError(f"version {version} is READY with another training job") from err
        metrics.add_metric(name="ModelRegistered", unit=MetricUnit.Count, value=1)
        logger.info("model registered", extra={"adapter_key": adapter_key})

    if _erased(user_id):
        return _erased_result(user_id, version, prefix)
    model_metrics = adapter.get("metrics") or {}
    _meter(user_id, training_job, event)
    return {
        "user_id": user_id,
        "version": version,
        "model_prefix": prefix,
        "adapter_key": adapter_key,
        "adapter_config_key": config_key,
        "metrics": model_metrics,
        "notification": notifications.ready(user_id, batch_id, version, model_metrics, event.get("dataset")),
        "erased": False,
    }
