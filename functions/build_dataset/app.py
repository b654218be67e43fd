"""build_dataset: the PrepareImages Map's results -> the training set and manifest.json.

Event: {"user_id", "batch_id", "results": [<preprocess_image outputs>], "min_images": 8,
"overflow": {"names": [<keys listed after the batch's first MAX_BATCH_FILES>], "more": bool}}.
Also reads the batch's optional request.json for the training token and subject class
(it is read here, after the settle loop, because it may arrive after the first photo).
Drops near-duplicates and photos of a different person, deletes every crop under
datasets/<user_id>/<batch_id>/images/ that is not in the training set (so the training
channel holds exactly it), writes manifest.json and returns counts (no embeddings: Step
Functions payloads are limited to 256 KB). The same input always gives the same manifest.
A batch uses at most MAX_BATCH_PHOTOS photos: the rest (past the limit in the listing, or
not listed at all: `overflow`) come back as `ignored` by name, so the email can say so.
"""

import json
import os
from collections import Counter

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from botocore.exceptions import ClientError

from avatarflow import batches, faces, keys, usage, workflow
from avatarflow.ids import validate_id

logger = Logger()
tracer = Tracer()
metrics = Metrics()

DEFAULT_MIN_IMAGES = 8
MANIFEST_VERSION = 1
MAX_REQUEST_BYTES = 16 * 1024


def _min_images(event: dict) -> int:
    value = event.get("min_images")
    if value is None:
        value = int(os.environ.get("MIN_IMAGES", DEFAULT_MIN_IMAGES))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("min_images must be a positive integer")
    return value


def _photo_entry(result: dict, images_prefix: str) -> dict:
    if not isinstance(result, dict) or not isinstance(result.get("key"), str):
        raise ValueError("every result must be a preprocess_image output with a key")
    face = result.get("face") or None
    crop_key = result.get("crop_key")
    accepted = bool(result.get("accepted"))
    if accepted and not (
        isinstance(crop_key, str) and crop_key.startswith(images_prefix) and face and face.get("embedding")
    ):
        raise ValueError(f"accepted result for {result['key']} lacks a crop under {images_prefix} or a face")
    return {
        "name": result.get("name") or result["key"].rsplit("/", 1)[-1],
        "key": result["key"],
        "verdict": "ok" if accepted else result.get("reason") or "not_an_image",
        "reason": None if accepted else result.get("reason") or "not_an_image",
        "message": None if accepted else faces.REASON_MESSAGES.get(result.get("reason") or "not_an_image"),
        "box": face.get("box") if face else None,
        "score": face.get("score") if face else None,
        "sharpness": face.get("sharpness") if face else None,
        "brightness": face.get("brightness") if face else None,
        "crop_key": crop_key if accepted else None,
        "_embedding": face.get("embedding") if accepted else None,
        "_phash": face.get("phash") if accepted else None,
    }


def _request_listed(results: list, overflow_keys: list[str], user_id: str, batch_id: str) -> bool:
    """Was request.json in the batch's listing? (preprocess_image answered it `skipped`; in an
    over-full batch it may be among the keys listed after the limit.)"""
    key = keys.upload_prefix(user_id, batch_id) + keys.REQUEST_FILE
    return key in overflow_keys or any(
        isinstance(r, dict) and r.get("skipped") and r.get("key") == key for r in results
    )


def _overflow(event: dict, user_id: str, batch_id: str) -> tuple[list[str], bool]:
    """The keys the state machine listed past the batch's limit (ListIgnored), and whether
    there were still more; both empty when the batch fit."""
    overflow = event.get("overflow") or {}
    names, more = overflow.get("names") or [], overflow.get("more", False)
    prefix = keys.upload_prefix(user_id, batch_id)
    if not (isinstance(names, list) and all(isinstance(n, str) and n.startswith(prefix) for n in names)):
        raise ValueError(f"overflow.names must be keys under {prefix}")
    if not isinstance(more, bool):
        raise ValueError("overflow.more must be a boolean")
    return names, more


