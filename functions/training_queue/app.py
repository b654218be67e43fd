"""training_queue: the training capacity queue's one function (avatarflow.training_queue).

Three callers, one table:
  * the state machine's AcquireSlot task (`lambda:invoke.waitForTaskToken`): {"action":
    "acquire", "user_id", "batch_id", "execution_arn", "training_job", "task_token"}. The
    batch joins the fair waiting list with its token and the queue dispatches; the task
    resumes when a grant is delivered to the token (SendTaskSuccess, here or in a later
    release), so a waiting batch spends no state transitions. The invocation's own answer
    ({"acquired", "position", "estimated_wait_seconds"}) is for logs and tests; the first
    time a batch has to wait, the user gets the MODEL_QUEUED email (place, estimate). The task
    times out after QueueRecheckSeconds and asks again (a new token): the safety net for a
    grant whose delivery failed.
  * its ReleaseSlot tasks: {"action": "release", "execution_arn", "user_id", "batch_id",
    "outcome": "trained" | "failed"} after the training job (any ending) and on every
    failure path; the freed slot goes to the head of the line at once;
  * the EventBridge rule on "Step Functions Execution Status Change" (FAILED, TIMED_OUT,
    ABORTED) of the training state machine: the cleanup path for an execution that ended
    without releasing (stopped by an operator, timed out, a States.Runtime failure).
Release is idempotent, so the workflow's own release and the rule may both run.
"""

import functools
import json
import os
from types import SimpleNamespace

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from botocore.exceptions import ClientError

from avatarflow import batches, erasure, notifications
from avatarflow.ids import validate_id
from avatarflow.training_queue import Delivery, Grant, TrainingQueue
from avatarflow.workflow import MODEL_QUEUED

logger = Logger()
tracer = Tracer()
metrics = Metrics()

STATUS_CHANGE = "Step Functions Execution Status Change"
ENDED_WITHOUT_RELEASE = ("FAILED", "TIMED_OUT", "ABORTED")
# SendTaskSuccess's answers for a token nobody waits on any more.
STALE_TOKEN = ("TaskTimedOut", "TaskDoesNotExist", "InvalidToken")
MAX_TOKEN_LENGTH = 1024  # Step Functions' limit on a task token


@functools.cache
def aws() -> SimpleNamespace:
    return SimpleNamespace(dynamodb=boto3.resource("dynamodb"), sns=boto3.client("sns"),
                           sfn=boto3.client("stepfunctions"))


def _queue() -> TrainingQueue:
    table = aws().dynamodb.Table(os.environ["QUEUE_TABLE"])
    return TrainingQueue(table, int(os.environ["TRAINING_CONCURRENCY"]),
                         60 * float(os.environ["TRAINING_ESTIMATE_MINUTES"]), deliver=deliver)


def _batches():
    return aws().dynamodb.Table(os.environ["BATCHES_TABLE"])


def _execution_arn(value: object) -> str:
    if not (isinstance(value, str) and value.startswith("arn:") and ":execution:" in value
            and len(value) <= 256):
        raise ValueError("execution_arn must be a Step Functions execution ARN")
    return value


def _task_token(value: object) -> str:
    if not (isinstance(value, str) and 0 < len(value) <= MAX_TOKEN_LENGTH):
        raise ValueError("task_token must be the AcquireSlot task's token")
    return value


def deliver(grant: Grant) -> Delivery:
    """Resume the granted execution's AcquireSlot task. A stale token (the task timed out and
    will ask again, or the execution ended) is told apart with DescribeExecution: a running
    execution finds its slot when it asks again; an ended one gives the slot back."""
    waiting = grant.waiting
    try:
        aws().sfn.send_task_success(taskToken=waiting.task_token, output=json.dumps(grant.output))
    except ClientError as err:
        if err.response["Error"]["Code"] not in STALE_TOKEN:
            raise
        try:
            status = aws().sfn.describe_execution(executionArn=waiting.execution_arn)["status"]
        except ClientError as described:
            if described.response["Error"]["Code"] != "ExecutionDoesNotExist":
                raise
            status = "GONE"
        # The code only: the message may quote the token, which resumes the execution.
        logger.info("grant not delivered",
                    extra={"execution_status": status, "error": err.response["Error"]["Code"]})
        if status != "RUNNING":
            return Delivery.ENDED
        return Delivery.RECHECK
    batches.set_stage(_batches(), waiting.user_id, waiting.batch_id, batches.TRAINING,
                      execution_arn=waiting.execution_arn, training_job=waiting.training_job)
    metrics.add_metric(name="SlotsAcquired", unit=MetricUnit.Count, value=1)
    return Delivery.DELIVERED


