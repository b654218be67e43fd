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
