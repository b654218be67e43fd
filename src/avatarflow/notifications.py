"""The text of the emails the training workflow sends (SNS -> email).

Written for the person who uploaded the photos, not for an operator: every email names the
batch, says what happened and what to do next in terms that person has (upload a new batch,
request a generation: the API's routes), and never shows an S3 key or bucket, an error's
raw cause, a JSON document or a stack trace. Operators find those on the registry row
(failure_error, failure_cause) and in the execution history; the email gives the batch id
as the reference for support. Nothing here promises that a failure is temporary.
"""

from __future__ import annotations

import json
from datetime import datetime

from avatarflow.workflow import (
    DEFAULT_SUBJECT_CLASS,
    DEFAULT_TOKEN,
    MAX_BATCH_PHOTOS,
    MODEL_FAILED,
    MODEL_QUEUED,
    MODEL_READY,
    MODEL_REJECTED,
    PACK_READY,
)

_MAX_LISTED = 30
# Failure classes of MODEL_FAILED (failure_kind); each has its own wording.
TRAINING_FAILED = "training_failed"
TIMED_OUT = "timed_out"
INTERNAL_ERROR = "internal_error"
# SageMaker's SecondaryStatus when a job hits its stopping condition; the local stand-in
# (src/avatarflow_local/training_job.py) says "reached the stopping condition".
_RUNTIME_LIMIT_MARKS = ("MaxRuntimeExceeded", "reached the stopping condition")
_CAPACITY_WAIT_MARK = "MaxWaitTimeExceeded"


def _upload_route(user_id: str) -> str:
    return f"POST /users/{user_id}/uploads"


def _upload_again(user_id: str) -> str:
    return (
        f"Upload them as a new batch: ask for upload links ({_upload_route(user_id)}) and upload each photo"
        " to its link. Training starts by itself once the upload is complete."
    )


def _generate_hint(user_id: str, version: str, token: str, subject_class: str) -> str:
    return (
        f"To create avatars, request a generation with a prompt that mentions your token ({token}),"
        " for example:\n"
        f"  a portrait of {token} {subject_class} as an astronaut, studio light\n"
        f"Send it with model version {version} (POST /users/{user_id}/generations). You get a"
        f" generation id back; check on it (GET /users/{user_id}/generations/<generation id>) until"
        " the images are ready."
    )


def _subject(text: str) -> str:
    """SNS email subjects must be under 100 characters: ids are at most 64."""
    return text if len(text) < 100 else text[:96] + "..."


def _photo_line(item: dict) -> str:
    name = str(item.get("name") or "?")
    text = str(item.get("message") or item.get("reason") or "It could not be used.")
    if item.get("duplicate_of"):
        text = f"This photo is a near-duplicate of {item['duplicate_of']}, which we kept."
    return f"  - {name}: {text}"


def _listed(lines: list[str], total: int) -> list[str]:
    shown = lines[:_MAX_LISTED]
    if total > len(shown):
        shown.append(f"  ... and {total - len(shown)} more")
    return shown


def _rejection_lines(rejections: list[dict]) -> list[str]:
    return _listed([_photo_line(item) for item in rejections], len(rejections))


def _ignored_lines(dataset: dict) -> list[str]:
    """Files past the batch's limit (build_dataset's `ignored`), or nothing."""
    ignored = [str(name) for name in dataset.get("ignored") or []]
    if not ignored:
        return []
    lines = [
        "",
        f"A batch holds at most {MAX_BATCH_PHOTOS} photos (and request.json), so these files were"
        " ignored and not looked at:",
        *_listed([f"  - {name}" for name in ignored], len(ignored)),
    ]
    if dataset.get("ignored_more"):
        lines.append("  ... and more files after those")
    return lines


