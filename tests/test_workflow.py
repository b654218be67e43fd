"""The real statemachines/train_avatar.asl.json, executed by moto's ASL interpreter, with the
real Lambda handlers run in process (lambda hook) and the local createTrainingJob.sync
stand-in running the training container's entrypoint on a tiny model (tests/workflow_harness.py).

Each scenario asserts what a user and an operator would see: S3 objects, registry rows and
the SNS messages (delivered to an SQS queue subscribed to the topic)."""

import io
import json
import tarfile
import time
from pathlib import Path

import boto3
import pytest
from workflow_harness import (
    BASE_MODEL_BUCKET,
    REPO,
    USER,
    deliver,
    executions,
    failure_of,
    history,
    keys_under,
    messages,
    run_batch,
    s3_event,
    upload,
    wait_done,
)

from avatarflow import keys
from avatarflow.sample_photos import one_person_batch, photo_bytes, random_bytes

pytestmark = pytest.mark.e2e  # runs the real state machine with the real handlers


def test_happy_path_registers_model_and_emails_user(aws):
    photos = one_person_batch(10)
    request = ("request.json", json.dumps({"email": "ada@example.com", "token": "zwx",
                                           "subject_class": "woman"}).encode())
    arn, desc = run_batch(aws, "b1", [*photos, request])
    assert desc["status"] == "SUCCEEDED", failure_of(aws, arn)

    # One training job, on the accepted crops, with the tiny settings.
    (job,) = aws["jobs"]()
    assert job["status"] == "Completed"
    assert job["hyperparameters"]["max_train_steps"] == "2"
    # request.json's token and class reach the training prompts.
    assert job["hyperparameters"]["token"] == "zwx"
    assert job["hyperparameters"]["instance_prompt"] == "a photo of zwx woman"
    assert job["inputs"]["training"] >= 8 + 1  # crops + manifest.json

    # The adapter is published under models/<user>/<version>/ and matches the training output.
    assert keys_under(aws, f"models/{USER}/b1/") == [f"models/{USER}/b1/{keys.ADAPTER_CONFIG}",
                                                      f"models/{USER}/b1/{keys.ADAPTER_WEIGHTS}"]
    adapter = json.loads(aws["s3"].get_object(Bucket=aws["stack"].bucket,
                                              Key=f"models/{USER}/b1/{keys.ADAPTER_CONFIG}")["Body"].read())
    (tarball,) = [k for k in keys_under(aws, "training/") if k.endswith("output/model.tar.gz")]
    body = aws["s3"].get_object(Bucket=aws["stack"].bucket, Key=tarball)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        weights = tar.extractfile(keys.ADAPTER_WEIGHTS).read()
    published = aws["s3"].get_object(Bucket=aws["stack"].bucket,
                                     Key=f"models/{USER}/b1/{keys.ADAPTER_WEIGHTS}")["Body"].read()
    assert published == weights

    row = aws["table"].get_item(Key={"user_id": USER, "version": "b1"})["Item"]
    assert row["status"] == "READY"
    assert row["adapter_key"] == f"models/{USER}/b1/{keys.ADAPTER_WEIGHTS}"
    assert row["training_job"] == job["name"]
    assert row["batch_id"] == "b1" and row["created_at"] and row["updated_at"]
    assert row["token"] == adapter["token"] == "zwx"
    assert adapter["subject_class"] == "woman"

    (msg,) = messages(aws)
    assert msg["event"] == "MODEL_READY" and msg["user_id"] == USER
    assert "ready" in msg["body"] and f"POST /users/{USER}/generations" in msg["body"]
    assert "a portrait of zwx woman" in msg["body"]

    # The email from request.json is subscribed, filtered to this user's messages.
    subs = boto3.client("sns").list_subscriptions_by_topic(TopicArn=aws["stack"].topic_arn)["Subscriptions"]
    (email,) = [s for s in subs if s["Protocol"] == "email"]
    assert email["Endpoint"] == "ada@example.com"
    attrs = boto3.client("sns").get_subscription_attributes(SubscriptionArn=email["SubscriptionArn"])
    assert json.loads(attrs["Attributes"]["FilterPolicy"]) == {"user_id": [USER]}

    # State transitions (AWS bills these): every *StateEntered event in the history.
    transitions = sum(1 for e in history(aws, arn) if e["type"].endswith("StateEntered"))
    print(f"\nhappy path: {len(photos)} photos + request.json, {transitions} state transitions")
    (REPO / ".pytest_cache").mkdir(exist_ok=True)
    (REPO / ".pytest_cache" / "workflow_transitions.json").write_text(
        json.dumps({"photos": len(photos), "transitions": transitions}))
    assert transitions <= 40  # issue 4's target for a 10-photo batch


