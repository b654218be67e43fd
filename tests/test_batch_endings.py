"""How a batch ends when its files change or overflow, and what the user is told.

- Emptied: photos put, then deleted before the batch settles (the listing finds nothing:
  BatchEmpty) or after it settled (preprocess_image finds each photo gone: S3 answers 403 to
  a role that may not list the bucket). Either way the run is a rejection whose email says
  the batch is empty, in plain words; never States.Runtime, never MODEL_FAILED.
- Over-full: one limit, avatarflow.workflow.MAX_BATCH_PHOTOS (+ request.json), shared by the
  API's upload route, the state machine's listing (MaxKeys) and the README; files past it
  are ignored and the email names them (a second listing page, ListIgnored).
- build_dataset names each duplicate's pair and the photos that were good.
"""

import io
import json
import re
import time
from pathlib import Path

import boto3
import pytest
from PIL import Image
from workflow_harness import (
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

from avatarflow import faces, keys, notifications
from avatarflow.sample_photos import one_person_batch
from avatarflow.workflow import MAX_BATCH_FILES, MAX_BATCH_PHOTOS, MAX_IGNORED_LISTED
from avatarflow_local import iam
from avatarflow_local.functions import load_function_module, load_handler
from avatarflow_local.workflow_stack import DEFINITION


def _plain(body: str) -> None:
    """No storage location, JSONPath, JSON or error internals in an email body."""
    for leak in ("s3://", "uploads/", "datasets/", "$.", "{", "}", "States.", "Exception", "Traceback"):
        assert leak not in body, f"{leak!r} in the email: {body}"


def _tiny_png(shade: int) -> bytes:
    """A small grey picture: decodes, has no face (rejected in milliseconds)."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (shade, shade, shade)).save(buffer, "PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- one limit
def test_the_batch_limit_is_one_number_everywhere():
    states = json.loads(DEFINITION.read_text())["States"]
    assert states["ListUploads"]["Parameters"]["MaxKeys"] == MAX_BATCH_FILES == MAX_BATCH_PHOTOS + 1
    assert states["ListIgnored"]["Parameters"]["MaxKeys"] == MAX_IGNORED_LISTED
    assert load_function_module("api").MAX_UPLOAD_FILES == MAX_BATCH_PHOTOS
    openapi = json.loads((REPO / "docs" / "openapi.json").read_text())
    assert (
        openapi["components"]["schemas"]["UploadBody"]["properties"]["files"]["maxItems"] == MAX_BATCH_PHOTOS
    )
    limits = (REPO / "README.md").read_text().split("## Limits", 1)[1].split("\n## ", 1)[0]
    assert re.search(rf"\bat most {MAX_BATCH_PHOTOS} photos\b", limits), limits
    assert not re.search(r"\b40 files\b", limits)


# --------------------------------------------------------------------------- functions, as Lambda runs them
def test_a_photo_deleted_after_the_listing_is_a_rejection_not_an_error(stack):
    """preprocess_image may read uploads/* but not list the bucket: S3 answers a deleted
    key with 403 (HEAD: "403"), not 404. Before, that raised and failed the whole run."""
    result = stack.call("preprocess_image", {"key": f"uploads/{USER}/b1/gone.jpg", "index": 0})
    assert result["accepted"] is False and result["reason"] == "photo_deleted"
    assert result["message"] == faces.REASON_MESSAGES["photo_deleted"] and result["name"] == "gone.jpg"


def _accepted(name: str, index: int, embedding: list[float], phash: str) -> dict:
    return {
        "key": f"uploads/{USER}/b1/{name}",
        "name": name,
        "accepted": True,
        "reason": None,
        "message": None,
        "crop_key": keys.crop_key(USER, "b1", index),
        "face": {
            "box": [1, 2, 3, 4],
            "score": 0.9,
            "sharpness": 100.0,
            "brightness": 120.0,
            "embedding": embedding,
            "phash": phash,
        },
    }


def _rejected(name: str, reason: str = "no_face") -> dict:
    return {
        "key": f"uploads/{USER}/b1/{name}",
        "name": name,
        "accepted": False,
        "reason": reason,
        "message": faces.REASON_MESSAGES[reason],
        "crop_key": None,
        "face": None,
    }


def test_build_dataset_names_each_duplicate_pair_and_the_good_photos(stack):
    one, other = [1.0] + [0.0] * 127, [0.9, 0.43] + [0.0] * 126  # cosine 0.9: same person, not a copy
    results = [
        _accepted("IMG_0001.jpg", 0, one, "0000000000000000"),
        _accepted("IMG_0002.jpg", 1, one, "ffffffffffffffff"),  # the same face again
        _accepted("IMG_0003.jpg", 2, other, "00000000ffffffff"),
        _rejected("cat.jpg"),
    ]
    out = stack.call(
        "build_dataset", {"user_id": USER, "batch_id": "b1", "results": results, "min_images": 8}
    )
    assert out["enough"] is False and out["kept"] == ["IMG_0001.jpg", "IMG_0003.jpg"]
    by_name = {r["name"]: r for r in out["rejections"]}
    assert by_name["IMG_0002.jpg"] == {
        "name": "IMG_0002.jpg",
        "reason": "duplicate",
        "message": faces.REASON_MESSAGES["duplicate"],
        "duplicate_of": "IMG_0001.jpg",
    }
    assert "duplicate_of" not in by_name["cat.jpg"]
    assert out["ignored"] == [] and out["ignored_more"] is False
    body = notifications.rejected(USER, "b1", out)["message"]
    _plain(body)
    assert "IMG_0002.jpg: This photo is a near-duplicate of IMG_0001.jpg" in body
    assert "keep them for your next batch:\n  - IMG_0001.jpg\n  - IMG_0003.jpg\n" in body


def test_build_dataset_ignores_photos_past_the_limit_and_reads_an_overflowing_request(stack):
    """A batch without request.json lists one photo more than MAX_BATCH_PHOTOS: it is ignored
    like the files the listing did not reach; request.json among those is still read."""
    bucket = stack.resources.bucket
    boto3.client("s3").put_object(
        Bucket=bucket, Key=f"uploads/{USER}/b1/request.json", Body=json.dumps({"token": "zwx"}).encode()
    )
    names = [f"p{i:02d}.png" for i in range(MAX_BATCH_FILES)]
    overflow = {"names": [f"uploads/{USER}/b1/{n}" for n in ("p31.png", "request.json")], "more": True}
    out = stack.call(
        "build_dataset",
        {
            "user_id": USER,
            "batch_id": "b1",
            "results": [_rejected(n) for n in names],
            "overflow": overflow,
            "min_images": 8,
        },
    )
    assert out["ignored"] == [names[-1], "p31.png"] and out["ignored_more"] is True
    assert len(out["rejections"]) == MAX_BATCH_PHOTOS and out["token"] == "zwx"
    manifest = json.loads(
        boto3.client("s3").get_object(Bucket=bucket, Key=keys.manifest_key(USER, "b1"))["Body"].read()
    )
    assert manifest["ignored"] == out["ignored"] and manifest["counts"]["photos"] == MAX_BATCH_PHOTOS
    with pytest.raises(ValueError, match="overflow"):
        stack.call(
            "build_dataset",
            {
                "user_id": USER,
                "batch_id": "b1",
                "results": [],
                "overflow": {"names": ["uploads/someone-else/b9/x.jpg"], "more": False},
            },
        )


# --------------------------------------------------------------------------- the workflow, end to end
def _listed_counts(aws, arn) -> list[int]:
    """KeyCount of every ListUploads round, from the execution history."""
    counts = []
    for event in history(aws, arn):
        details = event.get("taskSucceededEventDetails") or {}
        output = json.loads(details.get("output") or "{}")
        if event["type"] == "TaskSucceeded" and "KeyCount" in output:
            counts.append(output["KeyCount"])
    return counts


def _assert_told_batch_is_empty(aws, arn, batch):
    desc = wait_done(aws, arn)
    assert desc["status"] == "FAILED" and desc["error"] == "NotEnoughPhotos", failure_of(aws, arn)
    assert "States.Runtime" not in json.dumps(history(aws, arn), default=str)
    assert aws["jobs"]() == []
    assert "Item" not in aws["table"].get_item(Key={"user_id": USER, "version": batch})
    (msg,) = messages(aws)
    assert msg["event"] == "MODEL_REJECTED" and msg["user_id"] == USER
    _plain(msg["body"])
    assert f"from batch {batch}: the batch is empty" in msg["body"]
    assert f"POST /users/{USER}/uploads" in msg["body"]
    return msg


@pytest.mark.e2e
def test_a_photo_put_then_deleted_before_the_batch_settles_is_rejected_and_the_user_told(aws):
    photos = one_person_batch(2)
    upload(aws, "e1", photos)
    deliver(aws, s3_event(aws, "e1", [n for n, _ in photos]))
    (execution,) = executions(aws)
    arn = execution["executionArn"]
    deadline = time.time() + 30
    while not _listed_counts(aws, arn):  # the first listing saw the photos...
        assert time.time() < deadline
        time.sleep(0.05)
    aws["s3"].delete_objects(
        Bucket=aws["stack"].bucket, Delete={"Objects": [{"Key": f"uploads/{USER}/e1/{n}"} for n, _ in photos]}
    )  # ...then they were deleted
    _assert_told_batch_is_empty(aws, arn, "e1")
    counts = _listed_counts(aws, arn)
    assert counts[0] == 2 and counts[-1] == 0, counts
    assert aws["hook"].calls["preprocess_image"] == 0


@pytest.mark.e2e
def test_photos_deleted_after_the_batch_settled_end_as_an_empty_batch(aws):
    """The listing settled on the photos; each is deleted just before preprocess_image reads
    it (S3 then answers this role 403). Before, the Map failed and the user got MODEL_FAILED."""
    bucket = aws["stack"].bucket

    def loader(name):
        handler = load_handler(name)
        if name != "preprocess_image":
            return handler

        def deleted_first(event, context):
            with iam.acting_as(None):  # the user, not the function, deletes it
                boto3.client("s3").delete_object(Bucket=bucket, Key=event["key"])
            return handler(event, context)

        return deleted_first

    aws["hook"].loader = loader
    arn, _ = run_batch(aws, "e2", one_person_batch(3))
    msg = _assert_told_batch_is_empty(aws, arn, "e2")
    assert aws["hook"].calls["preprocess_image"] == 3 and aws["hook"].calls["build_dataset"] == 1
    assert keys_under(aws, f"uploads/{USER}/e2/") == []
    assert "Usable photos" not in msg["body"]


@pytest.mark.e2e
def test_more_files_than_a_batch_holds_are_named_in_the_email(aws):
    """MAX_BATCH_PHOTOS + 2 small pictures and request.json: the listing stops at
    MAX_BATCH_FILES keys (f00-f30; f30 is one photo too many), ListIgnored reads the rest (f31,
    request.json), the email names the two ignored photos and why; request.json, listed after
    the limit, is still read (its bad token is noted)."""
    names = [f"f{i:02d}.png" for i in range(MAX_BATCH_PHOTOS + 2)]
    files = [(n, _tiny_png(100 + i)) for i, n in enumerate(names)]
    files.append(("request.json", json.dumps({"token": "X1"}).encode()))
    arn, desc = run_batch(aws, "e3", files)
    assert desc["status"] == "FAILED" and desc["error"] == "NotEnoughPhotos", failure_of(aws, arn)
    entered = [
        e["stateEnteredEventDetails"]["name"] for e in history(aws, arn) if e["type"].endswith("StateEntered")
    ]
    assert entered.count("ListIgnored") == 1
    assert aws["hook"].calls["preprocess_image"] == MAX_BATCH_FILES  # f00..f30: the listing's first page
    (msg,) = messages(aws)
    body = msg["body"]
    _plain(body)
    assert msg["event"] == "MODEL_REJECTED" and "batch e3" in body
    ignored = body.split(f"A batch holds at most {MAX_BATCH_PHOTOS} photos")[1].split("\n\n")[0]
    assert "ignored" in ignored and [line.strip("- ") for line in ignored.splitlines()[1:]] == names[-2:]
    assert "Note on your request.json: token must be 3-12 lowercase letters" in body
    manifest = json.loads(
        aws["s3"].get_object(Bucket=aws["stack"].bucket, Key=keys.manifest_key(USER, "e3"))["Body"].read()
    )
    assert manifest["ignored"] == names[-2:] and manifest["counts"]["photos"] == MAX_BATCH_PHOTOS
    assert Path(manifest["photos"][-1]["key"]).name == names[MAX_BATCH_PHOTOS - 1]
