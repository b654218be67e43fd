"""What AWS does between the services, played locally with bounded polling threads.

* `SqsEventSource`: the Lambda event source mapping of an SQS queue (BatchSize, batching
  window, ReportBatchItemFailures): receive, invoke the handler with an SQS event, delete
  what succeeded, leave the failed records for redelivery.
* `SnsToLambda`: an SNS -> Lambda subscription. moto cannot invoke Lambda code without
  Docker, so a queue is subscribed to the topic and every envelope becomes the SNS event
  Lambda would receive.
* `ExecutionStatusEvents`: Step Functions' execution status changes -> EventBridge rules of
  the template (their patterns) -> the rule's function (moto emits no such events).
* `MailCapture`: moto accepts email subscriptions but sends nothing. Each email subscription
  of a topic gets a mirror queue subscribed with the same filter policy; what lands there is
  written out as the email that address would get (.eml and .txt under out/mail/).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path

import boto3

from avatarflow_local.workflow_stack import REGION, EventSource

LOG = logging.getLogger(__name__)

Invoke = Callable[[str, dict], tuple[object, str | None]]  # LambdaHook.invoke


class _Poller:
    """A daemon thread running `poll_once` until stopped; every wait is bounded."""

    name = "poller"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0

    def start(self) -> _Poller:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - keep polling; the error is logged
                self.errors += 1
                LOG.exception("%s: poll failed", self.name)
                self._stop.wait(1)

    def poll_once(self) -> None:
        raise NotImplementedError


def _queue_arn(sqs, url: str) -> str:
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


class SqsEventSource(_Poller):
    """SQS -> Lambda event source mapping. The batching window is `window_s` (the template's
    MaximumBatchingWindowInSeconds unless overridden: the local default is shorter so a demo
    does not wait 20 s). Failed records become visible again after `retry_after_s`."""

    def __init__(
        self,
        source: EventSource,
        invoke: Invoke,
        *,
        window_s: float | None = None,
        retry_after_s: int = 5,
        on_batch: Callable[[dict, object], None] | None = None,
    ):
        super().__init__()
        self.source = source
        self.name = f"esm-{source.function}"
        self.invoke = invoke
        self.window_s = source.batching_window_s if window_s is None else window_s
        self.retry_after_s = retry_after_s
        self.on_batch = on_batch
        self.sqs = boto3.client("sqs", region_name=REGION)
        self.batches = 0

    def poll_once(self) -> None:
        messages: list[dict] = []
        first = None
        while len(messages) < self.source.batch_size and not self._stop.is_set():
            remaining = 1.0 if first is None else self.window_s - (time.monotonic() - first)
            if remaining <= 0:
                break
            wait_s = 1 if remaining >= 1 else 0
            got = self.sqs.receive_message(
                QueueUrl=self.source.queue_url,
                MaxNumberOfMessages=min(10, self.source.batch_size - len(messages)),
                WaitTimeSeconds=wait_s,
                AttributeNames=["All"],
                MessageAttributeNames=["All"],
            ).get("Messages", [])
            if not got:
                if first is None:
                    return  # nothing arrived: poll again
                if wait_s == 0:
                    self._stop.wait(min(remaining, 0.2))
                continue
            if first is None:
                first = time.monotonic()
            messages += got
        if messages:
            self._deliver(messages)

    def _record(self, message: dict) -> dict:
        return {
            "messageId": message["MessageId"],
            "receiptHandle": message["ReceiptHandle"],
            "body": message["Body"],
            "attributes": message.get("Attributes", {}),
            "messageAttributes": message.get("MessageAttributes", {}),
            "md5OfBody": message.get("MD5OfBody", ""),
            "eventSource": "aws:sqs",
            "eventSourceARN": self.source.source_arn,
            "awsRegion": REGION,
        }

    def _deliver(self, messages: list[dict]) -> None:
        event = {"Records": [self._record(m) for m in messages]}
        payload, error = self.invoke(self.source.function, event)
        self.batches += 1
        failed: set[str] = {m["MessageId"] for m in messages}
        if error is None:
            failed = set()
            if self.source.report_batch_item_failures and isinstance(payload, dict):
                failed = {f.get("itemIdentifier") for f in payload.get("batchItemFailures") or []}
        if self.on_batch is not None:
            self.on_batch(event, payload)
        done = [m for m in messages if m["MessageId"] not in failed]
        for i in range(0, len(done), 10):
            self.sqs.delete_message_batch(
                QueueUrl=self.source.queue_url,
                Entries=[
                    {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]}
                    for n, m in enumerate(done[i : i + 10])
                ],
            )
        for m in messages:
            if m["MessageId"] in failed:
                LOG.warning(
                    "%s: record %s failed; redelivered in %s s", self.name, m["MessageId"], self.retry_after_s
                )
                self.sqs.change_message_visibility(
                    QueueUrl=self.source.queue_url,
                    ReceiptHandle=m["ReceiptHandle"],
                    VisibilityTimeout=self.retry_after_s,
                )


def subscribe_queue(topic_arn: str, queue_name: str, attributes: dict | None = None) -> str:
    """A queue subscribed to the topic (SNS envelope, not raw), same filter attributes."""
    sqs = boto3.client("sqs", region_name=REGION)
    url = sqs.create_queue(QueueName=queue_name)["QueueUrl"]
    boto3.client("sns", region_name=REGION).subscribe(
        TopicArn=topic_arn, Protocol="sqs", Endpoint=_queue_arn(sqs, url), Attributes=attributes or {}
    )
    return url


class SnsToLambda(_Poller):
    """SNS topic -> Lambda handler (SNS event with one record per notification). Like Lambda's
    asynchronous invocation, a failing notification is tried up to 3 times."""

    def __init__(self, source: EventSource, invoke: Invoke, queue_name: str, *, retry_after_s: int = 2):
        super().__init__()
        self.source = source
        self.name = f"sns-{source.function}-{source.source_arn.rsplit(':', 1)[1]}"
        self.invoke = invoke
        self.retry_after_s = retry_after_s
        self.sqs = boto3.client("sqs", region_name=REGION)
        self.queue_url = subscribe_queue(source.source_arn, queue_name)
        self.delivered = 0

    def poll_once(self) -> None:
        got = self.sqs.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=1,
            AttributeNames=["ApproximateReceiveCount"],
        ).get("Messages", [])
        for message in got:
            envelope = json.loads(message["Body"])
            event = {
                "Records": [
                    {
                        "EventSource": "aws:sns",
                        "EventVersion": "1.0",
                        "EventSubscriptionArn": f"{self.source.source_arn}:local",
                        "Sns": {
                            "Type": envelope.get("Type", "Notification"),
                            "MessageId": envelope.get("MessageId"),
                            "TopicArn": envelope.get("TopicArn"),
                            "Subject": envelope.get("Subject"),
                            "Message": envelope.get("Message"),
                            "Timestamp": envelope.get("Timestamp"),
                            "SignatureVersion": envelope.get("SignatureVersion", "1"),
                            "Signature": envelope.get("Signature", ""),
                            "SigningCertUrl": envelope.get("SigningCertURL", ""),
                            "UnsubscribeUrl": envelope.get("UnsubscribeURL", ""),
                            "MessageAttributes": envelope.get("MessageAttributes", {}),
                        },
                    }
                ]
            }
            _, error = self.invoke(self.source.function, event)
            tries = int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
            if error is None or tries >= 3:
                if error is not None:
                    LOG.error(
                        "%s: notification %s failed 3 times: dropped", self.name, envelope.get("MessageId")
                    )
                self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])
                self.delivered += error is None
            else:
                self.sqs.change_message_visibility(
                    QueueUrl=self.queue_url,
                    ReceiptHandle=message["ReceiptHandle"],
                    VisibilityTimeout=self.retry_after_s,
                )


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80]


class MailCapture(_Poller):
    """Writes the emails SNS would send to the topic's email subscriptions under `folder`."""

    name = "mail-capture"

    def __init__(
        self,
        topic_arn: str,
        folder: Path,
        queue_prefix: str,
        on_mail: Callable[[Path, dict], None] | None = None,
    ):
        super().__init__()
        self.topic_arn = topic_arn
        self.folder = Path(folder)
        self.queue_prefix = queue_prefix
        self.on_mail = on_mail
        self.sns = boto3.client("sns", region_name=REGION)
        self.sqs = boto3.client("sqs", region_name=REGION)
        self.mirrors: dict[str, tuple[str, str]] = {}  # subscription ARN -> (address, queue URL)
        self.written: list[Path] = []
        self._seq = 0

    def sync_subscriptions(self) -> None:
        pages = self.sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=self.topic_arn)
        for sub in (s for page in pages for s in page["Subscriptions"]):
            if sub["Protocol"] != "email" or sub["SubscriptionArn"] in self.mirrors:
                continue
            attrs = self.sns.get_subscription_attributes(SubscriptionArn=sub["SubscriptionArn"])["Attributes"]
            keep = {k: attrs[k] for k in ("FilterPolicy", "FilterPolicyScope") if attrs.get(k)}
            url = subscribe_queue(self.topic_arn, f"{self.queue_prefix}-mail-{len(self.mirrors) + 1}", keep)
            self.mirrors[sub["SubscriptionArn"]] = (sub["Endpoint"], url)
            LOG.info("capturing mail for %s", sub["Endpoint"])

    def poll_once(self) -> None:
        self.sync_subscriptions()
        idle = True
        for address, url in list(self.mirrors.values()):
            got = self.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
            for message in got:
                idle = False
                self._write(address, json.loads(message["Body"]))
                self.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        if idle:
            self._stop.wait(0.3)

    def _write(self, address: str, envelope: dict) -> None:
        attributes = {k: v.get("Value") for k, v in (envelope.get("MessageAttributes") or {}).items()}
        subject = envelope.get("Subject") or "AWS Notification Message"
        mail = EmailMessage()
        mail["From"] = "AWS Notifications <no-reply@sns.amazonaws.com>"
        mail["To"] = address
        mail["Subject"] = subject
        mail["Date"] = formatdate(localtime=False)
        mail["Message-ID"] = f"<{envelope.get('MessageId', 'local')}@sns.local>"
        for name, value in attributes.items():
            mail[f"X-Avatarflow-{_safe(name)}"] = str(value)
        mail.set_content(str(envelope.get("Message", "")))
        self.folder.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        stem = f"{self._seq:03d}-{_safe(attributes.get('event') or 'notification')}-{_safe(address)}"
        eml = self.folder / f"{stem}.eml"
        eml.write_bytes(bytes(mail))
        text = f"To: {address}\nSubject: {subject}\n\n{envelope.get('Message', '')}\n"
        (self.folder / f"{stem}.txt").write_text(text, encoding="utf-8")
        self.written.append(eml)
        if self.on_mail is not None:
            self.on_mail(eml, {"to": address, "subject": subject, **attributes})


