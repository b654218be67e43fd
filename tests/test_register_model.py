"""register_model: adapter copied from model.tar.gz to models/<user>/<version>/, then a
conditional registry write; retries are no-ops; a READY version is never overwritten."""

import io
import json
import tarfile

import boto3
import pytest
from moto import mock_aws

BUCKET = "avatarflow-test-bucket"
TABLE = "models"


def tarball(weights=b"lora-weights", config=None, extra=None):
    buf = io.BytesIO()
    files = {
        "pytorch_lora_weights.safetensors": weights,
        "adapter.json": json.dumps(
            config or {"token": "sks", "base_model": "tiny", "metrics": {"final_loss": 0.123, "steps": 2}}
        ).encode(),
    }
    files.update(extra or {})
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def env(monkeypatch):
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        boto3.client("dynamodb").create_table(
            TableName=TABLE,
            BillingMode="PAY_PER_REQUEST",
            KeySchema=[
                {"AttributeName": "user_id", "KeyType": "HASH"},
                {"AttributeName": "version", "KeyType": "RANGE"},
            ],
            AttributeDefinitions=[
                {"AttributeName": "user_id", "AttributeType": "S"},
                {"AttributeName": "version", "AttributeType": "S"},
            ],
        )
        monkeypatch.setenv("BUCKET_NAME", BUCKET)
        monkeypatch.setenv("MODELS_TABLE", TABLE)
        yield {"s3": s3, "table": boto3.resource("dynamodb").Table(TABLE)}


def event(job="avatar-1", **kw):
    return {
        "user_id": "ada",
        "batch_id": "b1",
        "version": "b1",
        "training_job": job,
        "model_artifacts": f"s3://{BUCKET}/training/{job}/output/model.tar.gz",
        "execution_arn": "arn:aws:states:us-east-1:123456789012:execution:sm:x",
        "dataset": {
            "accepted": 9,
            "rejections": [{"name": "x.jpg", "reason": "blurry", "message": "too blurry"}],
        },
        **kw,
    }


def put_tar(env, job="avatar-1", **kw):
    env["s3"].put_object(Bucket=BUCKET, Key=f"training/{job}/output/model.tar.gz", Body=tarball(**kw))


def test_publishes_adapter_and_marks_ready(env, handler_of, lambda_context):
    put_tar(env)
    result = handler_of("register_model")(event(), lambda_context)
    body = (
        env["s3"]
        .get_object(Bucket=BUCKET, Key="models/ada/b1/pytorch_lora_weights.safetensors")["Body"]
        .read()
    )
    assert body == b"lora-weights"
    assert (
        json.loads(env["s3"].get_object(Bucket=BUCKET, Key="models/ada/b1/adapter.json")["Body"].read())[
            "token"
        ]
        == "sks"
    )
    row = env["table"].get_item(Key={"user_id": "ada", "version": "b1"})["Item"]
    assert row["status"] == "READY" and row["training_job"] == "avatar-1"
    assert row["adapter_key"] == "models/ada/b1/pytorch_lora_weights.safetensors"
    assert float(row["metrics"]["final_loss"]) == pytest.approx(0.123)
    assert result["model_prefix"] == "models/ada/b1/" and result["metrics"]["steps"] == 2
    note = result["notification"]
    assert note["subject"] == "Your avatar model is ready"
    assert "x.jpg: too blurry" in note["message"] and "POST /users/ada/generations" in note["message"]
    json.dumps(result)  # the state machine needs plain JSON (no Decimal)


def test_retry_of_the_same_step_is_a_no_op(env, handler_of, lambda_context):
    put_tar(env)
    handler = handler_of("register_model")
    first = handler(event(), lambda_context)
    created = env["table"].get_item(Key={"user_id": "ada", "version": "b1"})["Item"]
    env["s3"].delete_object(Bucket=BUCKET, Key="training/avatar-1/output/model.tar.gz")  # not read again
    assert handler(event(), lambda_context) == first
    assert env["table"].get_item(Key={"user_id": "ada", "version": "b1"})["Item"] == created


def test_ready_version_is_never_overwritten_by_another_job(env, handler_of, lambda_context):
    put_tar(env)
    put_tar(env, job="avatar-2", weights=b"other")
    handler = handler_of("register_model")
    handler(event(), lambda_context)
    with pytest.raises(RuntimeError, match="READY with another training job"):
        handler(event(job="avatar-2"), lambda_context)
    body = (
        env["s3"]
        .get_object(Bucket=BUCKET, Key="models/ada/b1/pytorch_lora_weights.safetensors")["Body"]
        .read()
    )
    assert body == b"lora-weights"


def test_training_row_becomes_ready_and_keeps_created_at(env, handler_of, lambda_context):
    env["table"].put_item(Item={"user_id": "ada", "version": "b1", "status": "TRAINING", "created_at": "t0"})
    put_tar(env)
    handler_of("register_model")(event(), lambda_context)
    row = env["table"].get_item(Key={"user_id": "ada", "version": "b1"})["Item"]
    assert row["status"] == "READY" and row["created_at"] == "t0"


@pytest.mark.parametrize(
    "artifacts",
    [
        "s3://other-bucket/training/avatar-1/output/model.tar.gz",
        f"s3://{BUCKET}/models/ada/b1/model.tar.gz",
        "https://example.com/model.tar.gz",
        None,
    ],
)
def test_artifacts_outside_the_training_prefix_are_refused(env, handler_of, lambda_context, artifacts):
    with pytest.raises(ValueError, match="model_artifacts"):
        handler_of("register_model")(event(model_artifacts=artifacts), lambda_context)
    assert "Item" not in env["table"].get_item(Key={"user_id": "ada", "version": "b1"})


def test_archive_without_adapter_or_with_traversal_is_refused(env, handler_of, lambda_context):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("../pytorch_lora_weights.safetensors", "nested/adapter.json"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    env["s3"].put_object(Bucket=BUCKET, Key="training/avatar-1/output/model.tar.gz", Body=buf.getvalue())
    with pytest.raises(ValueError, match="lacks"):
        handler_of("register_model")(event(), lambda_context)
    assert env["s3"].list_objects_v2(Bucket=BUCKET, Prefix="models/").get("KeyCount") == 0
    assert "Item" not in env["table"].get_item(Key={"user_id": "ada", "version": "b1"})


def test_bad_ids_are_refused(env, handler_of, lambda_context):
    with pytest.raises(ValueError, match="user_id"):
        handler_of("register_model")(event(user_id="../ada"), lambda_context)


def test_notify_formats_rejection_and_failure(handler_of, lambda_context):
    notify = handler_of("notify")
    rejected = notify(
        {
            "event": "MODEL_REJECTED",
            "user_id": "ada",
            "batch_id": "b1",
            "dataset": {
                "accepted": 2,
                "min_images": 8,
                "rejections": [{"name": "a.jpg", "reason": "no_face", "message": "no face found"}],
            },
        },
        lambda_context,
    )
    assert "a.jpg: no face found" in rejected["message"] and "at least 8" in rejected["message"]
    failed = notify(
        {
            "event": "MODEL_FAILED",
            "user_id": "ada",
            "batch_id": "b1",
            "error": {
                "Error": "TrainingJobFailed",
                "Cause": json.dumps({"errorMessage": "CUDA out of memory"}),
            },
        },
        lambda_context,
    )
    assert "CUDA out of memory" in failed["message"] and "b1" in failed["message"]
    with pytest.raises(ValueError):
        notify({"event": "SOMETHING", "user_id": "ada", "batch_id": "b1"}, lambda_context)
