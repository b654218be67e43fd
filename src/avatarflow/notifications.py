"""The text of the emails the training workflow sends (SNS -> email).

Plain text a person can read: what happened, which photos were not used and why, and
what to do next."""

from __future__ import annotations

import json

from avatarflow.workflow import (
    DEFAULT_SUBJECT_CLASS,
    DEFAULT_TOKEN,
    MODEL_FAILED,
    MODEL_READY,
    MODEL_REJECTED,
)

_MAX_LISTED = 30
_MAX_CAUSE = 400


def _generate_hint(user_id: str, version: str, token: str, subject_class: str) -> str:
    return (
        "To create avatars, send a prompt that mentions your token, for example:\n"
        f"  POST /users/{user_id}/generations\n"
        f'  {{"prompt": "a portrait of {token} {subject_class} as an astronaut, studio light", '
        f'"model_version": "{version}", "num_images": 4}}\n'
        "You get a generation id back; poll "
        f"GET /users/{user_id}/generations/<generation_id> until the images are ready."
    )


def _rejection_lines(rejections: list[dict]) -> list[str]:
    lines = []
    for item in rejections[:_MAX_LISTED]:
        name = str(item.get("name") or "?")
        text = item.get("message") or str(item.get("reason") or "not usable")
        lines.append(f"  - {name}: {text}")
    if len(rejections) > _MAX_LISTED:
        lines.append(f"  ... and {len(rejections) - _MAX_LISTED} more")
    return lines


def ready(user_id: str, batch_id: str, version: str, metrics: dict | None, dataset: dict | None) -> dict:
    dataset = dataset or {}
    lines = [
        "Your avatar model is ready.",
        "",
        f"Model version: {version} (from upload batch {batch_id}).",
    ]
    if dataset.get("accepted") is not None:
        lines.append(f"It was trained on {dataset['accepted']} of your photos.")
    rejections = dataset.get("rejections") or []
    if rejections:
        lines += ["", "These photos were not used:", *_rejection_lines(rejections)]
    if metrics:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(metrics.items()) if isinstance(v, int | float | str))
        if shown:
            lines += ["", f"Training: {shown}"]
    for issue in dataset.get("request_issues") or []:
        lines.append(f"Note on your request.json: {issue}.")
    token = dataset.get("token") or DEFAULT_TOKEN
    subject_class = dataset.get("subject_class") or DEFAULT_SUBJECT_CLASS
    lines += ["", _generate_hint(user_id, version, token, subject_class)]
    return {"event": MODEL_READY, "subject": "Your avatar model is ready", "message": "\n".join(lines)}


def rejected(user_id: str, batch_id: str, dataset: dict) -> dict:
    """Too few usable photos; `empty_batch` (set by the state machine when the listing found
    nothing, e.g. the photos were deleted before training started) says so instead."""
    accepted = dataset.get("accepted", 0)
    needed = dataset.get("min_images")
    rejections = dataset.get("rejections") or []
    if dataset.get("empty_batch"):
        lines = [
            "We could not train your avatar model: the upload batch is empty.",
            "",
            f"No photos were found in uploads/{user_id}/{batch_id}/ when training was about to start"
            " (they were deleted, or never finished uploading).",
        ]
    else:
        needed_text = f"; at least {needed} are needed." if needed is not None else "."
        lines = ["We could not train your avatar model: too few usable photos.", "",
                 f"Usable photos: {accepted}{needed_text}"]
    if rejections:
        lines += ["", "Photos we could not use, and why:", *_rejection_lines(rejections)]
    lines += [
        "",
        "What to do next: upload 10-15 new photos of the same person (only that person, face clearly"
        " visible, sharp, well lit, different angles and backgrounds) into a new batch folder,"
        f" uploads/{user_id}/<new batch id>/. Training starts by itself once the upload is complete.",
    ]
    subject = "Your avatar photos need another try"
    return {"event": MODEL_REJECTED, "subject": subject, "message": "\n".join(lines)}


def _cause_summary(cause: object) -> str:
    """Error causes are often JSON (Lambda errors, DescribeTrainingJob): show the readable part."""
    text = str(cause or "")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        text = str(parsed.get("errorMessage") or parsed.get("FailureReason") or parsed.get("message") or text)
    return text if len(text) <= _MAX_CAUSE else text[:_MAX_CAUSE] + "..."


def failed(user_id: str, batch_id: str, error: dict | None) -> dict:
    error = error or {}
    lines = [
        "Training your avatar model failed. No model was registered for this upload.",
        "",
        f"Upload batch: {batch_id}",
        f"Error: {error.get('Error') or 'unknown'}",
    ]
    cause = _cause_summary(error.get("Cause"))
    if cause:
        lines.append(f"Details: {cause}")
    lines += [
        "",
        "What to do next: this is usually temporary. Upload the same photos again into a new batch"
        f" folder, uploads/{user_id}/<new batch id>/, to retry. If it fails again, contact support"
        " with the batch id above.",
    ]
    subject = "Your avatar model could not be trained"
    return {"event": MODEL_FAILED, "subject": subject, "message": "\n".join(lines)}