# --------------------------------------------------------------------------- EventBridge
STATUS_CHANGE = "Step Functions Execution Status Change"


def matches(pattern: object, event: object) -> bool:
    """EventBridge's event-pattern match for the forms the template uses: a field's list is
    a set of allowed exact values (strings, numbers, booleans, null), a nested object
    matches a nested object; every field named must be present. Any other form (prefix,
    anything-but, numeric, exists...) is refused rather than guessed."""
    if isinstance(pattern, dict):
        if not isinstance(event, dict):
            return False
        return all(key in event and matches(value, event[key]) for key, value in pattern.items())
    if isinstance(pattern, list):
        if any(isinstance(v, dict | list) for v in pattern):
            raise ValueError(f"event pattern form not modelled locally: {pattern}")
        values = event if isinstance(event, list) else [event]
        return any(v in pattern for v in values)
    raise ValueError(f"an event pattern's leaves are lists of values, not {pattern!r}")


def execution_status_event(execution: dict, description: dict) -> dict:
    """The event Step Functions sends to EventBridge's default bus when a standard workflow
    execution changes status (Developer Guide, "Automating Step Functions event delivery
    with EventBridge": detail-type "Step Functions Execution Status Change")."""
    arn = execution["executionArn"]
    region, account = arn.split(":")[3], arn.split(":")[4]

    def millis(value) -> int | None:
        return int(value.timestamp() * 1000) if value else None

    stop = description.get("stopDate")
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": STATUS_CHANGE,
        "source": "aws.states",
        "account": account,
        "time": (stop or description["startDate"]).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": region,
        "resources": [arn],
        "detail": {
            "executionArn": arn,
            "stateMachineArn": description["stateMachineArn"],
            "name": description["name"],
            "status": description["status"],
            "startDate": millis(description["startDate"]),
            "stopDate": millis(stop),
            "input": description.get("input"),
            "output": description.get("output"),
            "inputDetails": {"included": True},
            "outputDetails": {"included": True} if description.get("output") is not None else None,
            "error": description.get("error"),
            "cause": description.get("cause"),
        },
    }


