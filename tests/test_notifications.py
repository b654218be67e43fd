"""The emails, read as the person who gets them (avatarflow.notifications, functions/notify).

Every ending of the workflow (ready; rejected for each photo reason; an emptied batch; failed
because training failed, timed out, or something of ours broke) must name the batch, say what
happened and what to do next in the user's terms (upload a new batch, request a generation),
and never show what only an operator can read: S3 keys or buckets, JSONPath, the state
input, an error's raw cause or a stack trace, nor promise that a failure is "temporary"."""

import json

import pytest

from avatarflow import faces, notifications
from avatarflow.workflow import MAX_BATCH_PHOTOS, MODEL_FAILED, MODEL_READY, MODEL_REJECTED

USER, BATCH = "ada", "b-2024-06-01"
BUCKET = "avatarflow-123456789012-us-east-1"
LONG_BATCH = "b" * 64  # the longest id ids.ID_PATTERN allows

# What failing states really hand the notifier as $.error (Error + Cause, as Step Functions
# records them): each cause carries something the user must never see.
STATES_RUNTIME = {
    "Error": "States.Runtime",
    "Cause": "An error occurred while executing the state 'BuildDataset' (entered at the event id #42). "
    "The JSONPath '$.Payload.kept' specified for the field 'kept.$' could not be found in the "
    f'input \'{{"user_id": "{USER}", "batch_id": "{BATCH}", "prefix": "uploads/{USER}/{BATCH}/"}}\'',
}
LAMBDA_CRASH = {
    "Error": "Lambda.Unknown",
    "Cause": json.dumps(
        {
            "errorType": "ClientError",
            "errorMessage": f"AccessDenied on s3://{BUCKET}/uploads/{USER}/{BATCH}/a.jpg",
            "stackTrace": ['  File "/var/task/app.py", line 88, in _read\n'],
        }
    ),
}
DYNAMODB = {"Error": "DynamoDB.AmazonDynamoDBException", "Cause": "One or more parameter values were invalid"}
LAMBDA_TIMEOUT = {
    "Error": "Sandbox.Timedout",
    "Cause": json.dumps(
        {"errorType": "Sandbox.Timedout", "errorMessage": "Task timed out after 30.00 seconds"}
    ),
}
LOCAL_TRAINING_FAILED = {
    "Error": "TrainingJobFailed",
    "Cause": json.dumps(
        {
            "errorType": "TrainingJobFailed",
            "errorMessage": "Training job avatar-1 failed: TrainingError: channel "
            "base_model: /opt/ml/input/data/base_model has no model_index.json",
        }
    ),
}
AWS_TRAINING_FAILED = {
    "Error": "States.TaskFailed",
    "Cause": json.dumps(
        {
            "TrainingJobName": "avatar-1",
            "TrainingJobStatus": "Failed",
            "SecondaryStatus": "Failed",
            "FailureReason": "AlgorithmError: CUDA out of memory",
            "OutputDataConfig": {"S3OutputPath": f"s3://{BUCKET}/training/"},
        }
    ),
}
AWS_RUNTIME_LIMIT = {
    "Error": "States.TaskFailed",
    "Cause": json.dumps(
        {
            "TrainingJobName": "avatar-1",
            "TrainingJobStatus": "Stopped",
            "SecondaryStatus": "MaxRuntimeExceeded",
        }
    ),
}
AWS_CAPACITY_WAIT = {
    "Error": "States.TaskFailed",
    "Cause": json.dumps(
        {
            "TrainingJobName": "avatar-1",
            "TrainingJobStatus": "Stopped",
            "SecondaryStatus": "MaxWaitTimeExceeded",
        }
    ),
}
LOCAL_RUNTIME_LIMIT = {
    "Error": "TrainingJobFailed",
    "Cause": json.dumps(
        {
            "errorType": "TrainingJobFailed",
            "errorMessage": "Training job avatar-1 failed: Training job reached the stopping condition",
        }
    ),
}
TASK_TIMEOUT = {"Error": "States.Timeout", "Cause": ""}

FAILURES = {
    "internal: States.Runtime": (STATES_RUNTIME, notifications.INTERNAL_ERROR),
    "internal: a function crashed": (LAMBDA_CRASH, notifications.INTERNAL_ERROR),
    "internal: a function timed out": (LAMBDA_TIMEOUT, notifications.INTERNAL_ERROR),
    "internal: the table refused": (DYNAMODB, notifications.INTERNAL_ERROR),
    "internal: no error at all": (None, notifications.INTERNAL_ERROR),
    "training failed (local stand-in)": (LOCAL_TRAINING_FAILED, notifications.TRAINING_FAILED),
    "training failed (SageMaker)": (AWS_TRAINING_FAILED, notifications.TRAINING_FAILED),
    "timed out: the job's runtime (SageMaker)": (AWS_RUNTIME_LIMIT, notifications.TIMED_OUT),
    "timed out: the job's runtime (local)": (LOCAL_RUNTIME_LIMIT, notifications.TIMED_OUT),
    "timed out: waiting for spot capacity": (AWS_CAPACITY_WAIT, notifications.TIMED_OUT),
    "timed out: a task's TimeoutSeconds": (TASK_TIMEOUT, notifications.TIMED_OUT),
}


