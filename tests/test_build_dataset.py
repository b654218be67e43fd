"""build_dataset handler against template.yaml's bucket in moto, fed by the real preprocess_image
handler; both run as Lambda runs them, each as its own role (tests/unit_stack.py)."""

import json

import boto3
import numpy as np
import pytest
import unit_stack

from avatarflow import faces, keys
from avatarflow import sample_photos as S

module_stack, stack = unit_stack.module_stack, unit_stack.stack  # one stack per module, emptied per test
USER, BATCH = "user-7", "b2"
IMAGES = f"datasets/{USER}/{BATCH}/images/"


@pytest.fixture
def s3(stack):
    """The operator's S3 client, bound to the stack's bucket (s3.bucket)."""
    client = boto3.client("s3")
    client.bucket = stack.resources.bucket
    return client


@pytest.fixture
def run(stack):
    def go(s3, photos, **extra):
        results = []
        for i, (name, data) in enumerate(photos):
            key = f"uploads/{USER}/{BATCH}/{name}"
            s3.put_object(Bucket=s3.bucket, Key=key, Body=data)
            results.append(stack.call("preprocess_image", {"key": key, "index": i}))
        event = {"user_id": USER, "batch_id": BATCH, "results": results, **extra}
        return results, stack.call("build_dataset", event)

    return go


def listed(s3, prefix=IMAGES):
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", []))


def manifest(s3):
    return json.loads(s3.get_object(Bucket=s3.bucket, Key=keys.manifest_key(USER, BATCH))["Body"].read())


@pytest.fixture(scope="module")
def person():
    return S.one_person_batch(12)


@pytest.mark.e2e  # a whole batch of photos through the real intake: seconds
def test_one_person_batch_is_kept_as_the_training_set(s3, run, person):
    results, out = run(s3, person)
    assert out["accepted"] >= 10 and out["accepted"] == 12
    assert out["enough"] is True and out["rejections"] == [] and out["rejected"] == 0
    assert out["dataset_prefix"] == f"datasets/{USER}/{BATCH}/"
    assert out["manifest_key"] == f"datasets/{USER}/{BATCH}/manifest.json"
    assert listed(s3) == [keys.crop_key(USER, BATCH, i) for i in range(12)]
    doc = manifest(s3)
    assert doc["counts"] == {"photos": 12, "accepted": 12, "rejected": 0, "by_reason": {}}
    reference = np.asarray(doc["reference_embedding"])
    assert reference.shape == (128,) and abs(np.linalg.norm(reference) - 1) < 1e-5
    for r in results:
        assert faces.cosine_similarity(reference, r["face"]["embedding"]) > 0.9


@pytest.mark.e2e  # a whole batch of photos through the real intake: seconds
def test_mixed_batch_drops_duplicates_other_person_and_bad_photos(s3, run, person):
    grace = S.photo("grace_hopper")
    photos = [
        *person[:9],
        ("copy_of_00.jpg", S.encode(grace, quality=60)),  # photo_00 is grace itself
        ("someone_else.jpg", S.photo_bytes("astronaut")),
        ("blurry.jpg", S.encode(S.blurred(grace, 5))),
        ("coffee.png", S.photo_bytes("coffee", "PNG")),
        ("junk.jpg", S.random_bytes()),
    ]
    results, out = run(s3, photos)
    assert out["accepted"] == 9 and out["rejected"] == 5 and out["enough"] is True
    assert {(r["name"], r["reason"]) for r in out["rejections"]} == {
        ("copy_of_00.jpg", "duplicate"),
        ("someone_else.jpg", "different_person"),
        ("blurry.jpg", "blurry"),
        ("coffee.png", "no_face"),
        ("junk.jpg", "not_an_image"),
    }
    assert all(r["message"] == faces.REASON_MESSAGES[r["reason"]] for r in out["rejections"])
    # images/ holds exactly the training set: the crops of dropped photos are gone.
    assert listed(s3) == [keys.crop_key(USER, BATCH, i) for i in range(9)]
    doc = manifest(s3)
    by_name = {p["name"]: p for p in doc["photos"]}
    assert len(by_name) == 14
    assert by_name["someone_else.jpg"]["verdict"] == "different_person"
    assert by_name["someone_else.jpg"]["crop_key"] is None and by_name["someone_else.jpg"]["box"]
    assert (
        by_name["photo_03.jpg"]["verdict"] == "ok"
        and by_name["photo_03.jpg"]["crop_key"] == f"{IMAGES}003.png"
    )
    assert by_name["junk.jpg"]["box"] is None
    assert doc["counts"]["by_reason"] == {
        "blurry": 1,
        "different_person": 1,
        "duplicate": 1,
        "no_face": 1,
        "not_an_image": 1,
    }
    assert doc["images"] == listed(s3)
    # No embeddings in the Step Functions payload.
    assert "embedding" not in json.dumps(out) and len(json.dumps(out)) < 4000


def test_too_few_photos_is_a_clear_rejected_result(s3, run, person):
    _, out = run(s3, [*person[:3], ("cat.jpg", S.photo_bytes("chelsea"))])
    assert out["enough"] is False and out["accepted"] == 3 and out["min_images"] == 8
    assert out["rejections"] == [
        {"name": "cat.jpg", "reason": "no_face", "message": faces.REASON_MESSAGES["no_face"]}
    ]
    assert manifest(s3)["enough"] is False


def test_min_images_from_event_and_env(s3, run, person, stack):
    _, out = run(s3, person[:3], min_images=3)
    assert out["enough"] is True and out["min_images"] == 3
    # The template gives build_dataset no MIN_IMAGES (the state machine always passes
    # min_images, from the MinImages parameter); the handler's fallback is set through its spec.
    stack.with_environment("build_dataset", MIN_IMAGES="4")
    _, out = run(s3, person[:3])
    assert out["enough"] is False and out["min_images"] == 4