@tracer.capture_method
def _read_request(bucket: str, user_id: str, batch_id: str) -> tuple[dict, list[str]]:
    """uploads/<u>/<b>/request.json -> (training subject, problems).

    Called only when the batch's listing had the file: this role may not list uploads/, and
    S3 answers a GetObject on a missing key with 403 AccessDenied to such a caller, never
    404. A 403 here therefore means the file was deleted after the listing (the role's
    GetObject grant covers the key), and the batch trains with the defaults."""
    key = keys.upload_prefix(user_id, batch_id) + keys.REQUEST_FILE
    try:
        obj = boto3.client("s3").get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{MAX_REQUEST_BYTES}")
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404", "AccessDenied", "403"):
            raise
        return workflow.training_subject(None)[0], ["request.json was removed before training: ignored"]
    body = obj["Body"].read()
    if len(body) > MAX_REQUEST_BYTES:
        return workflow.training_subject(None)[0], ["request.json is larger than 16 KB: ignored"]
    try:
        request = json.loads(body)
    except ValueError:
        return workflow.training_subject(None)[0], ["request.json is not valid JSON: ignored"]
    return workflow.training_subject(request)


@tracer.capture_method
def _prune_images(bucket: str, images_prefix: str, keep: set[str]) -> list[str]:
    """Delete every object under images/ that is not a kept crop (dropped or stale)."""
    s3 = boto3.client("s3")
    doomed = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=images_prefix):
        doomed += [obj["Key"] for obj in page.get("Contents", []) if obj["Key"] not in keep]
    for start in range(0, len(doomed), 1000):
        chunk = doomed[start : start + 1000]
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True})
    return doomed