def _moderation_lines(rejections: list[dict]) -> list[str]:
    """Plain words for the photos the content checks turned away (preprocess_image's
    `possible_minor` / `unsafe_content`): why, and that trying again will not change it."""
    reasons = {item.get("reason") for item in rejections}
    lines = []
    if "possible_minor" in reasons:
        lines.append(
            "About the photos marked as possibly under 18: we estimate age from the face, and we only make"
            " avatar models of adults. If the person in those photos is under 18, please do not upload"
            " them again. If they are an adult, photos in good light, facing the camera, help the estimate."
        )
    if "unsafe_content" in reasons:
        lines.append(
            "About the photos our content check flagged: photos showing nudity, underwear, violence or"
            " disturbing content are never used for training. Please use ordinary, fully clothed portraits."
        )
    return ["", *lines] if lines else []


def _request_lines(dataset: dict) -> list[str]:
    return [f"Note on your request.json: {issue}." for issue in dataset.get("request_issues") or []]


def _likeness_lines(metrics: dict | None) -> list[str]:
    """The training job's quality loop, in words: the published checkpoint's SFace similarity
    to the batch's face. Nothing when no validation image showed a face (nothing was measured)."""
    metrics = metrics or {}
    score = metrics.get("identity_score")
    if score is None or not metrics.get("faces_found"):
        return []
    return [
        f"Likeness check: portraits made with your model while it trained matched the face in your "
        f"photos with a similarity of {float(score):.2f} (1.00 is the same face; above 0.36 is "
        "usually the same person)."
    ]


def ready(user_id: str, batch_id: str, version: str, metrics: dict | None, dataset: dict | None) -> dict:
    """MODEL_READY. Of `metrics` only the likeness score is told (training loss and step
    times stay on the registry row: they mean nothing to the person who gets this email)."""
    likeness = _likeness_lines(metrics)
    dataset = dataset or {}
    lines = [
        f"Your avatar model from batch {batch_id} is ready.",
        "",
        f"Model version: {version}.",
    ]
    if dataset.get("accepted") is not None:
        lines.append(f"It was trained on {dataset['accepted']} of your photos.")
    lines += likeness
    rejections = dataset.get("rejections") or []
    if rejections:
        lines += ["", "These photos were not used:", *_rejection_lines(rejections)]
        lines += _moderation_lines(rejections)
    lines += _ignored_lines(dataset)
    request_lines = _request_lines(dataset)
    if request_lines:
        lines += ["", *request_lines]
    token = dataset.get("token") or DEFAULT_TOKEN
    subject_class = dataset.get("subject_class") or DEFAULT_SUBJECT_CLASS
    lines += ["", _generate_hint(user_id, version, token, subject_class)]
    subject = _subject(f"Your avatar model is ready: batch {batch_id}")
    return {"event": MODEL_READY, "subject": subject, "message": "\n".join(lines)}


def _emptied(dataset: dict) -> bool:
    """Nothing left to look at: the listing was empty (the state machine's BatchEmpty), or
    every listed photo was deleted before it could be checked (preprocess_image's
    `photo_deleted`)."""
    if dataset.get("empty_batch"):
        return True
    rejections = dataset.get("rejections") or []
    return (
        not dataset.get("accepted")
        and bool(rejections)
        and all(item.get("reason") == "photo_deleted" for item in rejections)
    )


def _over_quota(user_id: str, batch_id: str, dataset: dict) -> dict:
    """MODEL_REJECTED for a batch that was fine but came after the user's training batches for
    the UTC day were spent (avatarflow.usage): says when to try again; the photos were good."""
    quota = dataset["quota"]
    try:
        when = datetime.fromisoformat(str(quota.get("retry_at"))).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        when = "midnight"
    kept = [str(name) for name in dataset.get("kept") or []]
    lines = [
        f"We did not train your avatar model from batch {batch_id}: you have reached today's limit of"
        f" {quota.get('limit')} training batches.",
        "",
        f"Try again after {when} UTC: upload the batch again then (the same photos are fine).",
    ]
    if kept:
        lines += ["", "These photos were good; keep them for that batch:",
                  *_listed([f"  - {name}" for name in kept], len(kept))]
    lines += ["", _upload_again(user_id)]
    return {"event": MODEL_REJECTED, "subject": _subject(f"Daily training limit reached: batch {batch_id}"),
            "message": "\n".join(lines)}


