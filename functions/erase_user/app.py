"""Erases one user in passes: SQS (ErasureQueue) -> one pass per message {"user_id"}.

DELETE /users/{user_id} writes the mark (avatarflow.erasure) and sends the first message with
no delay. Each pass deletes what exists now:

- per generation row (GSI user_id-index): its requests/ object and its async output/failure
  objects, then the row, unless the generation is still in flight (PENDING, neither object
  written yet, younger than ERASURE_GENERATION_WAIT_SECONDS): the row is what tells a later
  pass where SageMaker will write, since SageMaker names those objects itself;
- every object version and delete marker under uploads/, datasets/, models/, generations/
  `<user_id>/`;
- the registry rows and each row's training/<job>/ folder, once none of the user's training
  runs is RUNNING (a run still writes its row, its job's checkpoints and model.tar.gz);
- the user's SNS subscriptions on the notification topic (first and last pass: listing the
  topic costs one call per subscriber).

A pass that finds work in flight sends the next message with DelaySeconds
ERASURE_SWEEP_INTERVAL_SECONDS; a conditional write on the mark's `next_sweep_at` keeps one
chain of passes however many messages arrive (a repeated DELETE, an SQS redelivery). The
erasure is DONE when nothing is in flight and it is at least ERASURE_MIN_AGE_SECONDS old
(upload forms signed before the DELETE have expired and their uploads were swept), or at
ERASURE_MAX_AGE_SECONDS whatever still runs. Every pass is idempotent."""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import cache
from types import SimpleNamespace

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from boto3.dynamodb.conditions import Key
from botocore.exceptions import ClientError

from avatarflow import erasure, keys
from avatarflow import generations as gen
from avatarflow.ids import validate_id

logger = Logger()
tracer = Tracer()
metrics = Metrics()
processor = BatchProcessor(event_type=EventType.SQS)

# A PENDING generation with no output location this long after its creation never reached
# the endpoint (the API writes the location right after InvokeEndpointAsync; its Timeout is 29 s).
NEVER_INVOKED_AFTER_S = 60
SLACK_S = 5


@cache
def aws() -> SimpleNamespace:
    """Clients are made on first use (not at import) so tests can mock AWS around them."""
    ddb = boto3.resource("dynamodb")
    return SimpleNamespace(
        s3=boto3.client("s3"),
        sns=boto3.client("sns"),
        sqs=boto3.client("sqs"),
        sfn=boto3.client("stepfunctions"),
        erasures=ddb.Table(os.environ["ERASURES_TABLE"]),
        models=ddb.Table(os.environ["MODELS_TABLE"]),
        batches=ddb.Table(os.environ["BATCHES_TABLE"]),
        generations=ddb.Table(os.environ["GENERATIONS_TABLE"]),
        packs=ddb.Table(os.environ["PACKS_TABLE"]),
        usage=ddb.Table(os.environ["USAGE_TABLE"]),
    )


def _pages(method, key: str, **kwargs):
    """Every item of a DynamoDB query, page after page."""
    start = None
    while True:
        page = method(**kwargs, **({"ExclusiveStartKey": start} if start else {}))
        yield from page.get(key, [])
        start = page.get("LastEvaluatedKey")
        if not start:
            return


def delete_all_versions(bucket: str, prefix: str, exact_key: str | None = None) -> int:
    """Delete every version and delete marker under prefix (the bucket is versioned, so a
    plain delete would only hide the data). Returns how many were removed."""
    s3 = aws().s3
    removed = 0
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        victims = [
            {"Key": v["Key"], "VersionId": v["VersionId"]}
            for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
            if exact_key is None or v["Key"] == exact_key
        ]
        for i in range(0, len(victims), 1000):
            chunk = victims[i : i + 1000]
            answer = s3.delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
            if answer.get("Errors"):
                raise RuntimeError(f"S3 refused to delete {len(answer['Errors'])} object versions")
            removed += len(chunk)
    return removed


