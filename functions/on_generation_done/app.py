"""SageMaker async-inference success/error SNS notices -> generation row status.

The success notice points at the async output object (the inference container's
result.json content); the error notice carries failureReason. Notices may come twice
(SNS is at-least-once) or for ids we never issued: both are logged and counted, never an
error. A generation leaves PENDING once; later notices do not change it. A notice for a user
erased meanwhile (avatarflow.erasure) is dropped: the row is left as it is for the erasure's
sweep, which deletes it with the objects it names."""

from __future__ import annotations

import json
import os
from functools import cache
from types import SimpleNamespace

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.data_classes import SNSEvent, event_source
from botocore.exceptions import ClientError

from avatarflow import erasure, keys, usage
from avatarflow import generations as gen
from avatarflow.ids import InvalidIdError, validate_id

logger = Logger(service="on_generation_done")
tracer = Tracer(service="on_generation_done")
metrics = Metrics(service="on_generation_done")

MAX_OUTPUT_BYTES = 1024 * 1024


@cache
def aws() -> SimpleNamespace:
    return SimpleNamespace(s3=boto3.client("s3"), dynamodb=boto3.resource("dynamodb"),
                           sfn=boto3.client("stepfunctions"))


def _erased(user_id: str) -> bool:
    return erasure.is_erased(aws().dynamodb.Table(os.environ["ERASURES_TABLE"]), user_id)


def _table():
    return aws().dynamodb.Table(os.environ["GENERATIONS_TABLE"])


def _read_json(bucket: str, key: str) -> dict | None:
    try:
        obj = aws().s3.get_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "AccessDenied"):
            return None
        raise
    if obj.get("ContentLength", 0) > MAX_OUTPUT_BYTES:
        return None
    try:
        body = json.loads(obj["Body"].read())
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def _result_of(notice: gen.AsyncNotice, row: dict) -> dict | None:
    """The container's result: the async output body, else the result.json it wrote."""
    bucket = os.environ["BUCKET_NAME"]
    if notice.output_location:
        try:
            out_bucket, out_key = gen.parse_s3_uri(notice.output_location)
        except ValueError:
            out_bucket = out_key = None
        if out_bucket == bucket and out_key:
            result = _read_json(bucket, out_key)
            if result is not None:
                return result
    return _read_json(bucket, keys.result_key(row["user_id"], row["generation_id"]))


def _images_of(result: dict, row: dict) -> list[dict] | None:
    """[{key, seed, identity_similarity}] of the delivered images (withheld == false, the output
    moderation's verdict), restricted to this generation's own folder."""
    prefix = keys.generation_prefix(row["user_id"], row["generation_id"])
    images = result.get("images")
    if not isinstance(images, list):
        return None
    clean = []
    for item in images:
        # A withheld image (output moderation) has no key: it was never written, never delivered.
        if not isinstance(item, dict) or item.get("withheld") is not False:
            continue
        if not isinstance(item.get("key"), str):
            continue
        if not item["key"].startswith(prefix):
            logger.warning("output names an image outside the generation folder; ignored")
            continue
        similarity = item.get("identity_similarity")
        seed = item.get("seed")
        clean.append(
            {
                "key": item["key"],
                "seed": seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
                "identity_similarity": similarity if isinstance(similarity, int | float) else None,
            }
        )
    return clean


def _withheld_of(result: dict | None) -> int:
    """How many images the output moderation withheld (result.json's top-level count)."""
    count = (result or {}).get("withheld")
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else 0


def _moderation_of(result: dict) -> str:
    """rekognition | safety_checker | not_moderated; anything else (an older container) reads
    as not moderated, never as checked."""
    value = result.get("output_moderation")
    return value if value in ("rekognition", "safety_checker") else "not_moderated"


def _finish(generation_id: str, values: dict) -> bool:
    """Move a PENDING row to its final state; False when it was already final."""
    names = {f"#{k}": k for k in values}
    try:
        _table().update_item(
            Key={"generation_id": generation_id},
            UpdateExpression="SET " + ", ".join(f"#{k} = :{k}" for k in values),
            ConditionExpression="attribute_exists(generation_id) AND #status = :pending",
            ExpressionAttributeNames=names,
            ExpressionAttributeValues={
                **{f":{k}": v for k, v in gen.to_dynamo(values).items()},
                ":pending": gen.PENDING,
            },
        )
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
            return False
        raise
    return True


def _release_pack(row: dict) -> None:
    """A generation of an avatar pack (row has pack_id): take it off the pack's waiting set;
    the notice that empties the set resumes the state machine's round (its task token). The
    set's condition makes a duplicate notice a no-op, so the token is sent once."""
    pack_id, user_id = row.get("pack_id"), row["user_id"]
    try:
        answer = aws().dynamodb.Table(os.environ["PACKS_TABLE"]).update_item(
            Key={"user_id": user_id, "pack_id": pack_id},
            UpdateExpression="DELETE waiting :g",
            ConditionExpression="contains(waiting, :id)",
            ExpressionAttributeValues={":g": {row["generation_id"]}, ":id": row["generation_id"]},
            ReturnValues="ALL_NEW",
        )
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
            return
        raise
    attributes = answer.get("Attributes", {})
    if attributes.get("waiting") or not attributes.get("task_token"):
        return
    try:
        aws().sfn.send_task_success(taskToken=attributes["task_token"], output=json.dumps({"resumed": True}))
    except ClientError as err:  # the round timed out or the execution ended: nobody waits any more
        code = err.response.get("Error", {}).get("Code")
        if code not in ("TaskTimedOut", "TaskDoesNotExist", "InvalidToken"):
            raise
        logger.info("pack round no longer waiting", extra={"code": err.response["Error"]["Code"]})
    logger.info("pack round complete: workflow resumed", extra={"pack_id": pack_id})