def _tell_queued(user_id: str, batch_id: str, position: int, wait: int) -> None:
    if erasure.is_erased(aws().dynamodb.Table(os.environ["ERASURES_TABLE"]), user_id):
        return
    text = notifications.queued(user_id, batch_id, position, wait)
    aws().sns.publish(
        TopicArn=os.environ["TOPIC_ARN"], Subject=text["subject"], Message=text["message"],
        MessageAttributes={"user_id": {"DataType": "String", "StringValue": user_id},
                           "event": {"DataType": "String", "StringValue": MODEL_QUEUED}})


def acquire(event: dict) -> dict:
    user_id = validate_id(event.get("user_id"), "user_id")
    batch_id = validate_id(event.get("batch_id"), "batch_id")
    arn = _execution_arn(event.get("execution_arn"))
    token = _task_token(event.get("task_token"))
    place = _queue().acquire(user_id, batch_id, arn, token, str(event.get("training_job") or ""))
    if not place.acquired and place.first_time:  # asking again after a recheck: already "queued"
        batches.set_stage(_batches(), user_id, batch_id, batches.QUEUED, execution_arn=arn)
        metrics.add_metric(name="BatchesQueued", unit=MetricUnit.Count, value=1)
        _tell_queued(user_id, batch_id, place.position, place.estimated_wait_seconds)
    logger.info("acquire", extra={"acquired": place.acquired, "position": place.position})
    return place.as_dict()


def release(arn: str, outcome: str, user_id: str | None = None, batch_id: str | None = None) -> dict:
    result = _queue().release(arn, trained=outcome == "trained")
    if user_id and batch_id:
        stage = batches.REGISTERING if outcome == "trained" else batches.FAILED
        batches.set_stage(_batches(), user_id, batch_id, stage)
    if result["released"]:
        metrics.add_metric(name="SlotsReleased", unit=MetricUnit.Count, value=1)
    logger.info("release", extra={"outcome": outcome, **result})
    return result


def _on_status_change(event: dict) -> dict:
    detail = event.get("detail") or {}
    status = detail.get("status")
    if status not in ENDED_WITHOUT_RELEASE:
        return {"released": False, "dropped_waiting": 0, "granted": 0}
    if detail.get("stateMachineArn") != os.environ["STATE_MACHINE_ARN"]:
        raise ValueError("status change of another state machine")
    arn = _execution_arn(detail.get("executionArn"))
    user_id = batch_id = None
    try:
        given = json.loads(detail.get("input") or "{}")
        user_id, batch_id = validate_id(given.get("user_id"), "user_id"), validate_id(given.get("batch_id"),
                                                                                      "batch_id")
    except (ValueError, AttributeError):
        logger.warning("execution input without ids: only the slot is released")
    result = release(arn, status.lower(), user_id, batch_id)
    if result["released"] or result["dropped_waiting"]:
        metrics.add_metric(name="SlotsCleanedUp", unit=MetricUnit.Count, value=1)
        logger.warning("cleanup released an execution's slot", extra={"status": status, **result})
    return result


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict, context) -> dict:
    if not isinstance(event, dict):
        raise ValueError("event must be an object")
    if event.get("detail-type") == STATUS_CHANGE and event.get("source") == "aws.states":
        return _on_status_change(event)
    action = event.get("action")
    if action == "acquire":
        return acquire(event)
    if action == "release":
        outcome = event.get("outcome")
        if outcome not in ("trained", "failed"):
            raise ValueError("outcome must be trained or failed")
        return release(_execution_arn(event.get("execution_arn")), outcome,
                       validate_id(event.get("user_id"), "user_id"),
                       validate_id(event.get("batch_id"), "batch_id"))
    raise ValueError("action must be acquire or release")