def _owned_async_key(bucket: str, location: object) -> str | None:
    """The key of an async output/failure object in our bucket, else None."""
    try:
        loc_bucket, key = gen.parse_s3_uri(location)
    except ValueError:
        return None
    if loc_bucket != bucket or not key.startswith((keys.ASYNC_OUTPUT, keys.ASYNC_FAILURES)):
        return None
    return key


def _age_s(created_at: object, now: int) -> float:
    """Seconds since a row's created_at (ISO-8601); unreadable counts as very old."""
    try:
        created = datetime.fromisoformat(str(created_at).replace("Z", "+00:00"))
    except ValueError:
        return float("inf")
    return now - created.timestamp()


def running_executions(user_id: str) -> int:
    """The user's training runs still RUNNING. Execution names start with the user id's first
    28 characters (avatarflow.workflow.execution_name), which other ids may share: the
    execution input says whose it is."""
    sfn = aws().sfn
    stem = f"{user_id[:28]}-"
    count = 0
    pages = sfn.get_paginator("list_executions").paginate(
        stateMachineArn=os.environ["STATE_MACHINE_ARN"], statusFilter="RUNNING"
    )
    for execution in (e for page in pages for e in page["executions"]):
        if not execution["name"].startswith(stem):
            continue
        described = sfn.describe_execution(executionArn=execution["executionArn"])
        if described["status"] != "RUNNING":
            continue
        try:
            owner = json.loads(described.get("input") or "{}").get("user_id")
        except ValueError:
            owner = None
        count += owner == user_id
    return count


def sweep_generations(
    user_id: str, bucket: str, now: int, timing: erasure.Timing, *, force: bool
) -> tuple[int, int]:
    """(objects removed, generations still in flight). Rows go last: a row is how a later pass
    finds objects SageMaker has yet to write."""
    table = aws().generations
    removed = in_flight = 0
    listed = _pages(table.query, "Items", IndexName=gen.USER_INDEX,
                    KeyConditionExpression=Key("user_id").eq(user_id))
    for listed_row in listed:
        generation_id = listed_row["generation_id"]
        # The index is eventually consistent: read the row itself for its status and locations.
        row = table.get_item(Key={"generation_id": generation_id}, ConsistentRead=True).get("Item")
        if row is None:
            continue
        request_key = keys.request_key(generation_id)
        removed += delete_all_versions(bucket, request_key, exact_key=request_key)
        answered = 0
        for location in (row.get("output_location"), row.get("failure_location")):
            key = _owned_async_key(bucket, location)
            if key:
                answered += delete_all_versions(bucket, key, exact_key=key)
        removed += answered
        age = _age_s(row.get("created_at"), now)
        waiting = (
            row.get("status") == gen.PENDING
            and not answered
            and age < timing.generation_wait_s
            and (row.get("output_location") or age < NEVER_INVOKED_AFTER_S)
        )
        if waiting and not force:
            in_flight += 1
            continue
        table.delete_item(Key={"generation_id": generation_id})
    return removed, in_flight


def sweep_prefixes(user_id: str, bucket: str) -> int:
    """Every object version under uploads/, datasets/, models/, generations/, packs/ <user_id>/."""
    return sum(delete_all_versions(bucket, keys.user_prefix(p, user_id)) for p in keys.USER_PREFIXES)


def sweep_packs(user_id: str) -> int:
    """The user's pack rows (their objects are under packs/ and generations/, swept with the
    prefixes). Every pass: a pack execution still running may write its row again, and the
    erasure does not end while one runs."""
    return len(_delete_user_rows(aws().packs, user_id, "pack_id"))


def _delete_user_rows(table, user_id: str, sort_key: str, rows: list[dict] | None = None) -> list[dict]:
    """Delete the user's rows of a table keyed (user_id, sort_key); `rows` when the caller
    already queried them. Returns the rows deleted."""
    if rows is None:
        rows = list(_pages(table.query, "Items", KeyConditionExpression=Key("user_id").eq(user_id),
                           ProjectionExpression="#sort", ExpressionAttributeNames={"#sort": sort_key}))
    with table.batch_writer() as batch:
        for row in rows:
            batch.delete_item(Key={"user_id": user_id, sort_key: row[sort_key]})
    return rows


