"""Formats the MODEL_REJECTED / MODEL_FAILED emails; the state machine publishes them to
SNS itself (sns:publish task), so this function needs no AWS permissions."""

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit

from avatarflow import notifications
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
    if kind == MODEL_REJECTED:
        result = notifications.rejected(user_id, batch_id, event.get("dataset") or {})
    elif kind == MODEL_FAILED:
        result = notifications.failed(user_id, batch_id, event.get("error"))
    elif kind == MODEL_READY:
        version = validate_id(event.get("version", batch_id), "version")
        result = notifications.ready(user_id, batch_id, version, event.get("metrics"), event.get("dataset"))
    else:
        raise ValueError(f"event must be one of {MODEL_READY}, {MODEL_REJECTED}, {MODEL_FAILED}")
    metrics.add_metric(name=f"Notification{kind.title().replace('_', '')}", unit=MetricUnit.Count, value=1)
    logger.info("notification formatted")
    return result