def rejected(user_id: str, batch_id: str, dataset: dict) -> dict:
    """MODEL_REJECTED: too few usable photos, or an emptied batch. Lists each photo that was
    not used and why (a duplicate names the photo it repeats), the photos that were fine and
    can go into the next batch, and the files ignored past the batch's limit."""
    if dataset.get("quota"):
        return _over_quota(user_id, batch_id, dataset)
    accepted = dataset.get("accepted", 0)
    needed = dataset.get("min_images")
    rejections = dataset.get("rejections") or []
    kept = [str(name) for name in dataset.get("kept") or []]
    if _emptied(dataset):
        subject = f"Your batch {batch_id} is empty"
        lines = [
            f"We could not train your avatar model from batch {batch_id}: the batch is empty.",
            "",
            "When we went to check the photos, none were left: they were deleted, or never finished"
            " uploading.",
        ]
        next_step = "What to do next: choose 10-15 photos of yourself. " + _upload_again(user_id)
    else:
        subject = f"Not enough usable photos in batch {batch_id}"
        needed_text = f"; at least {needed} are needed." if needed is not None else "."
        lines = [
            f"We could not train your avatar model from batch {batch_id}: too few of its photos were usable.",
            "",
            f"Usable photos: {accepted}{needed_text}",
        ]
        if rejections:
            lines += ["", "Photos we could not use, and why:", *_rejection_lines(rejections)]
            lines += _moderation_lines(rejections)
        next_step = (
            "What to do next: make a new batch of 10-15 photos of the same person"
            + (", starting with the good photos listed above" if kept else "")
            + ". Only that person, the whole face in the picture with some space around it, sharp,"
            " well lit, from different angles and in different places. " + _upload_again(user_id)
        )
    if kept:
        lines += ["", "These photos were good; keep them for your next batch:",
                  *_listed([f"  - {name}" for name in kept], len(kept))]
    lines += _ignored_lines(dataset)
    request_lines = _request_lines(dataset)
    if request_lines:
        lines += ["", *request_lines]
    lines += ["", next_step]
    return {"event": MODEL_REJECTED, "subject": _subject(subject), "message": "\n".join(lines)}


def failure_kind(error: dict | None) -> str:
    """TRAINING_FAILED, TIMED_OUT or INTERNAL_ERROR for the error the workflow caught.

    The training job failing arrives as the local stand-in's `TrainingJobFailed`, or on AWS
    as the .sync integration's failure whose cause is the DescribeTrainingJob document
    (TrainingJobStatus Failed, or Stopped at the stopping condition). `States.Timeout` is a
    task past its TimeoutSeconds. Everything else (a function, table or topic failing, a
    refused request) is ours."""
    error = error or {}
    name = str(error.get("Error") or "")
    cause = str(error.get("Cause") or "")
    try:
        parsed = json.loads(cause)
    except ValueError:
        parsed = None
    job_status = parsed.get("TrainingJobStatus") if isinstance(parsed, dict) else None
    if name == "States.Timeout" or _CAPACITY_WAIT_MARK in cause:
        return TIMED_OUT
    if (name == "TrainingJobFailed" or job_status in ("Failed", "Stopped")) and any(
        mark in cause for mark in _RUNTIME_LIMIT_MARKS
    ):
        return TIMED_OUT
    if name == "TrainingJobFailed" or job_status in ("Failed", "Stopped"):
        return TRAINING_FAILED
    return INTERNAL_ERROR