def sweep_registry(user_id: str, bucket: str) -> tuple[int, int]:
    """(objects removed, rows removed): each row's training/<job>/ folder, then the rows."""
    table = aws().models
    rows = list(_pages(table.query, "Items", KeyConditionExpression=Key("user_id").eq(user_id)))
    removed = 0
    for row in rows:
        if row.get("training_job"):
            removed += delete_all_versions(bucket, keys.training_prefix(row["training_job"]))
    _delete_user_rows(table, user_id, "version", rows)
    # The batch status rows (stage, photo file names): written by the same runs, so removed
    # once they are over, like the registry rows.
    _delete_user_rows(aws().batches, user_id, "batch_id")
    return removed, len(rows)


def sweep_usage(user_id: str) -> int:
    """The user's quota and metering rows (avatarflow.usage). Swept with the registry, once no
    training run is in flight (a run still meters its job). The erased id is refused new work
    while its tombstone lasts (a day after the erasure ends), so this resets no quota early."""
    return len(_delete_user_rows(aws().usage, user_id, "period"))


def remove_subscriptions(user_id: str) -> tuple[int, int]:
    """(removed, left pending): subscriptions of the notification topic whose filter policy
    names exactly this user (on_upload subscribes request.json's email that way). A
    subscription still pending confirmation is listed without an ARN and cannot be removed;
    SNS deletes it after 48 hours, and until confirmed it delivers no notification."""
    sns = aws().sns
    removed = pending = 0
    pages = sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=os.environ["TOPIC_ARN"])
    for sub in (s for page in pages for s in page["Subscriptions"]):
        arn = sub["SubscriptionArn"]
        if not arn.startswith("arn:"):
            pending += 1  # "PendingConfirmation": whose it is cannot even be read
            continue
        try:
            attributes = sns.get_subscription_attributes(SubscriptionArn=arn)["Attributes"]
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") == "NotFound":
                continue  # removed meanwhile
            raise
        try:
            policy = json.loads(attributes.get("FilterPolicy") or "{}")
        except ValueError:
            continue
        if isinstance(policy, dict) and policy.get("user_id") == [user_id]:
            sns.unsubscribe(SubscriptionArn=arn)
            removed += 1
    return removed, pending


def _schedule_next(user_id: str, now: int, delay_s: int, slack_s: int, in_flight: dict[str, int]) -> bool:
    """Record this pass and send the next message, unless another chain already has one due
    (its next_sweep_at lies ahead). Returns whether a message was sent. SQS delays a message
    at least DelaySeconds, so the pass a chain scheduled always finds its own next_sweep_at
    due; slack_s (under half the interval, so two chains never both pass) absorbs clock
    differences between Lambda hosts."""
    due = now + delay_s
    try:
        aws().erasures.update_item(
            Key={erasure.KEY: erasure.user_key(user_id)},
            UpdateExpression="SET next_sweep_at = :due, updated_at = :now, in_flight = :flight"
                             " ADD sweeps :one",
            ConditionExpression="#s = :pending"
                                " AND (attribute_not_exists(next_sweep_at) OR next_sweep_at <= :soon)",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={":due": due, ":now": now, ":soon": now + slack_s, ":flight": in_flight,
                                       ":one": 1, ":pending": erasure.PENDING},
        )
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
            raise
        aws().erasures.update_item(
            Key={erasure.KEY: erasure.user_key(user_id)},
            UpdateExpression="SET updated_at = :now, in_flight = :flight ADD sweeps :one",
            ConditionExpression="#s = :pending",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={":now": now, ":flight": in_flight, ":one": 1,
                                       ":pending": erasure.PENDING},
        )
        return False
    aws().sqs.send_message(
        QueueUrl=os.environ["ERASURE_QUEUE_URL"],
        MessageBody=json.dumps({"user_id": user_id}),
        DelaySeconds=delay_s,
    )
    return True


