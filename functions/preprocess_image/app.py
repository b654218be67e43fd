"""preprocess_image: one uploaded photo -> accepted 512 px face crop, or a rejection reason.

Called by the PrepareImages Map of statemachines/train_avatar.asl.json with
{"key": "uploads/<user_id>/<batch_id>/<name>", "index": <Map item index>, "resolution": 512}.
A bad photo is a normal result (accepted false + reason); only infrastructure errors
(S3 unavailable, model files corrupt) raise, so that Step Functions retries them.

With UPLOAD_MODERATION=rekognition (the template's default) each photo the face gate accepts is
also sent (as a JPEG of at most 1600 px) to Rekognition DetectModerationLabels and DetectFaces
(AGE_RANGE): flagged content is rejected as `unsafe_content`, a face that may be a minor's
(UPLOAD_MINOR_POLICY, avatarflow.moderation.minor_face) as `possible_minor`. Every result says
which check ran (`upload_moderation`: "rekognition" or "off"; the local stack runs "off" unless a
stand-in answers these calls).
"""

import io
import os

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from botocore.exceptions import ClientError

from avatarflow import faces, keys, moderation

logger = Logger()
tracer = Tracer()
metrics = Metrics()

MIN_RESOLUTION, MAX_RESOLUTION = 64, 2048


def _upload_moderation() -> str:
    setting = os.environ.get("UPLOAD_MODERATION", "off").strip().lower()
    return "rekognition" if setting == "rekognition" else "off"


def _result(key, name, *, accepted=False, reason=None, crop_key=None, face=None, skipped=False):
    out = {
        "key": key,
        "name": name,
        "accepted": accepted,
        "reason": reason,
        "message": faces.REASON_MESSAGES.get(reason) if reason else None,
        "crop_key": crop_key,
        "face": face,
        "upload_moderation": _upload_moderation(),
    }
    if skipped:
        out["skipped"] = True  # request.json sits beside the photos; it is not a photo
    return out


def _int_field(event: dict, field: str, default=None, low=0, high=None) -> int:
    value = event.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
        raise ValueError(f"{field} must be an integer in [{low}, {high or 'inf'}]")
    return value


@tracer.capture_method
def _read(bucket: str, key: str, max_bytes: int) -> bytes | None:
    """The object's bytes; None when it is over the byte limit (not downloaded)."""
    s3 = boto3.client("s3")
    head = s3.head_object(Bucket=bucket, Key=key)
    if head["ContentLength"] > max_bytes:
        return None
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


@tracer.capture_method
def _write_crop(bucket: str, key: str, crop) -> None:
    buffer = io.BytesIO()
    crop.save(buffer, "PNG")
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=buffer.getvalue(), ContentType="image/png")


@tracer.capture_method
def _moderate(data: bytes, settings: faces.IntakeSettings) -> tuple[str | None, list[dict]]:
    """(rejection reason or None, the moderation labels found) for an accepted photo."""
    if _upload_moderation() != "rekognition":
        return None, []
    policy = moderation.ImagePolicy.from_env("UPLOAD_MODERATION")
    image = {"Bytes": faces.moderation_jpeg(data, settings)}
    rekognition = boto3.client("rekognition")
    found = rekognition.detect_moderation_labels(Image=image, MinConfidence=policy.min_confidence)
    labels = policy.labels(found)
    if policy.withholds(labels):
        return "unsafe_content", labels
    details = rekognition.detect_faces(Image=image, Attributes=["AGE_RANGE"]).get("FaceDetails", [])
    if moderation.minor_face(details, os.environ.get("UPLOAD_MINOR_POLICY", "possible")):
        return "possible_minor", labels
    return None, labels


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event, context):
    if not isinstance(event, dict):
        raise ValueError("event must be an object")
    key = event.get("key")
    # The raw key is echoed back (so the user sees which file failed) but never logged.
    name = key.rsplit("/", 1)[-1][:255] if isinstance(key, str) else None
    index = _int_field(event, "index")
    resolution = _int_field(event, "resolution", 512, MIN_RESOLUTION, MAX_RESOLUTION)
    try:
        upload = keys.parse_upload_key(key) if isinstance(key, str) else None
    except keys.InvalidKeyError as err:
        logger.warning("invalid upload key", extra={"error": str(err)})
        upload = None
    if upload is None:
        metrics.add_dimension("reason", "invalid_key")
        metrics.add_metric(name="PhotosRejected", unit=MetricUnit.Count, value=1)
        return _result(key if isinstance(key, str) else None, name, reason="invalid_key")
    logger.append_keys(user_id=upload.user_id, batch_id=upload.batch_id, photo=upload.name)
    if upload.is_request:
        return _result(key, upload.name, skipped=True)

    settings = faces.IntakeSettings(resolution=resolution)
    bucket = os.environ["BUCKET_NAME"]
    try:
        data = _read(bucket, key, settings.max_bytes)
    except ClientError as err:
        # This role may read uploads/* but not list the bucket, so S3 answers a key deleted
        # since the listing with 403 (AccessDenied; "403" on HEAD), never 404: both mean gone.
        if err.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404", "AccessDenied", "403"):
            raise  # S3 trouble: let Step Functions retry
        logger.warning("photo vanished before processing")
        metrics.add_dimension("reason", "photo_deleted")
        metrics.add_metric(name="PhotosRejected", unit=MetricUnit.Count, value=1)
        return _result(key, upload.name, reason="photo_deleted")
    if data is None:
        analysis = faces.PhotoAnalysis(verdict="too_large")
    else:
        analysis = faces.analyze_photo(data, settings)

    if not analysis.ok:
        logger.info("photo rejected", extra={"reason": analysis.verdict})
        metrics.add_dimension("reason", analysis.verdict)
        metrics.add_metric(name="PhotosRejected", unit=MetricUnit.Count, value=1)
        return _result(key, upload.name, reason=analysis.verdict, face=analysis.face_dict())

    reason, labels = _moderate(data, settings)
    if reason:
        # Label names only (no image content, no prompt): what the operator needs to review.
        names = [x["name"] for x in labels]
        logger.info("photo rejected by moderation", extra={"reason": reason, "labels": names})
        metrics.add_dimension("reason", reason)
        metrics.add_metric(name="PhotosRejected", unit=MetricUnit.Count, value=1)
        return _result(key, upload.name, reason=reason)

    crop_key = keys.crop_key(upload.user_id, upload.batch_id, index)
    _write_crop(bucket, crop_key, analysis.crop)
    logger.info("photo accepted", extra={"crop_key": crop_key, "timings_ms": analysis.timings_ms})
    metrics.add_metric(name="PhotosAccepted", unit=MetricUnit.Count, value=1)
    metrics.add_metric(
        name="IntakeMilliseconds", unit=MetricUnit.Milliseconds, value=sum(analysis.timings_ms.values())
    )
    return _result(key, upload.name, accepted=True, crop_key=crop_key, face=analysis.face_dict())