def test_idempotent_and_removes_stale_crops(s3, run, person, stack):
    s3.put_object(Bucket=s3.bucket, Key=f"{IMAGES}099.png", Body=b"left over from an earlier run")
    results, first = run(s3, person[:4])
    doc = s3.get_object(Bucket=s3.bucket, Key=first["manifest_key"])["Body"].read()
    assert listed(s3) == [keys.crop_key(USER, BATCH, i) for i in range(4)]
    again = stack.call("build_dataset", {"user_id": USER, "batch_id": BATCH, "results": results})
    assert again == first
    assert s3.get_object(Bucket=s3.bucket, Key=first["manifest_key"])["Body"].read() == doc
    assert listed(s3) == [keys.crop_key(USER, BATCH, i) for i in range(4)]


def test_request_json_results_are_ignored(s3, run, person):
    _, out = run(s3, [*person[:2], ("request.json", b"{}")])
    assert out["accepted"] == 2 and out["rejected"] == 0
    assert [p["name"] for p in manifest(s3)["photos"]] == ["photo_00.jpg", "photo_01.jpg"]


@pytest.mark.parametrize(
    ("request_body", "subject", "issues"),
    [
        (None, ("sks", "person"), 0),
        (b'{"token": "zwx", "subject_class": "woman"}', ("zwx", "woman"), 0),
        # Values that would reach a prompt unchecked fall back to the defaults, with the reason.
        (b'{"token": "a photo, nsfw", "subject_class": "dragon"}', ("sks", "person"), 2),
        (b'{"token": "person"}', ("sks", "person"), 1),
        (b"not json", ("sks", "person"), 1),
        (b'{"token": "' + b"x" * 20000 + b'"}', ("sks", "person"), 1),
    ],
)
def test_request_json_sets_the_training_subject(s3, run, person, request_body, subject, issues):
    # request.json travels with the photos: listed, answered `skipped` by preprocess_image.
    extra = [("request.json", request_body)] if request_body is not None else []
    _, out = run(s3, [*person[:2], *extra])
    token, subject_class = subject
    assert (out["token"], out["subject_class"]) == subject
    assert out["instance_prompt"] == f"a photo of {token} {subject_class}"
    assert out["class_prompt"] == f"a photo of a {subject_class}"
    assert len(out["request_issues"]) == issues
    assert manifest(s3)["token"] == token and manifest(s3)["request_issues"] == out["request_issues"]


@pytest.mark.parametrize(
    "event",
    [
        {"user_id": "../x", "batch_id": BATCH, "results": []},
        {"user_id": USER, "batch_id": BATCH, "results": "nope"},
        {"user_id": USER, "batch_id": BATCH, "results": [], "min_images": 0},
        # An accepted result whose crop is outside this batch's dataset prefix.
        {
            "user_id": USER,
            "batch_id": BATCH,
            "results": [
                {
                    "key": f"uploads/{USER}/{BATCH}/a.jpg",
                    "accepted": True,
                    "crop_key": "datasets/other/b/images/000.png",
                    "face": {"embedding": [1.0] * 128},
                }
            ],
        },
    ],
)
def test_malformed_events_raise(stack, event):
    with pytest.raises(ValueError):
        stack.call("build_dataset", event)


def test_sample_event_runs(stack):
    from avatarflow_local.functions import REPO_ROOT

    event = json.loads((REPO_ROOT / "events" / "build_dataset.json").read_text())
    out = stack.call("build_dataset", event)
    assert out["accepted"] == 1 and out["rejected"] == 1 and out["enough"] is False
    assert out["rejections"][0]["reason"] == "blurry"


@pytest.mark.e2e  # a whole batch of photos through the real intake: seconds
def test_batch_over_the_days_training_quota_is_rejected_with_when_to_retry(s3, run, person, stack):
    """Enough photos, but the user's training batches for the UTC day are spent: not enough to
    train, `quota` says until when; the rejection email (notify) says when to try again. The
    same batch run again is not counted twice."""
    from avatarflow import usage

    stack.with_environment("build_dataset", QUOTA_BATCHES_PER_DAY="2")
    table = boto3.resource("dynamodb").Table(stack.resources.physical["UsageTable"]["Ref"])
    usage.take_batch(table, USER, "earlier", 2)
    _, first = run(s3, person[:8])
    assert first["enough"] is True and first["quota"] is None
    _, again = run(s3, person[:8])  # a retried BuildDataset: counted once
    assert again["enough"] is True and usage.today(table, USER)["batches"] == 2
    usage.take_batch(table, "someone-else", "x", 2)  # other users' counters are their own
    table.update_item(Key={"user_id": USER, "period": usage.day_key()},
                      UpdateExpression="DELETE batch_ids :b", ExpressionAttributeValues={":b": {BATCH}})
    _, over = run(s3, person[:8])  # this batch id is no longer among the counted ones: a new batch
    assert over["enough"] is False and over["accepted"] == 8
    assert over["quota"] == {"kind": "batches", "limit": 2, "used": 2,
                             "retry_at": usage.next_day().isoformat(timespec="seconds")}
    assert manifest(s3)["enough"] is False
    mail = stack.call("notify", {"event": "MODEL_REJECTED", "user_id": USER, "batch_id": BATCH,
                                 "dataset": over})
    assert "limit" in mail["subject"].lower()
    when = usage.next_day().strftime("%Y-%m-%d %H:%M")
    assert f"Try again after {when} UTC" in mail["message"] and "today's limit of 2" in mail["message"]
