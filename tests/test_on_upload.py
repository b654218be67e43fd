"""on_upload: SQS batch of S3 events -> one StartExecution per (user, batch), idempotent; run as
Lambda runs it against template.yaml's resources, as its own role."""

import json

import boto3
import pytest
from unit_stack import UnitStack, local_stack

from avatarflow.workflow import execution_name


@pytest.fixture
def env():
    # A fresh stack per test: executions cannot be deleted, and their names repeat across tests.
    with local_stack() as resources:
        stack = UnitStack(resources, {})
        yield {
            "stack": stack,
            "call": lambda event: stack.call("on_upload", event),
            "bucket": resources.bucket,
            "s3": boto3.client("s3"),
            "topic": resources.topic_arn,
            "sm": resources.state_machine_arn,
            "sfn": boto3.client("stepfunctions"),
            "sns": boto3.client("sns"),
        }


def message(env, mid, *keys, bucket=None, body=None):
    """The SQS message S3 sends for these keys (to the stack's bucket unless told)."""
    bucket = bucket or env["bucket"]
    if body is None:
        body = json.dumps(
            {
                "Records": [
                    {
                        "eventName": "ObjectCreated:Put",
                        "s3": {"bucket": {"name": bucket}, "object": {"key": k}},
                    }
                    for k in keys
                ]
            }
        )
    return {
        "messageId": mid,
        "receiptHandle": "r",
        "body": body,
        "attributes": {},
        "messageAttributes": {},
        "md5OfBody": "",
        "eventSource": "aws:sqs",
        "awsRegion": "us-east-1",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q",
    }


def executions(env):
    return sorted(
        (
            e["name"],
            json.loads(env["sfn"].describe_execution(executionArn=e["executionArn"])["input"])["batch_id"],
        )
        for e in env["sfn"].list_executions(stateMachineArn=env["sm"])["executions"]
    )


def test_groups_records_by_user_and_batch(env):
    handler = env["call"]
    event = {
        "Records": [
            message(env, "1", "uploads/ada/b1/a.jpg", "uploads/ada/b1/b.jpg"),
            message(env, "2", "uploads/ada/b1/c.jpg", "uploads/ada/b2/a.jpg"),
            message(env, "3", "uploads/ada/b1/a.jpg"),  # duplicate delivery
        ]
    }
    assert handler(event) == {"batchItemFailures": []}
    assert executions(env) == sorted(
        [(execution_name("ada", "b1"), "b1"), (execution_name("ada", "b2"), "b2")]
    )
    # Redelivery in a later invocation: ExecutionAlreadyExists/idempotent start is success.
    assert handler({"Records": [message(env, "4", "uploads/ada/b1/d.jpg")]}) == {
        "batchItemFailures": []
    }
    assert len(executions(env)) == 2


def test_url_encoded_keys_are_decoded(env):
    env["call"]({"Records": [message(env, "1", "uploads/ada/my-batch/my+photo%281%29.jpg")]})
    assert executions(env) == [(execution_name("ada", "my-batch"), "my-batch")]


def test_test_events_bad_keys_and_bad_bodies_are_dropped_not_retried(env):
    event = {
        "Records": [
            message(env, "1", body=json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"})),
            message(
                env,
                "2",
                "uploads/../etc/passwd",
                "uploads/ada/b1/x/y.jpg",
                "uploads/a b/b1/x.jpg",
                "datasets/ada/b1/x",
            ),
            message(env, "3", body="not json"),
            message(env, "4", "uploads/ada/b1/x.jpg", bucket="someone-elses-bucket"),
        ]
    }
    assert env["call"](event) == {"batchItemFailures": []}
    assert executions(env) == []


def test_infrastructure_error_fails_only_that_record(env):
    env["sfn"].delete_state_machine(stateMachineArn=env["sm"])  # StartExecution: StateMachineDoesNotExist
    event = {
        "Records": [
            message(env, "ok", body=json.dumps({"Event": "s3:TestEvent"})),
            message(env, "bad", "uploads/ada/b1/a.jpg"),
        ]
    }
    assert env["call"](event) == {"batchItemFailures": [{"itemIdentifier": "bad"}]}


def test_execution_names_are_valid_and_distinct():
    long_id = "x" * 64
    names = {execution_name("a-b", "c"), execution_name("a", "b-c"), execution_name(long_id, long_id)}
    assert len(names) == 3
    assert all(len(n) <= 80 and all(ch.isalnum() or ch in "-_" for ch in n) for n in names)
    with pytest.raises(ValueError):
        execution_name("../x", "b1")


def test_request_json_subscribes_email_with_user_filter(env):
    env["s3"].put_object(
        Bucket=env["bucket"],
        Key="uploads/ada/b1/request.json",
        Body=json.dumps({"email": "ada@example.com", "token": "sks"}),
    )
    env["s3"].put_object(
        Bucket=env["bucket"], Key="uploads/bob/b1/request.json", Body=json.dumps({"email": "not-an-email"})
    )
    env["s3"].put_object(Bucket=env["bucket"], Key="uploads/cy/b1/request.json", Body=b"{broken")
    event = {
        "Records": [
            message(
                env,
                "1",
                "uploads/ada/b1/request.json",
                "uploads/bob/b1/request.json",
                "uploads/cy/b1/request.json",
            )
        ]
    }
    assert env["call"](event) == {"batchItemFailures": []}
    subs = env["sns"].list_subscriptions_by_topic(TopicArn=env["topic"])["Subscriptions"]
    assert [(s["Protocol"], s["Endpoint"]) for s in subs] == [("email", "ada@example.com")]
    attrs = env["sns"].get_subscription_attributes(SubscriptionArn=subs[0]["SubscriptionArn"])["Attributes"]
    assert json.loads(attrs["FilterPolicy"]) == {"user_id": ["ada"]}
    assert env["stack"].enforcer.allowed[("avatarflow-local-OnUploadFunctionRole", "sns:Subscribe")] == 1
    # request.json alone still starts the batch's run (bad request.json does not block it).
    assert len(executions(env)) == 3


def test_request_json_gone_before_it_is_read_still_starts_the_run(env):
    """S3 answers a GetObject of a missing key with 403, not 404, to a role that may not list
    the bucket (on_upload's may not): that is "gone", not an error to retry forever."""
    assert env["call"]({"Records": [message(env, "1", "uploads/ada/b1/request.json")]}) == {
        "batchItemFailures": []
    }
    assert [key for _, key in env["stack"].enforcer.masked] == ["uploads/ada/b1/request.json"]
    assert env["sns"].list_subscriptions_by_topic(TopicArn=env["topic"])["Subscriptions"] == []
    assert executions(env) == [(execution_name("ada", "b1"), "b1")]


def test_sample_event_runs(env):
    from pathlib import Path

    sample = json.loads((Path(__file__).resolve().parents[1] / "events" / "on_upload.json").read_text())
    for record in sample["Records"]:  # the sample names the dev bucket
        record["body"] = record["body"].replace("avatarflow-dev-123456789012-us-east-1", env["bucket"])
    assert env["call"](sample) == {"batchItemFailures": []}
    assert [b for _, b in executions(env)] == ["batch-2024-06-01"]