def test_too_few_usable_photos_is_rejected_with_reasons(aws):
    files = [*one_person_batch(3), ("notes.jpg", random_bytes(2048)),
             ("landscape.png", photo_bytes("coffee", "PNG"))]
    arn, desc = run_batch(aws, "b2", files)
    assert desc["status"] == "FAILED" and desc["error"] == "NotEnoughPhotos"
    assert aws["jobs"]() == []
    assert keys_under(aws, "models/") == []
    assert "Item" not in aws["table"].get_item(Key={"user_id": USER, "version": "b2"})
    (msg,) = messages(aws)
    assert msg["event"] == "MODEL_REJECTED"
    assert "notes.jpg" in msg["body"] and "landscape.png" in msg["body"]
    assert "Usable photos: 3; at least 8 are needed." in msg["body"]
    assert "make a new batch of 10-15 photos" in msg["body"] and f"POST /users/{USER}/uploads" in msg["body"]
    keepers = "keep them for your next batch:\n  - photo_00.jpg\n  - photo_01.jpg\n  - photo_02.jpg\n"
    assert keepers in msg["body"]  # the three good photos, to upload again with new ones
    assert keys_under(aws, f"datasets/{USER}/b2/manifest.json")


def test_training_failure_marks_registry_failed_and_emails(aws, monkeypatch):
    # A base model prefix with nothing in it: the real entrypoint fails the job with a reason.
    base = aws["s3"].list_objects_v2(Bucket=BASE_MODEL_BUCKET, Prefix="tiny-sd/")["Contents"]
    aws["s3"].delete_objects(Bucket=BASE_MODEL_BUCKET, Delete={"Objects": [{"Key": o["Key"]} for o in base]})
    arn, desc = run_batch(aws, "b3", one_person_batch(9))
    assert desc["status"] == "FAILED" and desc["error"] == "AvatarModelFailed"
    (job,) = aws["jobs"]()
    assert job["status"] == "Failed"
    assert keys_under(aws, "models/") == []
    row = aws["table"].get_item(Key={"user_id": USER, "version": "b3"})["Item"]
    assert row["status"] == "FAILED"
    assert row["failure_error"] == "TrainingJobFailed" and "base_model" in row["failure_cause"]
    (msg,) = messages(aws)
    assert msg["event"] == "MODEL_FAILED" and "batch b3" in msg["body"]
    # The user reads what happened in plain words; the cause stays on the registry row.
    assert "stopped with an error" in msg["body"] and "base_model" not in msg["body"]


def test_duplicate_events_and_two_waves_make_one_execution_and_one_job(aws):
    photos = one_person_batch(10)
    first, second = photos[:5], photos[5:]
    upload(aws, "b4", first)
    event = s3_event(aws, "b4", [n for n, _ in first])
    deliver(aws, event, event)  # the same S3 event twice in one batch
    deliver(aws, event)  # and redelivered later
    (execution,) = executions(aws)
    arn = execution["executionArn"]
    # The second wave lands after the first listing: the settle loop must see it.
    deadline = time.time() + 30
    while not any(e["type"] == "TaskSucceeded" for e in history(aws, arn)):
        assert time.time() < deadline
        time.sleep(0.05)
    upload(aws, "b4", second)
    deliver(aws, s3_event(aws, "b4", [n for n, _ in second]))
    desc = wait_done(aws, arn)
    assert desc["status"] == "SUCCEEDED", failure_of(aws, arn)
    assert len(executions(aws)) == 1
    (job,) = aws["jobs"]()
    manifest = json.loads(aws["s3"].get_object(Bucket=aws["stack"].bucket,
                                               Key=keys.manifest_key(USER, "b4"))["Body"].read())
    assert len(json.dumps(manifest)) > 0
    listed = {Path(k).name for k in json.loads(desc["output"])["listing"]["keys"]}
    assert listed == {n for n, _ in photos}
    assert aws["hook"].calls["preprocess_image"] == 10
    # Another duplicate after the run finished still starts nothing.
    deliver(aws, event)
    assert len(executions(aws)) == 1 and len(aws["jobs"]()) == 1
    assert [m["event"] for m in messages(aws)] == ["MODEL_READY"]


