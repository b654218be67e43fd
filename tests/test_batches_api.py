"""GET /users/{u}/batches/{batch_id} and GET /users/{u}/batches: the batch's stage as the
workflow's own writers leave it (on_upload, training_queue, the registry row), each run as
Lambda runs it with its role; the API behind the same caller check as every route."""

import json

import boto3
import unit_stack
from apitools import body_of, http_event, put_model

from avatarflow import batches
from avatarflow_local.workflow_stack import ACCOUNT, REGION

module_stack, stack = unit_stack.module_stack, unit_stack.stack  # one stack per module, emptied per test
EXECUTION = f"arn:aws:states:{REGION}:{ACCOUNT}:execution:avatarflow-local-train-avatar:"


def _get(stack, path, sub="alice"):
    response = stack.call("api", http_event("GET", path, sub=sub))
    return response["statusCode"], body_of(response)


def _upload(stack, user, batch, name):
    body = {
        "Records": [
            {
                "eventName": "ObjectCreated:Put",
                "s3": {
                    "bucket": {"name": stack.resources.bucket},
                    "object": {"key": f"uploads/{user}/{batch}/{name}"},
                },
            }
        ]
    }
    event = {
        "Records": [
            {
                "messageId": f"m-{name}",
                "receiptHandle": "r",
                "body": json.dumps(body),
                "attributes": {},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q",
                "awsRegion": "us-east-1",
            }
        ]
    }
    assert stack.call("on_upload", event) == {"batchItemFailures": []}


def _acquire(stack, user, batch):
    return stack.call(
        "training_queue",
        {
            "action": "acquire",
            "user_id": user,
            "batch_id": batch,
            "execution_arn": EXECUTION + f"{user}-{batch}",
            "training_job": "avatar-1",
            "task_token": f"token-{user}-{batch}",
        },
    )


def test_a_batch_from_upload_to_ready(stack):
    _upload(stack, "alice", "b1", "one.jpg")
    _upload(stack, "alice", "b1", "two.jpg")
    status, view = _get(stack, "/users/alice/batches/b1")
    assert status == 200 and view["stage"] == "settling" and view["queue"] is None
    assert view["photos"] == [
        {"name": "one.jpg", "verdict": "pending"},
        {"name": "two.jpg", "verdict": "pending"},
    ]

    # The listing settled: the Map's first preprocess_image call (index 0) moves the row to
    # intake inside the call it makes anyway; the other photos' calls, a late photo and a
    # retried first call move nothing (the photo itself need not be readable for that).
    preprocess = {"key": "uploads/alice/b1/one.jpg", "index": 0}
    stack.call("preprocess_image", preprocess)
    stack.call("preprocess_image", {"key": "uploads/alice/b1/two.jpg", "index": 1})
    _upload(stack, "alice", "b1", "late.jpg")
    status, view = _get(stack, "/users/alice/batches/b1")
    assert status == 200 and view["stage"] == "intake" and view["queue"] is None
    assert [p["verdict"] for p in view["photos"]] == ["pending", "pending"]

    # Intake's verdicts (build_dataset writes them; here as the operator), then the queue: two
    # slots (TrainingConcurrency's default) taken by others, alice waits first in line.
    table = boto3.resource("dynamodb").Table(stack.resources.physical["BatchesTable"]["Ref"])
    batches.set_stage(
        table,
        "alice",
        "b1",
        batches.QUEUED,
        photos=batches.photo_verdicts(
            {"kept": ["one.jpg"], "rejections": [{"name": "two.jpg", "reason": "no_face"}]}
        ),
    )
    for user in ("bob", "cy"):
        assert _acquire(stack, user, "b1")["acquired"] is True
    assert _acquire(stack, "alice", "b1")["acquired"] is False
    status, view = _get(stack, "/users/alice/batches/b1")
    assert view["stage"] == "queued" and view["queue"]["position"] == 1
    stack.call("preprocess_image", preprocess)  # a late retry of intake's first call
    assert _get(stack, "/users/alice/batches/b1")[1]["stage"] == "queued"
    assert view["queue"]["estimated_wait_seconds"] > 0 and view["training"] is None
    assert view["photos"] == [
        {"name": "one.jpg", "verdict": "accepted"},
        {"name": "two.jpg", "verdict": "rejected", "reason": "no_face"},
    ]

    stack.call(
        "training_queue",
        {
            "action": "release",
            "outcome": "trained",
            "user_id": "bob",
            "batch_id": "b1",
            "execution_arn": EXECUTION + "bob-b1",
        },
    )
    # The release handed the freed slot to alice, the head of the line (her waiting task resumed).
    status, view = _get(stack, "/users/alice/batches/b1")
    assert view["stage"] == "training" and view["queue"] is None
    assert view["training"] == {"step": None, "total_steps": 800}  # TrainingSteps' default

    put_model(stack.resources, "alice", "b1", "READY", created_at="2030-01-01T00:00:00.000Z")
    status, view = _get(stack, "/users/alice/batches/b1")
    assert view["stage"] == "ready" and view["model_version"] == "b1"

    status, listing = _get(stack, "/users/alice/batches")
    assert status == 200 and [(b["batch_id"], b["stage"]) for b in listing["batches"]] == [("b1", "ready")]


def test_a_failed_run_reads_failed_and_other_users_and_bad_ids_are_refused(stack):
    _upload(stack, "alice", "b2", "one.jpg")
    put_model(stack.resources, "alice", "b2", "FAILED")
    assert _get(stack, "/users/alice/batches/b2")[1]["stage"] == "failed"
    assert _get(stack, "/users/alice/batches/b2", sub="mallory")[0] == 403
    assert _get(stack, "/users/alice/batches/nope")[0] == 404
    assert _get(stack, "/users/alice/batches/" + "x" * 200)[0] == 400
    assert _get(stack, "/users/alice/batches", sub=None)[0] == 401
