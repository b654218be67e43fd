"""preprocess_image handler against template.yaml's bucket in moto, run as Lambda runs it and as
its own role (tests/unit_stack.py): crops land at the design.md keys, bad photos are normal
results, infrastructure errors raise."""

import io
import json

import boto3
import pytest
import unit_stack
from botocore.exceptions import ClientError
from PIL import Image

from avatarflow import faces, keys
from avatarflow import sample_photos as S
from avatarflow_local.lambda_hook import _Response

module_stack, stack = unit_stack.module_stack, unit_stack.stack  # one stack per module, emptied per test
USER, BATCH = "user-1", "batch_01"
ROLE = "avatarflow-local-PreprocessImageFunctionRole"  # the role SAM generates, in the local stack


@pytest.fixture
def s3(stack):
    """The operator's S3 client, bound to the stack's bucket (s3.bucket)."""
    client = boto3.client("s3")
    client.bucket = stack.resources.bucket
    return client


@pytest.fixture
def preprocess(stack):
    return lambda event: stack.call("preprocess_image", event)


def upload(s3, name: str, data: bytes) -> str:
    key = f"uploads/{USER}/{BATCH}/{name}"
    s3.put_object(Bucket=s3.bucket, Key=key, Body=data)
    return key


def test_good_photo_gives_a_png_crop_at_the_dataset_key(s3, preprocess):
    key = upload(s3, "me.jpg", S.with_orientation(S.photo("grace_hopper"), 6))
    result = preprocess({"key": key, "index": 4})
    assert result["accepted"] is True and result["reason"] is None and result["message"] is None
    assert result["name"] == "me.jpg" and result["key"] == key
    assert result["crop_key"] == keys.crop_key(USER, BATCH, 4) == f"datasets/{USER}/{BATCH}/images/004.png"
    crop = Image.open(io.BytesIO(s3.get_object(Bucket=s3.bucket, Key=result["crop_key"])["Body"].read()))
    assert crop.format == "PNG" and crop.size == (512, 512)
    face = result["face"]
    assert len(face["embedding"]) == 128 and face["score"] > 0.9 and len(face["box"]) == 4
    assert face["sharpness"] > 0 and face["brightness"] > 0
    assert len(json.dumps(result)) < 6000  # fits many times in a 256 KB Step Functions payload


def test_resolution_from_the_event(s3, preprocess):
    key = upload(s3, "big.jpg", S.phone_photo("grace_hopper", size=(2400, 1800), orientation=1))
    result = preprocess({"key": key, "index": 0, "resolution": 1024})
    crop = Image.open(io.BytesIO(s3.get_object(Bucket=s3.bucket, Key=result["crop_key"])["Body"].read()))
    assert crop.size == (1024, 1024)


BAD_CASES = {
    "blurred.jpg": (S.encode(S.blurred(S.photo("astronaut"), 5)), "blurry"),
    "dark.jpg": (S.encode(S.darkened(S.photo("grace_hopper"))), "too_dark"),
    "cat.png": (S.photo_bytes("chelsea", "PNG"), "no_face"),
    "two.jpg": (S.encode(S.collage("astronaut", "grace_hopper")), "several_faces"),
    "far.jpg": (S.encode(S.shrunk_in_canvas(S.photo("grace_hopper"))), "face_too_small"),
    "cut.jpg": (S.truncated(S.photo_bytes("astronaut")), "not_an_image"),
    "noise.heic": (S.random_bytes(), "not_an_image"),
    "empty.jpg": (b"", "not_an_image"),
    "bomb.png": (S.png_claiming(20_000, 20_000), "too_large"),
    "anim.gif": (S.photo_bytes("grace_hopper", "GIF"), "unsupported_format"),
}