class ExecutionStatusEvents(_Poller):
    """Step Functions -> EventBridge -> Lambda, for the template's EventBridge rules on
    "Step Functions Execution Status Change" (moto emits no events). Every execution of
    every state machine is watched; each status it is seen in (RUNNING, then its end) is
    one event, matched against each rule's pattern from template.yaml, and a matching
    rule's function is invoked asynchronously as EventBridge does, retried on failure
    (`attempts`, as the rule's RetryPolicy / Lambda's async retries would)."""

    name = "eventbridge-sfn"

    def __init__(self, sources: list[EventSource], invoke: Invoke, *, interval_s: float = 0.3,
                 attempts: int = 3):
        super().__init__()
        self.rules = [s for s in sources if s.kind == "EventBridge"]
        self.invoke = invoke
        self.interval_s = interval_s
        self.attempts = attempts
        self.sfn = boto3.client("stepfunctions", region_name=REGION)
        self._seen: dict[str, str] = {}
        self.delivered: list[tuple[str, dict]] = []  # (function, event) for each delivery

    def poll_once(self) -> None:
        for machine in self.sfn.list_state_machines()["stateMachines"]:
            pages = self.sfn.get_paginator("list_executions").paginate(
                stateMachineArn=machine["stateMachineArn"])
            for execution in (e for page in pages for e in page["executions"]):
                arn, status = execution["executionArn"], execution["status"]
                if self._seen.get(arn) == status:
                    continue
                self._seen[arn] = status
                self._emit(execution_status_event(execution, self.sfn.describe_execution(executionArn=arn)))
        self._stop.wait(self.interval_s)

    def _emit(self, event: dict) -> None:
        for rule in self.rules:
            if not matches(rule.pattern, event):
                continue
            for attempt in range(self.attempts):
                _, error = self.invoke(rule.function, event)
                if error is None:
                    self.delivered.append((rule.function, event))
                    break
                LOG.warning("%s: %s failed on %s (attempt %d)", self.name, rule.function,
                            event["detail"]["status"], attempt + 1)