def _finish(user_id: str, now: int, timing: erasure.Timing, timed_out: bool) -> None:
    """DONE: the mark stays as a tombstone for tombstone_s, holding no id of the user."""
    aws().erasures.update_item(
        Key={erasure.KEY: erasure.user_key(user_id)},
        UpdateExpression="SET #s = :done, completed_at = :now, updated_at = :now, timed_out = :timed_out,"
                         " #ttl = :ttl ADD sweeps :one REMOVE next_sweep_at, in_flight",
        ConditionExpression="#s = :pending",
        ExpressionAttributeNames={"#s": "status", "#ttl": "ttl"},
        ExpressionAttributeValues={":done": erasure.DONE, ":now": now, ":timed_out": timed_out,
                                   ":ttl": now + timing.tombstone_s, ":one": 1, ":pending": erasure.PENDING},
    )


@tracer.capture_method
def sweep(user_id: str, now: int | None = None) -> dict:
    """One pass for one user; returns what it did (for logs and tests)."""
    now = erasure.now_s() if now is None else now
    timing = erasure.Timing.from_env(os.environ)
    mark = erasure.get_mark(aws().erasures, user_id, now)
    if mark is None or mark.get("status") != erasure.PENDING:
        logger.info("no erasure pending: nothing to do")
        return {"outcome": "not_pending"}
    bucket = os.environ["BUCKET_NAME"]
    age = now - int(mark["requested_at"])
    timed_out = age >= timing.max_age_s
    executions = running_executions(user_id)
    removed, generations = sweep_generations(user_id, bucket, now, timing, force=timed_out)
    removed += sweep_prefixes(user_id, bucket)
    pack_rows = sweep_packs(user_id)
    rows = 0
    if not executions or timed_out:
        registry_objects, rows = sweep_registry(user_id, bucket)
        removed += registry_objects
        rows += sweep_usage(user_id)
    drained = not executions and not generations
    finished = timed_out or (drained and age >= timing.min_age_s)
    subscriptions = pending_subscriptions = 0
    if int(mark.get("sweeps", 0)) == 0 or finished:
        subscriptions, pending_subscriptions = remove_subscriptions(user_id)
    report = {"removed": removed, "registry_rows": rows, "pack_rows": pack_rows,
              "subscriptions": subscriptions,
              "pending_subscriptions": pending_subscriptions,
              "in_flight": {"generations": generations, "executions": executions}}
    if finished:
        _finish(user_id, now, timing, timed_out and not drained)
        if timed_out and not drained:
            logger.error("erasure timed out with work in flight; deleted what was there", extra=report)
            metrics.add_metric(name="ErasuresTimedOut", unit=MetricUnit.Count, value=1)
        metrics.add_metric(name="ErasuresDone", unit=MetricUnit.Count, value=1)
        logger.info("erasure done", extra=report)
        return {"outcome": "done", **report}
    # Drained but young: the next pass comes when the erasure is old enough to end.
    delay = timing.sweep_interval_s
    if drained:
        delay = max(1, min(delay, timing.min_age_s - age))
    slack = min(SLACK_S, (timing.sweep_interval_s - 1) // 2)
    scheduled = _schedule_next(user_id, now, delay, max(0, slack), report["in_flight"])
    logger.info("erasure pass", extra={**report, "next_pass_scheduled": scheduled})
    return {"outcome": "pending", "scheduled": scheduled, **report}


def record_handler(record: SQSRecord) -> dict:
    try:
        user_id = validate_id(json.loads(record.body).get("user_id"), "user_id")
    except (ValueError, AttributeError):
        # Only the API and this function send here; anything else is dropped, not retried.
        logger.warning("not an erasure message: dropped")
        metrics.add_metric(name="ErasureMessagesIgnored", unit=MetricUnit.Count, value=1)
        return {"outcome": "ignored"}
    logger.append_keys(user_key=erasure.user_key(user_id)[:16])
    return sweep(user_id)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict, context) -> dict:
    return process_partial_response(event=event, record_handler=record_handler, processor=processor,
                                    context=context)
