"""register_model: adapter copied from model.tar.gz to models/<user>/<version>/, then a
conditional registry write; retries are no-ops; a READY version is never overwritten. Run as
Lambda runs it against template.yaml's resources, as its own role (tests/unit_stack.py)."""

import io
import json
import tarfile

import boto3
import pytest
import unit_stack

module_stack, stack = unit_stack.module_stack, unit_stack.stack  # one stack per module, emptied per test


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
def env(stack):
    resources = stack.resources
    return {"s3": boto3.client("s3"), "bucket": resources.bucket, "stack": stack,
           "call": lambda event: stack.call("register_model", event),
           "table": boto3.resource("dynamodb").Table(resources.models_table)}


def event(env, job="avatar-1", **kw):
    return {
        "user_id": "ada",
        "batch_id": "b1",
        "version": "b1",
        "training_job": job,
        "model_artifacts": f"s3://{env['bucket']}/training/{job}/output/model.tar.gz",
        "execution_arn": "arn:aws:states:us-east-1:123456789012:execution:sm:x",
        "dataset": {
            "accepted": 9,
            "rejections": [{"name": "x.jpg", "reason": "blurry", "message": "too blurry"}],
        },
        **kw,
    }


def put_tar(env, job="avatar-1", body=None, **kw):
    """What the training job leaves (written as the operator)."""
    key = f"training/{job}/output/model.tar.gz"
    env["s3"].put_object(Bucket=env["bucket"], Key=key, Body=body if body is not None else tarball(**kw))


def test_publishes_adapter_and_marks_ready(env):
    put_tar(env)
    result = env["call"](event(env))
    body = (
        env["s3"]
        .get_object(Bucket=env["bucket"], Key="models/ada/b1/pytorch_lora_weights.safetensors")["Body"]
        .read()
    )
    assert body == b"lora-weights"
    config = env["s3"].get_object(Bucket=env["bucket"], Key="models/ada/b1/adapter.json")["Body"].read()
    assert json.loads(config)["token"] == "sks"
    row = env["table"].get_item(Key={"user_id": "ada", "version": "b1"})["Item"]
    assert row["status"] == "READY" and row["training_job"] == "avatar-1"
    assert row["adapter_key"] == "models/ada/b1/pytorch_lora_weights.safetensors"
    assert float(row["metrics"]["final_loss"]) == pytest.approx(0.123)
    assert row["base_model"] == "tiny"
    assert result["model_prefix"] == "models/ada/b1/" and result["metrics"]["steps"] == 2
    # Every call was checked against the function's role: two uploads under models/.
    assert env["stack"].enforcer.allowed[("avatarflow-local-RegisterModelFunctionRole", "s3:PutObject")] == 2
    note = result["notification"]
    assert note["subject"] == "Your avatar model is ready: batch b1"
    assert "x.jpg: too blurry" in note["message"] and "POST /users/ada/generations" in note["message"]
    json.dumps(result)  # the state machine needs plain JSON (no Decimal)


def test_retry_of_the_same_step_is_a_no_op(env):
    put_tar(env)
    handler = env["call"]
    first = handler(event(env))
    created = env["table"].get_item(Key={"user_id": "ada", "version": "b1"})["Item"]
    # Not read again:
    env["s3"].delete_object(Bucket=env["bucket"], Key="training/avatar-1/output/model.tar.gz")
    assert handler(event(env)) == first
    assert env["table"].get_item(Key={"user_id": "ada", "version": "b1"})["Item"] == created


def test_ready_version_is_never_overwritten_by_another_job(env):
    put_tar(env)
    put_tar(env, job="avatar-2", weights=b"other")
    handler = env["call"]
    handler(event(env))
    with pytest.raises(RuntimeError, match="READY with another training job"):
        handler(event(env, job="avatar-2"))
    body = (
        env["s3"]
        .get_object(Bucket=env["bucket"], Key="models/ada/b1/pytorch_lora_weights.safetensors")["Body"]
        .read()
    )
    assert body == b"lora-weights"


def test_training_row_becomes_ready_and_keeps_created_at(env):
    env["table"].put_item(Item={"user_id": "ada", "version": "b1", "status": "TRAINING", "created_at": "t0"})
    put_tar(env)
    env["call"](event(env))
    row = env["table"].get_item(Key={"user_id": "ada", "version": "b1"})["Item"]
    assert row["status"] == "READY" and row["created_at"] == "t0"


@pytest.mark.parametrize(
    "artifacts",
    [
        "s3://other-bucket/training/avatar-1/output/model.tar.gz",
        "s3://{bucket}/models/ada/b1/model.tar.gz",
        "https://example.com/model.tar.gz",
        None,
    ],
)
def test_artifacts_outside_the_training_prefix_are_refused(env, artifacts):
    with pytest.raises(ValueError, match="model_artifacts"):
        env["call"](event(env, model_artifacts=artifacts and artifacts.format(bucket=env["bucket"])))
    assert "Item" not in env["table"].get_item(Key={"user_id": "ada", "version": "b1"})


def test_archive_without_adapter_or_with_traversal_is_refused(env):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("../pytorch_lora_weights.safetensors", "nested/adapter.json"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    put_tar(env, body=buf.getvalue())
    with pytest.raises(ValueError, match="lacks"):
        env["call"](event(env))
    assert env["s3"].list_objects_v2(Bucket=env["bucket"], Prefix="models/").get("KeyCount") == 0
    assert "Item" not in env["table"].get_item(Key={"user_id": "ada", "version": "b1"})


def test_bad_ids_are_refused(env):
    with pytest.raises(ValueError, match="user_id"):
        env["call"](event(env, user_id="../ada"))


def test_notify_formats_rejection_and_failure(stack):
    def notify(event):
        return stack.call("notify", event)

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
    )
    # The email names the batch and the failure's class, never its raw cause (tests/test_notifications.py).
    assert "stopped with an error" in failed["message"] and "batch b1" in failed["message"]
    assert "CUDA out of memory" not in failed["message"]
    with pytest.raises(ValueError):
        notify({"event": "SOMETHING", "user_id": "ada", "batch_id": "b1"})


def test_the_registry_names_the_base_model_the_trainer_reports(env):
    """The trainer writes base_model_id (empty unless the operator set one) and the folder's
    fingerprint; the registry row keeps the id, else the fingerprint (it was always empty)."""
    put_tar(env, config={"token": "sks", "base_model_id": None, "base_model_fingerprint": "sha256:feed",
                         "metrics": {"final_loss": 0.1, "steps": 2}})
    env["call"](event(env))
    row = env["table"].get_item(Key={"user_id": "ada", "version": "b1"})["Item"]
    assert row["base_model"] == "sha256:feed"