def _meter(row: dict, generation_id: str, values: dict) -> None:
    """Adds the generation's seconds on the GPU (its result.json timings.total_ms, what the
    container measured) and its images to the user's usage, once per generation."""
    total_ms = (values.get("timings") or {}).get("total_ms")
    seconds = total_ms / 1000 if isinstance(total_ms, int | float) and not isinstance(total_ms, bool) else 0.0
    recorded = usage.record_generation(
        boto3.client("dynamodb"), os.environ["USAGE_TABLE"], row["user_id"], generation_id,
        max(seconds, 0.0), len(values.get("images") or []), os.environ.get("INFERENCE_INSTANCE_TYPE"))
    if recorded:
        metrics.add_metric(name="InferenceSeconds", unit=MetricUnit.Seconds, value=seconds)


@tracer.capture_method
def handle_notice(message: dict) -> str:
    """Apply one notice; returns what happened (for logs and tests)."""
    try:
        notice = gen.parse_async_notice(message)
        generation_id = validate_id(notice.inference_id, "generation_id")
    except (ValueError, InvalidIdError):
        logger.warning("not a SageMaker async notice for a generation; ignored")
        metrics.add_metric(name="NoticesIgnored", unit=MetricUnit.Count, value=1)
        return "ignored"
    logger.append_keys(generation_id=generation_id)
    row = _table().get_item(Key={"generation_id": generation_id}).get("Item")
    if row is None:
        logger.warning("notice for an unknown generation; ignored")
        metrics.add_metric(name="NoticesForUnknownGenerations", unit=MetricUnit.Count, value=1)
        return "unknown"
    logger.append_keys(user_id=row.get("user_id"))
    if row.get("status") != gen.PENDING:
        logger.info("generation already final; duplicate notice ignored", extra={"status": row.get("status")})
        metrics.add_metric(name="NoticesDuplicate", unit=MetricUnit.Count, value=1)
        if row.get("pack_id"):  # a retry after a release that failed: releasing again is a no-op otherwise
            _release_pack(row)
        return "duplicate"
    if _erased(row["user_id"]):
        logger.info("user erased: notice dropped")
        if row.get("pack_id"):  # the pack's round ends; its review sees the mark and drops the pack
            _release_pack(row)
        metrics.add_metric(name="NoticesForErasedUsers", unit=MetricUnit.Count, value=1)
        return "erased"

    now = gen.utc_now()
    if notice.completed:
        result = _result_of(notice, row)
        images = _images_of(result, row) if result is not None else None
        withheld = _withheld_of(result)
        if images or (images is not None and withheld):
            values = {"status": gen.COMPLETED, "images": images, "updated_at": now, "withheld": withheld,
                      "output_moderation": _moderation_of(result)}
            if notice.output_location:
                values["output_location"] = notice.output_location
            if isinstance(result.get("timings"), dict):
                values["timings"] = result["timings"]
            outcome = gen.COMPLETED
        else:
            # "Completed" but nothing usable came back: the user must see a failure, not PENDING forever.
            values = {"status": gen.FAILED, "error": "the endpoint returned no images", "updated_at": now}
            outcome = gen.FAILED
    else:
        values = {
            "status": gen.FAILED,
            "error": notice.failure_reason or "inference failed",
            "updated_at": now,
        }
        if notice.failure_location:
            values["failure_location"] = notice.failure_location
        outcome = gen.FAILED

    if not _finish(generation_id, values):
        metrics.add_metric(name="NoticesDuplicate", unit=MetricUnit.Count, value=1)
        return "duplicate"
    if outcome == gen.COMPLETED:
        _meter(row, generation_id, values)
    if row.get("pack_id"):
        _release_pack(row)
    logger.info("generation finished", extra={"status": outcome, "images": len(values.get("images", [])),
                                              "withheld": values.get("withheld", 0)})
    if values.get("withheld"):
        metrics.add_metric(name="ImagesWithheld", unit=MetricUnit.Count, value=values["withheld"])
    metrics.add_metric(
        name="GenerationsCompleted" if outcome == gen.COMPLETED else "GenerationsFailed",
        unit=MetricUnit.Count,
        value=1,
    )
    return outcome


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
@event_source(data_class=SNSEvent)
def handler(event: SNSEvent, context) -> dict:
    outcomes = []
    for record in event.records:
        try:
            message = json.loads(record.sns.message)
        except ValueError:
            message = None
        outcomes.append(handle_notice(message))
    return {"outcomes": outcomes}
