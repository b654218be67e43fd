"""Where moto is laxer than AWS, avatarflow_local.moto_strict makes it as strict; each rule is
checked here against a state machine of its own (moto's real ASL interpreter)."""

import json
import time

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from avatarflow_local import moto_strict

pytestmark = pytest.mark.e2e  # executes state machines (seconds)

ROLE = "arn:aws:iam::123456789012:role/sfn"


def _token_task(timeout_s: int) -> dict:
    """One task that sends its token to an SQS queue and waits for it (no Lambda involved);
    after it, answered or timed out, the execution lingers 5 s, still RUNNING (like the queue's
    AcquireSlot, which asks again), so a late outcome meets a closed task, not an ended run."""
    return {"StartAt": "Wait", "States": {
        "Wait": {"Type": "Task", "Resource": "arn:aws:states:::sqs:sendMessage.waitForTaskToken",
                 "TimeoutSeconds": timeout_s,
                 "Parameters": {"QueueUrl.$": "$.queue", "MessageBody": {"token.$": "$$.Task.Token"}},
                 "Catch": [{"ErrorEquals": ["States.Timeout"], "Next": "Linger"}], "Next": "Linger"},
        "Linger": {"Type": "Wait", "Seconds": 5, "End": True}}}


def _run(sfn, sqs, queue, timeout_s):
    machine = sfn.create_state_machine(name=f"m{timeout_s}", roleArn=ROLE,
                                       definition=json.dumps(_token_task(timeout_s)))["stateMachineArn"]
    arn = sfn.start_execution(stateMachineArn=machine, input=json.dumps({"queue": queue}))["executionArn"]
    deadline = time.time() + 10
    while time.time() < deadline:
        got = sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=0).get("Messages")
        if got:
            sqs.delete_message(QueueUrl=queue, ReceiptHandle=got[0]["ReceiptHandle"])
            return arn, json.loads(got[0]["Body"])["token"]
        time.sleep(0.05)
    raise TimeoutError("the task never sent its token")


def _status(sfn, arn, want):
    deadline = time.time() + 30
    while (status := sfn.describe_execution(executionArn=arn)["status"]) != want and time.time() < deadline:
        time.sleep(0.05)
    return status


def test_a_closed_task_token_is_refused_as_step_functions_refuses_it():
    """AWS answers an outcome for a task that already has one, or that timed out, with
    TaskTimedOut; moto alone accepts both silently (a grant sent to a dead task would look
    delivered, and the training queue would never give that slot back)."""
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        moto_strict.install()
        sfn = boto3.client("stepfunctions", region_name="us-east-1")
        sqs = boto3.client("sqs", region_name="us-east-1")
        queue = sqs.create_queue(QueueName="tokens")["QueueUrl"]

        arn, token = _run(sfn, sqs, queue, timeout_s=30)
        sfn.send_task_success(taskToken=token, output=json.dumps({"n": 1}))  # the task's one outcome
        with pytest.raises(ClientError) as again:
            sfn.send_task_success(taskToken=token, output=json.dumps({"n": 2}))
        assert again.value.response["Error"]["Code"] == "TaskTimedOut"
        assert _status(sfn, arn, "SUCCEEDED") == "SUCCEEDED"
        assert json.loads(sfn.describe_execution(executionArn=arn)["output"]) == {"n": 1}

        arn, token = _run(sfn, sqs, queue, timeout_s=1)
        deadline = time.time() + 10
        while time.time() < deadline and "WaitStateEntered" not in {
                e["type"] for e in sfn.get_execution_history(executionArn=arn)["events"]}:
            time.sleep(0.05)
        assert sfn.describe_execution(executionArn=arn)["status"] == "RUNNING"  # lingering after the timeout
        with pytest.raises(ClientError) as late:
            sfn.send_task_success(taskToken=token, output="{}")
        assert late.value.response["Error"]["Code"] == "TaskTimedOut"
