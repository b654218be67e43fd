"""on_upload: SQS batch of S3 events -> one StartExecution per (user, batch), idempotent."""

import json

import boto3
import pytest
from moto import mock_aws

from avatarflow.workflow import execution_name

BUCKET = "avatarflow-test-bucket"
DEFINITION = json.dumps({"StartAt": "W", "States": {"W": {"Type": "Wait", "Seconds": 30, "End": True}}})


@pytest.fixture
def env(monkeypatch):
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        topic = boto3.client("sns").create_topic(Name="t")["TopicArn"]
        sm = boto3.client("stepfunctions").create_state_machine(
            name="train", definition=DEFINITION, roleArn="arn:aws:iam::123456789012:role/r"
        )["stateMachineArn"]
        monkeypatch.setenv("BUCKET_NAME", BUCKET)
        monkeypatch.setenv("TOPIC_ARN", topic)
        monkeypatch.setenv("STATE_MACHINE_ARN", sm)
        yield {
            "s3": s3,
            "topic": topic,
            "sm": sm,
            "sfn": boto3.client("stepfunctions"),
            "sns": boto3.client("sns"),
        }


def message(mid, *keys, bucket=BUCKET, body=None):
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


def test_groups_records_by_user_and_batch(env, handler_of, lambda_context):
    handler = handler_of("on_upload")
    event = {
        "Records": [
            message("1", "uploads/ada/b1/a.jpg", "uploads/ada/b1/b.jpg"),
            message("2", "uploads/ada/b1/c.jpg", "uploads/ada/b2/a.jpg"),
            message("3", "uploads/ada/b1/a.jpg"),  # duplicate delivery
        ]
    }
    assert handler(event, lambda_context) == {"batchItemFailures": []}
    assert executions(env) == sorted(
        [(execution_name("ada", "b1"), "b1"), (execution_name("ada", "b2"), "b2")]
    )
    # Redelivery in a later invocation: ExecutionAlreadyExists/idempotent start is success.
    assert handler({"Records": [message("4", "uploads/ada/b1/d.jpg")]}, lambda_context) == {
        "batchItemFailures": []
    }
    assert len(executions(env)) == 2


def test_url_encoded_keys_are_decoded(env, handler_of, lambda_context):
    handler_of("on_upload")(
        {"Records": [message("1", "uploads/ada/my-batch/my+photo%281%29.jpg")]}, lambda_context
    )
    assert executions(env) == [(execution_name("ada", "my-batch"), "my-batch")]


def test_test_events_bad_keys_and_bad_bodies_are_dropped_not_retried(env, handler_of, lambda_context):
    event = {
        "Records": [
            message("1", body=json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"})),
            message(
                "2",
                "uploads/../etc/passwd",
                "uploads/ada/b1/x/y.jpg",
                "uploads/a b/b1/x.jpg",
                "datasets/ada/b1/x",
            ),
            message("3", body="not json"),
            message("4", "uploads/ada/b1/x.jpg", bucket="someone-elses-bucket"),
        ]
    }
    assert handler_of("on_upload")(event, lambda_context) == {"batchItemFailures": []}
    assert executions(env) == []


def test_infrastructure_error_fails_only_that_record(env, handler_of, lambda_context, monkeypatch):
    monkeypatch.setenv("STATE_MACHINE_ARN", env["sm"] + "-missing")
    event = {
        "Records": [
            message("ok", body=json.dumps({"Event": "s3:TestEvent"})),
            message("bad", "uploads/ada/b1/a.jpg"),
        ]
    }
    assert handler_of("on_upload")(event, lambda_context) == {
        "batchItemFailures": [{"itemIdentifier": "bad"}]
    }


def test_execution_names_are_valid_and_distinct():
    long_id = "x" * 64
    names = {execution_name("a-b", "c"), execution_name("a", "b-c"), execution_name(long_id, long_id)}
    assert len(names) == 3
    assert all(len(n) <= 80 and all(ch.isalnum() or ch in "-_" for ch in n) for n in names)
    with pytest.raises(ValueError):
        execution_name("../x", "b1")


def test_request_json_subscribes_email_with_user_filter(env, handler_of, lambda_context):
    env["s3"].put_object(
        Bucket=BUCKET,
        Key="uploads/ada/b1/request.json",
        Body=json.dumps({"email": "ada@example.com", "token": "sks"}),
    )
    env["s3"].put_object(
        Bucket=BUCKET, Key="uploads/bob/b1/request.json", Body=json.dumps({"email": "not-an-email"})
    )
    env["s3"].put_object(Bucket=BUCKET, Key="uploads/cy/b1/request.json", Body=b"{broken")
    event = {
        "Records": [
            message(
                "1",
                "uploads/ada/b1/request.json",
                "uploads/bob/b1/request.json",
                "uploads/cy/b1/request.json",
            )
        ]
    }
    assert handler_of("on_upload")(event, lambda_context) == {"batchItemFailures": []}
    subs = env["sns"].list_subscriptions_by_topic(TopicArn=env["topic"])["Subscriptions"]
    assert [(s["Protocol"], s["Endpoint"]) for s in subs] == [("email", "ada@example.com")]
    attrs = env["sns"].get_subscription_attributes(SubscriptionArn=subs[0]["SubscriptionArn"])["Attributes"]
    assert json.loads(attrs["FilterPolicy"]) == {"user_id": ["ada"]}
    # request.json alone still starts the batch's run (bad request.json does not block it).
    assert len(executions(env)) == 3


def test_sample_event_runs(env, handler_of, lambda_context):
    from pathlib import Path

    sample = json.loads((Path(__file__).resolve().parents[1] / "events" / "on_upload.json").read_text())
    for record in sample["Records"]:  # the sample names the dev bucket
        record["body"] = record["body"].replace("avatarflow-dev-123456789012-us-east-1", BUCKET)
    assert handler_of("on_upload")(sample, lambda_context) == {"batchItemFailures": []}
    assert [b for _, b in executions(env)] == ["batch-2024-06-01"]
