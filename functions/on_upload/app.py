"""SQS batch of S3 ObjectCreated notifications under uploads/ -> one execution per (user, batch).

StartExecution uses a deterministic name and input, so duplicate S3 events, redelivered SQS
messages and photos arriving one by one never start a second run: ExecutionAlreadyExists
means "already running or done" and counts as success. A request.json with an email
subscribes that address to the topic, filtered to this user's messages. Records that can
never succeed (test events, keys outside the layout, bad request.json) are logged and
dropped; only infrastructure errors fail a record, so SQS retries it (partial batch response).
Uploads of a user marked erased (avatarflow.erasure: DELETE /users/{user_id}, until the mark
expires) start nothing and subscribe nothing; the erasure's sweep deletes the objects (upload
forms signed before the DELETE expire before the erasure can end)."""

from __future__ import annotations

import contextlib
import json
import os
import re

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from botocore.exceptions import ClientError

from avatarflow import batches, erasure, keys
from avatarflow.training_queue import now_iso
from avatarflow.workflow import execution_input, execution_name

logger = Logger()
tracer = Tracer()
metrics = Metrics()
processor = BatchProcessor(event_type=EventType.SQS)

EMAIL = re.compile(r"^[^@\s\"'<>]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}$")
MAX_REQUEST_BYTES = 16 * 1024

# Per invocation: the (user, batch) groups already handled, so a batch of records for one
# upload batch costs one StartExecution.
_started: dict[tuple[str, str], str] = {}
_erased: dict[str, bool] = {}  # per invocation: user_id -> marked erased


def _is_erased(user_id: str) -> bool:
    if user_id not in _erased:
        table = boto3.resource("dynamodb").Table(os.environ["ERASURES_TABLE"])
        _erased[user_id] = erasure.is_erased(table, user_id)
    return _erased[user_id]


def _uploads_of(record: SQSRecord) -> list[tuple[str, keys.UploadKey]]:
    """The (bucket, parsed key) pairs of one SQS message; [] for messages to ignore."""
    try:
        body = json.loads(record.body)
    except ValueError:
        logger.warning("message body is not JSON: dropped")
        metrics.add_metric(name="IgnoredMessages", unit=MetricUnit.Count, value=1)
        return []
    if not isinstance(body, dict) or body.get("Event") == "s3:TestEvent":
        logger.info("S3 test event: ignored")
        return []
    uploads = []
    for s3_record in body.get("Records") or []:
        if not str(s3_record.get("eventName", "")).startswith("ObjectCreated:"):
            continue
        bucket = s3_record.get("s3", {}).get("bucket", {}).get("name")
        raw_key = s3_record.get("s3", {}).get("object", {}).get("key", "")
        try:
            uploads.append((bucket, keys.parse_upload_key(raw_key, url_encoded=True)))
        except keys.InvalidKeyError as err:
            # The error text never echoes the key: it may carry anything a user typed.
            logger.warning("key outside the uploads layout: ignored", extra={"reason": str(err)})
            metrics.add_metric(name="IgnoredKeys", unit=MetricUnit.Count, value=1)
    return uploads


def _start(user_id: str, batch_id: str) -> str:
    group = (user_id, batch_id)
    if group in _started:
        return _started[group]
    name = execution_name(user_id, batch_id)
    sfn = boto3.client("stepfunctions")
    try:
        arn = sfn.start_execution(
            stateMachineArn=os.environ["STATE_MACHINE_ARN"], name=name,
            input=json.dumps(execution_input(user_id, batch_id)),
        )["executionArn"]
        logger.info("execution started", extra={"execution": name})
        metrics.add_metric(name="ExecutionsStarted", unit=MetricUnit.Count, value=1)
    except ClientError as err:
        if err.response["Error"]["Code"] != "ExecutionAlreadyExists":
            raise
        arn = name
        logger.info("execution already exists", extra={"execution": name})
    _started[group] = arn
    return arn


def _subscribe_from_request(bucket: str, upload: keys.UploadKey) -> None:
    """request.json {"email": ...} -> email subscription filtered on this user's messages."""
    s3 = boto3.client("s3")
    key = keys.upload_prefix(upload.user_id, upload.batch_id) + keys.REQUEST_FILE
    try:
        obj = s3.get_object(Bucket=bucket, Key=key)
    except ClientError as err:
        # This role may read uploads/*/request.json but not list the bucket, so S3 answers a
        # request.json deleted since its event with 403 AccessDenied, never 404: both mean gone.
        if err.response["Error"]["Code"] in ("NoSuchKey", "404", "AccessDenied"):
            logger.warning("request.json vanished before it was read")
            return
        raise
    if obj["ContentLength"] > MAX_REQUEST_BYTES:
        logger.warning("request.json is too large: ignored")
        return
    try:
        request = json.loads(obj["Body"].read())
    except ValueError:
        logger.warning("request.json is not JSON: ignored")
        return
    email = request.get("email") if isinstance(request, dict) else None
    if email is None:
        return
    if not isinstance(email, str) or len(email) > 254 or not EMAIL.fullmatch(email):
        logger.warning("request.json email is not a valid address: ignored")
        metrics.add_metric(name="InvalidEmails", unit=MetricUnit.Count, value=1)
        return
    boto3.client("sns").subscribe(
        TopicArn=os.environ["TOPIC_ARN"], Protocol="email", Endpoint=email,
        Attributes={"FilterPolicy": json.dumps({"user_id": [upload.user_id]}),
                    "FilterPolicyScope": "MessageAttributes"},
        ReturnSubscriptionArn=True,
    )
    logger.info("email subscribed (confirmation pending)")
    metrics.add_metric(name="EmailSubscriptions", unit=MetricUnit.Count, value=1)


def _record_photo(upload: keys.UploadKey) -> None:
    """The batch's status row (avatarflow.batches): settling, this photo pending until intake
    gives its verdict. Only a batch that has not moved past settling is touched."""
    table = boto3.resource("dynamodb").Table(os.environ["BATCHES_TABLE"])
    now = now_iso()
    with contextlib.suppress(table.meta.client.exceptions.ConditionalCheckFailedException):
        table.update_item(
            Key={"user_id": upload.user_id, "batch_id": upload.batch_id},
            UpdateExpression="SET #stage = :settling, updated_at = :now,"
                             " created_at = if_not_exists(created_at, :now) ADD pending_photos :name",
            ConditionExpression="attribute_not_exists(#stage) OR #stage = :settling",
            ExpressionAttributeNames={"#stage": "stage"},
            ExpressionAttributeValues={":settling": batches.SETTLING, ":now": now, ":name": {upload.name}},
        )


def record_handler(record: SQSRecord) -> None:
    for bucket, upload in _uploads_of(record):
        logger.append_keys(user_id=upload.user_id, batch_id=upload.batch_id)
        if bucket != os.environ["BUCKET_NAME"]:
            logger.warning("event from another bucket: ignored")
            continue
        if _is_erased(upload.user_id):
            logger.info("upload by an erased user: nothing started")
            metrics.add_metric(name="UploadsOfErasedUsers", unit=MetricUnit.Count, value=1)
            continue
        if upload.is_request:
            _subscribe_from_request(bucket, upload)
        else:
            _record_photo(upload)
        _start(upload.user_id, upload.batch_id)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict, context) -> dict:
    _started.clear()
    _erased.clear()
    return process_partial_response(event=event, record_handler=record_handler, processor=processor,
                                    context=context)
