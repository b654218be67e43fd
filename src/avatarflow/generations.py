"""Generation records and SageMaker async-inference notices, shared by the API, the
on_generation_done function and the local runtime (which plays the async endpoint).

The generations table (env GENERATIONS_TABLE) has one row per generation, keyed by
generation_id, with a `user_id` GSI (USER_INDEX) for per-user listing and deletion."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlparse

PENDING = "PENDING"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
STATUSES = (PENDING, COMPLETED, FAILED)

USER_INDEX = "user_id-index"

# The body of requests/<generation_id>.json, in the order of design.md.
REQUEST_FIELDS = (
    "generation_id",
    "user_id",
    "model_version",
    "prompt",
    "negative_prompt",
    "num_images",
    "steps",
    "guidance_scale",
    "width",
    "height",
    "seed",
)

# SageMaker async notices: invocationStatus values.
INVOCATION_COMPLETED = "Completed"
INVOCATION_FAILED = "Failed"


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_dynamo(value: Any) -> Any:
    """JSON-like data -> what the DynamoDB resource accepts (floats as Decimal)."""
    return json.loads(json.dumps(value), parse_float=Decimal)


def from_dynamo(value: Any) -> Any:
    """DynamoDB resource data -> plain JSON types (Decimal -> int or float)."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: from_dynamo(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [from_dynamo(v) for v in value]
    return value


def parse_s3_uri(uri: object) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key); ValueError for anything else."""
    if not isinstance(uri, str):
        raise ValueError("S3 location must be a string")
    parsed = urlparse(uri)
    key = parsed.path.lstrip("/")
    if parsed.scheme != "s3" or not parsed.netloc or not key:
        raise ValueError("S3 location must look like s3://bucket/key")
    return parsed.netloc, key


@dataclass(frozen=True)
class AsyncNotice:
    """One SageMaker async-inference SNS notice (success or error topic)."""

    inference_id: str
    completed: bool
    output_location: str | None
    failure_location: str | None
    failure_reason: str | None


def parse_async_notice(message: dict) -> AsyncNotice:
    """Read the notice SageMaker publishes to the success/error topics:
    `{"inferenceId", "invocationStatus": "Completed"|"Failed", "failureReason"?,
      "requestParameters": {...}, "responseParameters": {"outputLocation"|"failureLocation"}}`.
    Raises ValueError when it is not such a notice."""
    if not isinstance(message, dict):
        raise ValueError("notice must be a JSON object")
    inference_id = message.get("inferenceId")
    status = message.get("invocationStatus")
    if not isinstance(inference_id, str) or not inference_id:
        raise ValueError("notice has no inferenceId")
    if status not in (INVOCATION_COMPLETED, INVOCATION_FAILED):
        raise ValueError("notice has no known invocationStatus")
    response = message.get("responseParameters") or {}
    if not isinstance(response, dict):
        response = {}
    reason = message.get("failureReason")
    return AsyncNotice(
        inference_id=inference_id,
        completed=status == INVOCATION_COMPLETED,
        output_location=response.get("outputLocation"),
        failure_location=response.get("failureLocation") or message.get("failureLocation"),
        failure_reason=str(reason)[:1000] if reason is not None else None,
    )


def async_notice(
    inference_id: str,
    *,
    endpoint_name: str,
    input_location: str,
    output_location: str | None = None,
    failure_location: str | None = None,
    failure_reason: str | None = None,
) -> dict:
    """Build a notice in SageMaker's shape (used by the local runtime, tests and events/)."""
    now = utc_now()
    notice = {
        "awsRegion": "us-east-1",
        "eventTime": now,
        "receivedTime": now,
        "invocationStatus": INVOCATION_FAILED if failure_reason else INVOCATION_COMPLETED,
        "requestParameters": {
            "contentType": "application/json",
            "endpointName": endpoint_name,
            "inputLocation": input_location,
        },
        "responseParameters": {"contentType": "application/json"},
        "inferenceId": inference_id,
        "eventVersion": "1.0",
        "eventSource": "aws:sagemaker",
        "eventName": "InferenceResult",
    }
    if failure_reason:
        notice["failureReason"] = failure_reason
        if failure_location:
            notice["responseParameters"]["failureLocation"] = failure_location
    else:
        notice["responseParameters"]["outputLocation"] = output_location
    return notice


class NotQueued(Exception):
    """The endpoint refused InvokeEndpointAsync; the generation row was left FAILED."""


def queue_generation(
    *, s3, runtime, table, bucket: str, endpoint_name: str, document: dict, ttl_days: int,
    extra: dict | None = None,
) -> dict:
    """Write requests/<id>.json, put the PENDING row (before the call: a fast endpoint may notify
    before InvokeEndpointAsync returns), invoke the async endpoint and keep where SageMaker will
    write on the row (so an erasure finds the objects without a notice). `document` holds
    REQUEST_FIELDS; `extra` goes on the row (e.g. pack_id, style). Returns the row's locations;
    raises NotQueued (row FAILED) when the endpoint refuses."""
    from datetime import timedelta

    from botocore.exceptions import BotoCoreError, ClientError

    from avatarflow import keys

    generation_id = document["generation_id"]
    request_key = keys.request_key(generation_id)
    s3.put_object(Bucket=bucket, Key=request_key, Body=json.dumps(document).encode(),
                  ContentType="application/json")
    now = utc_now()
    table.put_item(
        Item=to_dynamo(
            {
                "generation_id": generation_id,
                "user_id": document["user_id"],
                "model_version": document["model_version"],
                "status": PENDING,
                "request_key": request_key,
                "params": {k: document[k] for k in REQUEST_FIELDS[3:]},
                "created_at": now,
                "updated_at": now,
                "ttl": int((datetime.now(UTC) + timedelta(days=ttl_days)).timestamp()),
                **(extra or {}),
            }
        ),
        ConditionExpression="attribute_not_exists(generation_id)",
    )
    try:
        answer = runtime.invoke_endpoint_async(
            EndpointName=endpoint_name,
            InputLocation=f"s3://{bucket}/{request_key}",
            InferenceId=generation_id,
            ContentType="application/json",
        )
    except (ClientError, BotoCoreError) as err:
        table.update_item(
            Key={"generation_id": generation_id},
            UpdateExpression="SET #s = :failed, #e = :e, updated_at = :now",
            ExpressionAttributeNames={"#s": "status", "#e": "error"},
            ExpressionAttributeValues={":failed": FAILED, ":e": "could not queue the request", ":now": now},
        )
        raise NotQueued(generation_id) from err
    locations = {
        k: answer.get(v)
        for k, v in (("output_location", "OutputLocation"), ("failure_location", "FailureLocation"))
        if answer.get(v)
    }
    if locations:
        table.update_item(
            Key={"generation_id": generation_id},
            UpdateExpression="SET " + ", ".join(f"{k} = if_not_exists({k}, :{k})" for k in locations),
            ExpressionAttributeValues={f":{k}": v for k, v in locations.items()},
        )
    return locations