def test_bad_photos_are_results_not_errors_and_never_stop_the_others(s3, preprocess):
    names = ["ok_1.jpg", *BAD_CASES, "ok_2.jpg"]
    batch = dict(S.one_person_batch(2))
    data = {"ok_1.jpg": batch["photo_00.jpg"], "ok_2.jpg": batch["photo_01.jpg"]}
    data.update({name: case[0] for name, case in BAD_CASES.items()})
    results = [preprocess({"key": upload(s3, name, data[name]), "index": i}) for i, name in enumerate(names)]
    verdicts = {r["name"]: r["reason"] if not r["accepted"] else "ok" for r in results}
    assert verdicts == {"ok_1.jpg": "ok", "ok_2.jpg": "ok", **{n: c[1] for n, c in BAD_CASES.items()}}
    for r in results:
        if not r["accepted"]:
            assert r["crop_key"] is None and r["message"] == faces.REASON_MESSAGES[r["reason"]]
    listed = s3.list_objects_v2(Bucket=s3.bucket, Prefix=f"datasets/{USER}/{BATCH}/images/")["Contents"]
    assert sorted(o["Key"] for o in listed) == [keys.crop_key(USER, BATCH, 0), keys.crop_key(USER, BATCH, 11)]
    # Rejections after detection still report the face box for the manifest.
    by_name = {r["name"]: r for r in results}
    assert by_name["blurred.jpg"]["face"]["box"] and by_name["blurred.jpg"]["face"]["embedding"] is None
    assert by_name["cat.png"]["face"] is None


def test_object_over_the_byte_limit_is_not_downloaded(s3, preprocess, stack, monkeypatch):
    key = upload(s3, "huge.jpg", S.oversized(faces.DEFAULT_SETTINGS.max_bytes))
    monkeypatch.setattr(faces, "analyze_photo", lambda *a, **k: pytest.fail("must not analyze"))
    result = preprocess({"key": key, "index": 0})
    assert result["accepted"] is False and result["reason"] == "too_large"
    # One s3:GetObject authorization, the HEAD's: the GET was never made.
    assert stack.enforcer.allowed[(ROLE, "s3:GetObject")] == 1


@pytest.mark.parametrize(
    "key",
    [
        "uploads/user-1/batch_01/../../etc/passwd",
        "uploads/user 1/batch_01/a.jpg",
        "datasets/user-1/batch_01/images/000.png",
        "uploads/user-1/batch_01/sub/a.jpg",
        "uploads/user-1/batch_01/.hidden.jpg",
        None,
        42,
    ],
)
def test_invalid_keys_are_rejected_without_reading_s3(s3, preprocess, key):
    result = preprocess({"key": key, "index": 0})
    assert result["accepted"] is False and result["reason"] == "invalid_key"
    assert result["message"] == faces.REASON_MESSAGES["invalid_key"]
    assert "Contents" not in s3.list_objects_v2(Bucket=s3.bucket)


def test_request_json_is_skipped(s3, preprocess):
    key = upload(s3, "request.json", b'{"email": "a@example.com"}')
    result = preprocess({"key": key, "index": 3})
    assert result["skipped"] is True and result["accepted"] is False and result["reason"] is None


def test_photo_deleted_since_listing_is_a_rejection(s3, preprocess, stack):
    key = f"uploads/{USER}/{BATCH}/gone.jpg"
    result = preprocess({"key": key, "index": 0})
    assert result["accepted"] is False and result["reason"] == "photo_deleted"
    # The role may not list the bucket, so S3 answered the missing key with 403, not 404.
    assert [k for _, k in stack.enforcer.masked] == [key]


def test_s3_outage_raises_so_step_functions_retries(s3, preprocess):
    key = upload(s3, "a.jpg", S.photo_bytes("grace_hopper"))

    def slow_down(**_kwargs):
        error = {"Code": "SlowDown", "Message": "Please reduce your request rate."}
        return _Response(503, {}), {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 503}}

    # S3 unavailable for the handler's client (it makes one per call, from the default session).
    events = boto3.DEFAULT_SESSION.events
    events.register("before-call.s3.HeadObject", slow_down, unique_id="tests-s3-outage")
    try:
        with pytest.raises(ClientError, match="SlowDown"):
            preprocess({"key": key, "index": 0})
    finally:
        events.unregister("before-call.s3.HeadObject", unique_id="tests-s3-outage")


@pytest.mark.parametrize(
    "event",
    [
        {"key": "uploads/u/b/a.jpg"},
        {"key": "uploads/u/b/a.jpg", "index": -1},
        {"key": "uploads/u/b/a.jpg", "index": 0, "resolution": 10},
        [],
    ],
)
def test_malformed_events_raise(s3, preprocess, event):
    with pytest.raises(ValueError):
        preprocess(event)


