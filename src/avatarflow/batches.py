"""Where a training batch stands (BatchesTable, keys `user_id` + `batch_id`).

Each part of the workflow writes the stage it knows, inside a call it makes anyway, so no
stage costs the state machine a transition:
  on_upload         settling  (a photo arrived: the execution starts, the listing settles)
  build_dataset     queued | rejected, with every photo's verdict
  training_queue    queued (place, estimate) -> training -> registering | failed
and the API reads `ready` / `failed` from the model registry row (register_model writes
it), the live place in the queue from the queue table, and the training step from the job's
progress file. A row never moves back from a final stage (ready, rejected, failed).
"""

from __future__ import annotations

import contextlib

from avatarflow.training_queue import now_iso

SETTLING = "settling"
INTAKE = "intake"
QUEUED = "queued"
TRAINING = "training"
REGISTERING = "registering"
READY = "ready"
REJECTED = "rejected"
FAILED = "failed"
STAGES = (SETTLING, INTAKE, QUEUED, TRAINING, REGISTERING, READY, REJECTED, FAILED)
FINAL = (READY, REJECTED, FAILED)


def set_stage(table, user_id: str, batch_id: str, stage: str, **attributes) -> None:
    """Move the batch to `stage` (and set `attributes`) unless it already ended."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage}")
    names = {"#stage": "stage"}
    values = {":stage": stage, ":now": now_iso(), ":final": list(FINAL)}
    sets = ["#stage = :stage", "updated_at = :now", "created_at = if_not_exists(created_at, :now)"]
    for i, (key, value) in enumerate(sorted(attributes.items())):
        names[f"#a{i}"] = key
        values[f":a{i}"] = value
        sets.append(f"#a{i} = :a{i}")
    condition = "attribute_not_exists(#stage) OR NOT #stage IN (" + ", ".join(
        f":f{i}" for i in range(len(FINAL))) + ")"
    values.pop(":final")
    values.update({f":f{i}": stage_name for i, stage_name in enumerate(FINAL)})
    # A batch that already ended is not reopened by a late writer.
    with contextlib.suppress(table.meta.client.exceptions.ConditionalCheckFailedException):
        table.update_item(Key={"user_id": user_id, "batch_id": batch_id},
                          UpdateExpression="SET " + ", ".join(sets), ConditionExpression=condition,
                          ExpressionAttributeNames=names, ExpressionAttributeValues=values)


def photo_verdicts(dataset: dict) -> list[dict]:
    """build_dataset's kept/rejections -> [{"name", "verdict", "reason"?}] for the row."""
    photos = [{"name": name, "verdict": "accepted"} for name in dataset.get("kept", [])]
    for item in dataset.get("rejections", []):
        entry = {"name": str(item.get("name") or "?"), "verdict": "rejected"}
        if item.get("reason"):
            entry["reason"] = str(item["reason"])
        photos.append(entry)
    return photos


def view(batch_id: str, row: dict | None, model: dict | None, place, total_steps: int | None) -> dict | None:
    """GET /users/{u}/batches/{batch_id}: the batch row, the registry row (ready/failed are
    the registry's word), and the live place in the queue (`place`: a training_queue.Place,
    None when the batch is not in the queue). None when neither row exists."""
    if row is None and model is None:
        return None
    row = row or {}
    stage = row.get("stage", SETTLING)
    status = (model or {}).get("status")
    if status == "READY":
        stage = READY
    elif status == "FAILED":
        stage = FAILED
    queue = None
    if stage == QUEUED and place is not None and not place.acquired:
        queue = {"position": place.position, "estimated_wait_seconds": place.estimated_wait_seconds}
    photos = row.get("photos")
    if photos is None:
        photos = [{"name": name, "verdict": "pending"} for name in sorted(row.get("pending_photos", ()))]
    result = {
        "batch_id": batch_id,
        "stage": stage,
        "queue": queue,
        # The step is not reported: SageMaker exposes the trainer's step metric only through
        # CloudWatch (train:step), which the API does not read; the total is the job's setting.
        "training": {"step": None, "total_steps": total_steps} if stage == TRAINING else None,
        "photos": [{k: str(v) for k, v in p.items()} for p in photos],
        "updated_at": max(filter(None, (row.get("updated_at"), (model or {}).get("updated_at")))),
    }
    if stage == READY:
        result["model_version"] = (model or {}).get("version", batch_id)
    return result