def failed(user_id: str, batch_id: str, error: dict | None) -> dict:
    """MODEL_FAILED, worded per failure_kind. The error's name and cause are not shown."""
    kind = failure_kind(error)
    if kind == TRAINING_FAILED:
        what = [
            f"Training your avatar model from batch {batch_id} stopped with an error, so no model was made.",
            "Your photos had passed our checks; the problem came up while training.",
        ]
    elif kind == TIMED_OUT:
        cause = str((error or {}).get("Cause") or "")
        what = [f"Work on batch {batch_id} did not finish in the time allowed, so it was stopped and no"
                " model was made."]
        if _CAPACITY_WAIT_MARK in cause:
            what.append("No training machine became free in time.")
        elif any(mark in cause for mark in _RUNTIME_LIMIT_MARKS):
            what.append("Your photos had passed our checks; training itself ran too long.")
    else:
        what = [
            f"Something went wrong on our side while we were working on batch {batch_id},"
            " so no model was made.",
        ]
    lines = [
        *what,
        "",
        "What to do next: you can try again with the same photos. " + _upload_again(user_id),
        f"If it fails again, contact support and mention batch {batch_id}.",
    ]
    subject = _subject(f"Your avatar model failed: batch {batch_id}")
    return {"event": MODEL_FAILED, "subject": subject, "message": "\n".join(lines)}


def _duration(seconds: int) -> str:
    """A wait in words a person reads at a glance: minutes up to two hours, then hours."""
    minutes = max(1, round(seconds / 60))
    if minutes < 120:
        return f"about {minutes} minute{'s' if minutes != 1 else ''}"
    return f"about {round(minutes / 60)} hours"


def queued(user_id: str, batch_id: str, position: int, estimated_wait_seconds: int) -> dict:
    """MODEL_QUEUED: the photos passed and the batch waits for a training machine. Sent once,
    when the batch joins the queue; its place changes as others finish, so the email points at
    the status route for the current one."""
    lines = [
        f"Your photos for batch {batch_id} passed our checks. All our training machines are busy"
        " right now, so your batch is waiting its turn.",
        "",
        f"Queued: place {position} in line, estimated wait {_duration(estimated_wait_seconds)}"
        " before training starts (training itself then takes a while longer).",
        "",
        f"You do not need to do anything. To see where your batch stands, check"
        f" GET /users/{user_id}/batches/{batch_id}. We will email you again when your model is ready.",
    ]
    subject = _subject(f"Your avatar batch is queued: batch {batch_id}")
    return {"event": MODEL_QUEUED, "subject": subject, "message": "\n".join(lines)}


def _until(ttl_seconds: int) -> str:
    hours = ttl_seconds / 3600
    return f"{hours:g} hour{'s' if hours != 1 else ''}"


def pack_ready(user_id: str, pack_id: str, outcomes: list[dict], titles: dict[str, str],
               contact_sheet_url: str, links: dict[str, list[str]], link_ttl_seconds: int) -> dict:
    """PACK_READY: which styles arrived (with links to the kept images, best likeness first)
    and which failed, a link to the contact sheet, and the route that gives fresh links once
    these expire (they are signed with the function's temporary credentials)."""
    done = [o for o in outcomes if o["status"] == "COMPLETED"]
    failed_styles = [o for o in outcomes if o["status"] != "COMPLETED"]
    if done:
        first = f"Your avatar pack is ready: {len(done)} of {len(outcomes)} styles."
    else:
        first = "Your avatar pack could not be made: no style produced an image."
    lines = [first, "", f"Pack id: {pack_id}."]
    if done:
        lines += ["", "All of it on one page (the contact sheet):", f"  {contact_sheet_url}", "",
                  "Each style's images, the most like you first:"]
        for outcome in done:
            lines.append(f"  {titles.get(outcome['name'], outcome['name'])}:")
            lines += [f"    {url}" for url in links.get(outcome["name"], [])]
    if failed_styles:
        names = ", ".join(f"{titles.get(o['name'], o['name'])} ({o['name']})" for o in failed_styles)
        lines += ["", f"These styles failed and are not in the pack: {names}.",
                  f"You can ask for them again (POST /users/{user_id}/packs with their names)."]
    lines += ["", f"These links work for {_until(link_ttl_seconds)}. For new links at any time, look at the"
              f" pack (GET /users/{user_id}/packs/{pack_id})."]
    subject = _subject(f"Your avatar pack is ready: {len(done)} of {len(outcomes)} styles" if done
                       else "Your avatar pack could not be made")
    return {"event": PACK_READY, "subject": subject, "message": "\n".join(lines)}