def assert_plain(note: dict, batch: str = BATCH) -> str:
    """What every email must and must not hold; returns the body."""
    body, subject = note["message"], note["subject"]
    assert batch in body and batch in subject, "the email does not name the batch"
    for leak in ("s3://", "uploads/", "datasets/", "training/", "models/", BUCKET, "/opt/ml"):
        assert leak not in body, f"storage location {leak!r} shown: {body}"
    assert "$." not in body and "JSONPath" not in body, f"JSONPath shown: {body}"
    assert "{" not in body and "}" not in body, f"JSON (state input, error cause) shown: {body}"
    for trace in ("Traceback", 'File "', "stackTrace", "errorType", "Exception", "States."):
        assert trace not in body, f"error internals {trace!r} shown: {body}"
    assert "temporar" not in body.lower(), "promises a failure is temporary"
    assert "What to do next" in body or "request a generation" in body
    # SNS: an email subject is ASCII, one line, under 100 characters.
    assert subject.isascii() and "\n" not in subject and len(subject) < 100
    return body


# --------------------------------------------------------------------------- ready
def test_ready_names_the_batch_the_unused_photos_and_how_to_generate():
    dataset = {
        "accepted": 9,
        "rejections": [
            {
                "name": "copy_of_00.jpg",
                "reason": "duplicate",
                "message": faces.REASON_MESSAGES["duplicate"],
                "duplicate_of": "photo_00.jpg",
            },
            {"name": "cat.jpg", "reason": "no_face", "message": faces.REASON_MESSAGES["no_face"]},
        ],
        "kept": [f"photo_{i:02d}.jpg" for i in range(9)],
        "ignored": ["zz_extra.jpg"],
        "ignored_more": False,
        "token": "zwx",
        "subject_class": "woman",
        "request_issues": [],
    }
    note = notifications.ready(
        USER, BATCH, BATCH, {"loss": {"last": 0.12}, "step_time_median_s": 0.05}, dataset
    )
    body = assert_plain(note)
    assert note["event"] == MODEL_READY
    assert "It was trained on 9 of your photos." in body
    assert "copy_of_00.jpg: This photo is a near-duplicate of photo_00.jpg" in body
    assert f"cat.jpg: {faces.REASON_MESSAGES['no_face']}" in body
    assert "zz_extra.jpg" in body and f"at most {MAX_BATCH_PHOTOS} photos" in body
    assert "request a generation" in body and f"POST /users/{USER}/generations" in body
    assert "a portrait of zwx woman" in body and f"model version {BATCH}" in body
    assert "loss" not in body and "step_time" not in body  # training metrics mean nothing to the user


# --------------------------------------------------------------------------- rejected
@pytest.mark.parametrize("reason", sorted(faces.REASON_MESSAGES))
def test_a_rejection_tells_each_reason_in_plain_words_and_lists_the_keepers(reason):
    dataset = {
        "accepted": 3,
        "rejected": 1,
        "min_images": 8,
        "enough": False,
        "rejections": [{"name": "odd_one.jpg", "reason": reason, "message": faces.REASON_MESSAGES[reason]}],
        "kept": ["photo_00.jpg", "photo_01.jpg", "photo_02.jpg"],
        "ignored": [],
        "ignored_more": False,
        "request_issues": [],
    }
    note = notifications.rejected(USER, BATCH, dataset)
    body = assert_plain(note)
    assert note["event"] == MODEL_REJECTED
    assert "Usable photos: 3; at least 8 are needed." in body
    assert f"odd_one.jpg: {faces.REASON_MESSAGES[reason]}" in body
    keep = body.split("keep them for your next batch:")[1].split("\n\n")[0]
    assert [line.strip("- ") for line in keep.strip().splitlines()] == dataset["kept"]
    assert "odd_one.jpg" not in keep
    assert "upload a new batch" in body.lower() or "as a new batch" in body
    assert f"POST /users/{USER}/uploads" in body  # the next step in the API's terms, not a folder