def test_sample_event_runs(s3, preprocess):
    from avatarflow_local.functions import REPO_ROOT

    event = json.loads((REPO_ROOT / "events" / "preprocess_image.json").read_text())
    s3.put_object(Bucket=s3.bucket, Key=event["key"], Body=S.photo_bytes("grace_hopper"))
    result = preprocess(event)
    assert result["accepted"] is True and result["crop_key"].endswith("/images/000.png")


# ---------------------------------------------------------------- upload moderation (issue 16)

def _moderated(stack, **policy):
    """The function as deployed with UploadModeration=rekognition (the template's default)."""
    stack.with_environment("preprocess_image", UPLOAD_MODERATION="rekognition", **policy)


def test_without_upload_moderation_the_result_says_so(s3, preprocess):
    """The local stack's default (no Rekognition in moto): no call is made, and the result says so."""
    key = upload(s3, "me.jpg", S.photo_bytes("grace_hopper"))
    result = preprocess({"key": key, "index": 0})
    assert result["accepted"] is True and result["upload_moderation"] == "off"


def test_a_face_that_may_be_a_minors_is_rejected_with_a_plain_reason(s3, preprocess, stack):
    from avatarflow_local.moderation_stand_in import ModerationStandIn

    _moderated(stack)
    key = upload(s3, "me.jpg", S.photo_bytes("grace_hopper"))
    judge = ModerationStandIn(face_ages=lambda image: [(14, 19)])
    with judge:
        result = preprocess({"key": key, "index": 0})
    assert result["accepted"] is False and result["reason"] == "possible_minor"
    assert "under 18" in result["message"] and result["upload_moderation"] == "rekognition"
    assert result["crop_key"] is None
    assert "Contents" not in s3.list_objects_v2(Bucket=s3.bucket, Prefix=keys.dataset_prefix(USER, BATCH))
    # The requests AWS would get: a JPEG of the whole photo (at most 1600 px), AGE_RANGE asked for.
    (_, moderation_call), (_, faces_call) = judge.calls
    assert Image.open(io.BytesIO(moderation_call["Image"]["Bytes"])).format == "JPEG"
    assert max(Image.open(io.BytesIO(faces_call["Image"]["Bytes"])).size) <= 1600
    assert faces_call["Attributes"] == ["AGE_RANGE"] and moderation_call["MinConfidence"] == 50.0
    allowed = stack.enforcer.allowed
    assert allowed[(ROLE, "rekognition:DetectModerationLabels")] == 1
    assert allowed[(ROLE, "rekognition:DetectFaces")] == 1


def test_minor_policy_likely_and_allow(s3, preprocess, stack):
    from avatarflow_local.moderation_stand_in import ModerationStandIn

    key = upload(s3, "me.jpg", S.photo_bytes("grace_hopper"))
    with ModerationStandIn(face_ages=lambda image: [(16, 24)]):  # possibly, not likely, a minor
        _moderated(stack, UPLOAD_MINOR_POLICY="likely")
        assert preprocess({"key": key, "index": 0})["accepted"] is True
        _moderated(stack, UPLOAD_MINOR_POLICY="possible")
        assert preprocess({"key": key, "index": 0})["reason"] == "possible_minor"


def test_flagged_content_is_rejected_and_an_adult_accepted(s3, preprocess, stack):
    from avatarflow_local.moderation_stand_in import ModerationStandIn

    _moderated(stack)
    key = upload(s3, "me.jpg", S.photo_bytes("grace_hopper"))
    underwear = [{"Name": "Swimwear or Underwear", "ParentName": "", "Confidence": 93.0, "TaxonomyLevel": 1}]
    with ModerationStandIn(image_labels=lambda image: underwear):
        result = preprocess({"key": key, "index": 0})
    assert result["reason"] == "unsafe_content" and "content check" in result["message"]
    with ModerationStandIn():  # no labels, an adult face
        assert preprocess({"key": key, "index": 1})["accepted"] is True
