"""A local world for the training queue: the whole stack from template.yaml with stand-in
training jobs (training_job.STAND_IN: no torch, chosen durations), batches of one photo
(MinImages 1), the EventBridge rule delivered (event_sources.ExecutionStatusEvents), and
helpers to start batches and read the queue. Shared by tests/test_training_queue.py and
bench/bench_queue.py, which drive the real state machine through it."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import boto3
from moto import mock_aws

from avatarflow.sample_photos import one_person_batch
from avatarflow.training_queue import TrainingQueue
from avatarflow.workflow import execution_name
from avatarflow_local import iam, training_job
from avatarflow_local.event_sources import ExecutionStatusEvents
from avatarflow_local.lambda_hook import LambdaHook
from avatarflow_local.workflow_stack import LocalStackResources, create_local_stack

TERMINAL = ("SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED")


@dataclass
class QueueWorld:
    stack: LocalStackResources
    hook: LambdaHook
    events: ExecutionStatusEvents
    limit: int
    photo: bytes = field(default_factory=lambda: one_person_batch(1)[0][1])

    @property
    def sfn(self):
        return boto3.client("stepfunctions")

    def queue(self) -> TrainingQueue:
        table = boto3.resource("dynamodb").Table(self.stack.physical["TrainingQueueTable"]["Ref"])
        return TrainingQueue(table, self.limit, 60)  # read only: the function delivers grants

    def batch_row(self, user_id: str, batch_id: str) -> dict | None:
        table = boto3.resource("dynamodb").Table(self.stack.physical["BatchesTable"]["Ref"])
        return table.get_item(Key={"user_id": user_id, "batch_id": batch_id}).get("Item")

    def start(self, user_id: str, batch_id: str) -> str:
        """Upload one photo and start the batch's execution as on_upload does (the same
        name and input), without waiting for the SQS event source."""
        boto3.client("s3").put_object(Bucket=self.stack.bucket, Key=f"uploads/{user_id}/{batch_id}/p.jpg",
                                      Body=self.photo)
        key = f"uploads/{user_id}/{batch_id}/p.jpg"
        body = {"Records": [{"eventName": "ObjectCreated:Put",
                             "s3": {"bucket": {"name": self.stack.bucket}, "object": {"key": key}}}]}
        event = {"Records": [{"messageId": f"{user_id}-{batch_id}", "receiptHandle": "r",
                              "body": json.dumps(body), "attributes": {}, "messageAttributes": {},
                              "md5OfBody": "", "eventSource": "aws:sqs",
                              "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:uploads",
                              "awsRegion": "us-east-1"}]}
        result, error = self.hook.invoke("on_upload", event)
        if error or result != {"batchItemFailures": []}:
            raise RuntimeError(f"on_upload failed: {result}")
        return self.arn(user_id, batch_id)

    def arn(self, user_id: str, batch_id: str) -> str:
        name = execution_name(user_id, batch_id)
        return self.stack.state_machine_arn.replace(":stateMachine:", ":execution:") + ":" + name

    def wait(self, arns: list[str], timeout: float = 120) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        done: dict[str, dict] = {}
        while time.monotonic() < deadline:
            for arn in arns:
                if arn not in done:
                    desc = self.sfn.describe_execution(executionArn=arn)
                    if desc["status"] in TERMINAL:
                        done[arn] = desc
            if len(done) == len(arns):
                return done
            time.sleep(0.2)
        raise TimeoutError(f"{len(arns) - len(done)} executions still running")

    def wait_for(self, predicate, timeout: float = 60, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {what}")


@contextlib.contextmanager
def queue_world(limit: int, stand_in: training_job.StandIn, *, max_runtime_s: int = 600,
                recheck_s: int = 60) -> Iterator[QueueWorld]:
    """The stack (TrainingConcurrency = limit, MinImages 1, QueueRecheckSeconds recheck_s,
    packs off) in a fresh moto account with IAM enforced, stand-in jobs, and the EventBridge
    rule running."""
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        # The bench plans 4 batches per user: the daily batch quota (default 3) would reject the 4th.
        stack = create_local_stack(parameters={"TrainingConcurrency": str(limit),
                                               "QuotaTrainingBatchesPerDay": "1000"}, MinImages="1",
                                   QueueRecheckSeconds=str(recheck_s), MaxRuntimeSeconds=str(max_runtime_s),
                                   MaxWaitSeconds=str(2 * max_runtime_s),
                                   PackStyles="0")  # no avatar pack: no endpoint runs here
        hook = LambdaHook(stack.function_specs).install()
        previous, training_job.STAND_IN = training_job.STAND_IN, stand_in
        training_job.peak_running(reset=True)
        events = ExecutionStatusEvents(stack.event_sources, hook.invoke)
        try:
            with iam.enforcing(stack.enforcer):
                events.start()
                yield QueueWorld(stack, hook, events, limit)
        finally:
            events.stop()
            training_job.STAND_IN = previous
            hook.uninstall()
