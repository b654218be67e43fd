"""Formats the MODEL_REJECTED / MODEL_FAILED emails (avatarflow.notifications: plain words,
the batch named, no keys or raw errors); the state machine publishes them to SNS itself
(sns:publish task), so this function's only AWS call is the erasure check: for a user
erased while the run was in flight it answers {"erased": true} and no text, and the state
machine ends without publishing (no email about a deleted user, to them or the operator)."""

import os

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit

from avatarflow import erasure, notifications
from avatarflow.ids import validate_id
from avatarflow.workflow import MODEL_FAILED, MODEL_READY, MODEL_REJECTED

logger = Logger()
tracer = Tracer()
metrics = Metrics()


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict, context) -> dict:
    kind = event.get("event")
    user_id = validate_id(event.get("user_id"), "user_id")
    batch_id = validate_id(event.get("batch_id"), "batch_id")
    logger.append_keys(user_id=user_id, batch_id=batch_id, notification=kind)
    if kind not in (MODEL_READY, MODEL_REJECTED, MODEL_FAILED):
        raise ValueError(f"event must be one of {MODEL_READY}, {MODEL_REJECTED}, {MODEL_FAILED}")
    if erasure.is_erased(boto3.resource("dynamodb").Table(os.environ["ERASURES_TABLE"]), user_id):
        logger.info("user erased: no notification")
        metrics.add_metric(name="NotificationsForErasedUsers", unit=MetricUnit.Count, value=1)
        return {"subject": None, "message": None, "erased": True}
    if kind == MODEL_REJECTED:
        result = notifications.rejected(user_id, batch_id, event.get("dataset") or {})
    elif kind == MODEL_FAILED:
        # The email never shows the error; the log keeps its class for the operator.
        logger.append_keys(failure_kind=notifications.failure_kind(event.get("error")))
        result = notifications.failed(user_id, batch_id, event.get("error"))
    elif kind == MODEL_READY:
        version = validate_id(event.get("version", batch_id), "version")
        result = notifications.ready(user_id, batch_id, version, event.get("metrics"), event.get("dataset"))
    metrics.add_metric(name=f"Notification{kind.title().replace('_', '')}", unit=MetricUnit.Count, value=1)
    logger.info("notification formatted")
    return {**result, "erased": False}