def test_transient_lambda_error_is_retried(aws):
    aws["hook"].fail_next("preprocess_image", "TooManyRequestsException", times=2)
    aws["hook"].fail_next("register_model", "ServiceException")
    arn, desc = run_batch(aws, "b5", one_person_batch(8))
    assert desc["status"] == "SUCCEEDED", failure_of(aws, arn)
    assert aws["hook"].calls["preprocess_image"] == 8 + 2
    assert aws["hook"].calls["register_model"] == 2
    assert aws["table"].get_item(Key={"user_id": USER, "version": "b5"})["Item"]["status"] == "READY"
    assert [m["event"] for m in messages(aws)] == ["MODEL_READY"]


def test_batch_emptied_before_listing_is_rejected_and_the_user_told(aws):
    """The photos are deleted before the settle loop lists the batch: ListObjectsV2 answers
    with KeyCount 0 and no Contents at all (as S3 does). The run ends as a rejection whose
    notice says the batch is empty: no States.Runtime, no Map, no dataset, no job, no row."""
    photos = one_person_batch(2)
    upload(aws, "b6", photos)
    event = s3_event(aws, "b6", [n for n, _ in photos])
    aws["s3"].delete_objects(Bucket=aws["stack"].bucket, Delete={"Objects": [
        {"Key": f"uploads/{USER}/b6/{n}"} for n, _ in photos]})
    deliver(aws, event)
    (execution,) = executions(aws)
    arn = execution["executionArn"]
    desc = wait_done(aws, arn)
    assert desc["status"] == "FAILED" and desc["error"] == "NotEnoughPhotos", failure_of(aws, arn)
    assert "States.Runtime" not in json.dumps(history(aws, arn), default=str)
    assert aws["hook"].calls["preprocess_image"] == 0 and aws["hook"].calls["build_dataset"] == 0
    assert aws["jobs"]() == [] and keys_under(aws, f"datasets/{USER}/b6/") == []
    assert "Item" not in aws["table"].get_item(Key={"user_id": USER, "version": "b6"})
    (msg,) = messages(aws)
    assert msg["event"] == "MODEL_REJECTED" and msg["user_id"] == USER
    assert "from batch b6: the batch is empty" in msg["body"] and "uploads/" not in msg["body"]


def test_a_batch_past_the_days_training_quota_is_rejected_and_the_user_told_when(aws):
    """The user's training batches for the UTC day are spent (QuotaTrainingBatchesPerDay, here
    the template's default): a batch with enough good photos trains nothing; the email says the
    limit was reached and when to try again."""
    from avatarflow import usage

    limit = int(aws["stack"].function_specs["build_dataset"].environment["QUOTA_BATCHES_PER_DAY"])
    table = boto3.resource("dynamodb").Table(aws["stack"].physical["UsageTable"]["Ref"])
    for i in range(limit):
        usage.take_batch(table, USER, f"earlier{i}", limit)
    arn, desc = run_batch(aws, "b9", one_person_batch(8))
    assert desc["status"] == "FAILED", desc
    assert aws["jobs"]() == [] and keys_under(aws, "models/") == []
    (msg,) = messages(aws)
    assert msg["event"] == "MODEL_REJECTED" and "you have reached today's limit" in msg["body"]
    when = usage.next_day().strftime("%Y-%m-%d %H:%M")
    assert f"Try again after {when} UTC" in msg["body"] and f"today's limit of {limit}" in msg["body"]
    assert usage.today(table, USER)["batches"] == limit  # the refused batch took no unit