def test_a_duplicate_names_its_pair():
    dataset = {
        "accepted": 2,
        "min_images": 8,
        "rejections": [
            {
                "name": "IMG_0002.jpg",
                "reason": "duplicate",
                "message": faces.REASON_MESSAGES["duplicate"],
                "duplicate_of": "IMG_0001.jpg",
            }
        ],
        "kept": ["IMG_0001.jpg", "IMG_0003.jpg"],
    }
    body = assert_plain(notifications.rejected(USER, BATCH, dataset))
    assert "IMG_0002.jpg: This photo is a near-duplicate of IMG_0001.jpg, which we kept." in body


def test_two_rejections_of_two_batches_read_differently():
    dataset = {"accepted": 1, "min_images": 8, "rejections": [], "kept": ["a.jpg"]}
    first = notifications.rejected(USER, "monday", dataset)
    second = notifications.rejected(USER, "tuesday", dataset)
    assert first["subject"] != second["subject"] and first["message"] != second["message"]


def test_ignored_files_are_named_with_the_reason():
    dataset = {
        "accepted": 2,
        "min_images": 8,
        "rejections": [],
        "kept": ["a.jpg", "b.jpg"],
        "ignored": ["p31.jpg", "p32.jpg"],
        "ignored_more": True,
    }
    body = assert_plain(notifications.rejected(USER, BATCH, dataset))
    section = body.split(f"A batch holds at most {MAX_BATCH_PHOTOS} photos")[1]
    assert "ignored" in section.splitlines()[0]
    assert "  - p31.jpg\n  - p32.jpg\n  ... and more files after those" in section


@pytest.mark.parametrize(
    "dataset",
    [
        # The state machine's BatchEmpty: the listing found nothing.
        {
            "accepted": 0,
            "rejected": 0,
            "min_images": 8,
            "enough": False,
            "empty_batch": True,
            "rejections": [],
        },
        # Listed, then every photo deleted before preprocess_image could read it.
        {
            "accepted": 0,
            "rejected": 2,
            "min_images": 8,
            "enough": False,
            "kept": [],
            "ignored": [],
            "rejections": [
                {"name": n, "reason": "photo_deleted", "message": faces.REASON_MESSAGES["photo_deleted"]}
                for n in ("a.jpg", "b.jpg")
            ],
        },
    ],
    ids=["empty listing", "every photo deleted after the listing"],
)
def test_an_emptied_batch_is_told_in_plain_words(dataset):
    note = notifications.rejected(USER, BATCH, dataset)
    body = assert_plain(note)
    assert note["event"] == MODEL_REJECTED and "is empty" in note["subject"]
    assert f"batch {BATCH}: the batch is empty" in body
    assert "deleted, or never finished uploading" in body
    assert "Usable photos" not in body  # not a photo-quality problem
    assert f"POST /users/{USER}/uploads" in body


def test_subjects_stay_under_the_sns_limit_with_the_longest_batch_id():
    dataset = {"accepted": 0, "min_images": 8, "rejections": []}
    for note in (
        notifications.ready(USER, LONG_BATCH, LONG_BATCH, None, {}),
        notifications.rejected(USER, LONG_BATCH, dataset),
        notifications.rejected(USER, LONG_BATCH, {**dataset, "empty_batch": True}),
        notifications.failed(USER, LONG_BATCH, LAMBDA_CRASH),
    ):
        assert_plain(note, LONG_BATCH)


# --------------------------------------------------------------------------- failed
@pytest.mark.parametrize(("error", "kind"), list(FAILURES.values()), ids=list(FAILURES))
def test_every_failure_is_told_in_plain_words_by_its_class(error, kind):
    assert notifications.failure_kind(error) == kind
    note = notifications.failed(USER, BATCH, error)
    body = assert_plain(note)
    assert note["event"] == MODEL_FAILED and "no model was made" in body
    assert f"POST /users/{USER}/uploads" in body and f"mention batch {BATCH}" in body
    for secret in (
        "AccessDenied",
        "CUDA",
        "base_model",
        "model_index",
        "BuildDataset",
        "avatar-1",
        "MaxRuntimeExceeded",
        "Task timed out",
        "parameter values",
    ):
        assert secret not in body, f"the raw cause leaks {secret!r}"
    if kind == notifications.TRAINING_FAILED:
        assert "stopped with an error" in body and "passed our checks" in body
    elif kind == notifications.TIMED_OUT:
        assert "did not finish in the time allowed" in body
    else:
        assert "went wrong on our side" in body


def test_the_timeout_says_why_when_it_knows():
    assert (
        "No training machine became free" in notifications.failed(USER, BATCH, AWS_CAPACITY_WAIT)["message"]
    )
    assert "training itself ran too long" in notifications.failed(USER, BATCH, AWS_RUNTIME_LIMIT)["message"]
    # A task past its TimeoutSeconds could be any step: no claim about the photos.
    assert "photos" not in notifications.failed(USER, BATCH, TASK_TIMEOUT)["message"].split("What to do")[0]