@tracer.capture_method
def _take_quota(user_id: str, batch_id: str) -> dict | None:
    """Count this batch against the user's training batches of the UTC day (once, however
    often this runs); None when it may train, else what the email tells the user."""
    table = boto3.resource("dynamodb").Table(os.environ["USAGE_TABLE"])
    try:
        usage.take_batch(table, user_id, batch_id, int(os.environ["QUOTA_BATCHES_PER_DAY"]))
    except usage.QuotaExceeded as err:
        logger.info("daily training quota reached", extra={"limit": err.limit})
        metrics.add_metric(name="BatchesOverQuota", unit=MetricUnit.Count, value=1)
        return {"kind": err.kind, "limit": err.limit, "used": err.used,
                "retry_at": err.retry_at.isoformat(timespec="seconds")}
    return None


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event, context):
    if not isinstance(event, dict):
        raise ValueError("event must be an object")
    user_id = validate_id(event.get("user_id"), "user_id")
    batch_id = validate_id(event.get("batch_id"), "batch_id")
    logger.append_keys(user_id=user_id, batch_id=batch_id)
    results = event.get("results")
    if not isinstance(results, list):
        raise ValueError("results must be the list of preprocess_image outputs")
    min_images = _min_images(event)
    bucket = os.environ["BUCKET_NAME"]
    prefix = keys.dataset_prefix(user_id, batch_id)
    images_prefix = f"{prefix}images/"

    photos = [
        _photo_entry(r, images_prefix) for r in results if not (isinstance(r, dict) and r.get("skipped"))
    ]
    overflow_keys, ignored_more = _overflow(event, user_id, batch_id)
    # Over the limit: the photos listed past MAX_BATCH_PHOTOS (a batch without request.json
    # lists one more photo) and every file listed after the batch's first page.
    ignored = [p["name"] for p in photos[workflow.MAX_BATCH_PHOTOS :]]
    ignored += [k.rsplit("/", 1)[-1] for k in overflow_keys if not k.endswith("/" + keys.REQUEST_FILE)]
    photos = photos[: workflow.MAX_BATCH_PHOTOS]
    candidates = [
        faces.Candidate(p["name"], p["_embedding"], p["_phash"]) for p in photos if p["verdict"] == "ok"
    ]
    if len({c.name for c in candidates}) != len(candidates):
        raise ValueError("photo names in one batch must be unique")
    dropped = faces.choose_batch(candidates)
    for photo in photos:
        drop = dropped.get(photo["name"]) if photo["verdict"] == "ok" else None
        if drop:
            message = faces.REASON_MESSAGES[drop.reason]
            photo.update(verdict=drop.reason, reason=drop.reason, message=message, crop_key=None)
            if drop.duplicate_of:
                photo["duplicate_of"] = drop.duplicate_of
    kept = [p for p in photos if p["verdict"] == "ok"]
    reference = faces.mean_embedding([p["_embedding"] for p in kept])

    removed = _prune_images(bucket, images_prefix, {p["crop_key"] for p in kept})
    if _request_listed(results, overflow_keys, user_id, batch_id):
        subject, request_issues = _read_request(bucket, user_id, batch_id)
    else:
        subject, request_issues = workflow.training_subject(None)
    if request_issues:
        logger.warning("request.json values not used", extra={"issues": request_issues})
    rejections = [
        {"name": p["name"], "reason": p["reason"], "message": p["message"]}
        | ({"duplicate_of": p["duplicate_of"]} if p.get("duplicate_of") else {})
        for p in photos
        if p["reason"]
    ]
    enough = len(kept) >= min_images
    quota = _take_quota(user_id, batch_id) if enough else None
    enough = enough and quota is None
    manifest = {
        "version": MANIFEST_VERSION,
        "user_id": user_id,
        "batch_id": batch_id,
        "min_images": min_images,
        "enough": enough,
        "counts": {
            "photos": len(photos),
            "accepted": len(kept),
            "rejected": len(photos) - len(kept),
            "by_reason": dict(sorted(Counter(p["reason"] for p in photos if p["reason"]).items())),
        },
        "images": [p["crop_key"] for p in kept],
        "ignored": ignored,
        "ignored_more": ignored_more,
        **subject,
        "request_issues": request_issues,
        "reference_embedding": reference,
        "photos": [{k: v for k, v in p.items() if not k.startswith("_")} for p in photos],
    }
    manifest_key = keys.manifest_key(user_id, batch_id)
    boto3.client("s3").put_object(
        Bucket=bucket,
        Key=manifest_key,
        Body=json.dumps(manifest, sort_keys=True, indent=1).encode(),
        ContentType="application/json",
    )
    logger.info(
        "dataset built",
        extra={
            "accepted": len(kept),
            "rejected": len(photos) - len(kept),
            "enough": enough,
            "removed": len(removed),
        },
    )
    metrics.add_metric(name="DatasetImages", unit=MetricUnit.Count, value=len(kept))
    metrics.add_metric(
        name="DuplicatesDropped", unit=MetricUnit.Count, value=sum(r == "duplicate" for r in dropped.values())
    )
    metrics.add_metric(
        name="DifferentPersonDropped",
        unit=MetricUnit.Count,
        value=sum(r == "different_person" for r in dropped.values()),
    )
    metrics.add_metric(
        name="BatchesRejected" if not enough else "BatchesAccepted", unit=MetricUnit.Count, value=1
    )
    photo_list = batches.photo_verdicts({"kept": [p["name"] for p in kept], "rejections": rejections})
    photo_list += [{"name": name, "verdict": "rejected", "reason": "ignored"} for name in ignored]
    batches.set_stage(boto3.resource("dynamodb").Table(os.environ["BATCHES_TABLE"]), user_id, batch_id,
                      batches.QUEUED if enough else batches.REJECTED, photos=photo_list)
    return {
        "user_id": user_id,
        "batch_id": batch_id,
        "accepted": len(kept),
        "rejected": len(photos) - len(kept),
        "min_images": min_images,
        "enough": enough,
        # Set when the batch had enough photos but the user's training batches for the day
        # are spent: the rejection email says when to try again.
        "quota": quota,
        "dataset_prefix": prefix,
        "manifest_key": manifest_key,
        "rejections": rejections,
        # The photos that passed: a rejected batch's email says they can be uploaded again.
        "kept": [p["name"] for p in kept],
        "ignored": ignored,
        "ignored_more": ignored_more,
        **subject,
        "request_issues": request_issues,
    }
