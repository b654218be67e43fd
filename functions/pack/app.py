"""Avatar packs, called by the state machine (statemachines/train_avatar.asl.json) in three steps:

- `plan`: after MODEL_READY (or for POST /users/{u}/packs), the pack's row and its styles.
- `round` (lambda:invoke.waitForTaskToken): queue one generation per style still to do on the
  async endpoint and keep the task token on the pack row with the set of generations it waits
  for; on_generation_done removes each finished one and the one that empties the set sends
  SendTaskSuccess. The state machine spends no transition while the endpoint works.
- `review`: rank each style's images by identity similarity and keep the best; styles whose
  best is below PACK_MIN_SIMILARITY go round again while PACK_REGENERATIONS allows; then the
  manifest, the contact sheet (OpenCV: this function runs in the face image) and the
  PACK_READY email text with links that expire.

Every step checks the erasure mark first (a pack for an erased user is dropped); review checks
it again after its writes."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from functools import cache
from types import SimpleNamespace

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from botocore.config import Config
from botocore.exceptions import ClientError

from avatarflow import erasure, keys, notifications, pack_sheet, packs, styles
from avatarflow import generations as gen
from avatarflow.ids import new_id, validate_id

logger = Logger(service="pack")
tracer = Tracer(service="pack")
metrics = Metrics(service="pack")


class UserErased(Exception):
    """Raised by `round` (its output is the callback's, so only an error can end the wait):
    the state machine catches it by this name and ends silently."""


@cache
def aws() -> SimpleNamespace:
    return SimpleNamespace(
        s3=boto3.client("s3", config=Config(signature_version="s3v4")),
        runtime=boto3.client("sagemaker-runtime"),
        dynamodb=boto3.resource("dynamodb"),
        sfn=boto3.client("stepfunctions"),
    )


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def _table(env: str):
    return aws().dynamodb.Table(os.environ[env])


def _erased(user_id: str) -> bool:
    return erasure.is_erased(_table("ERASURES_TABLE"), user_id)


def _catalogue() -> tuple[styles.Style, ...]:
    """The defaults plus the operator's config/styles.json (absent: 404, or 403 without ListBucket)."""
    return styles.load_from_bucket(aws().s3, os.environ["BUCKET_NAME"])


def _pack_row(user_id: str, pack_id: str) -> dict:
    row = (
        _table("PACKS_TABLE")
        .get_item(Key={"user_id": user_id, "pack_id": pack_id}, ConsistentRead=True)
        .get("Item")
    )
    if row is None:
        raise LookupError("no such pack")
    return gen.from_dynamo(row)


def _update(user_id: str, pack_id: str, values: dict, remove: tuple[str, ...] = ()) -> None:
    names = {f"#{k}": k for k in (*values, *remove)}
    expression = "SET " + ", ".join(f"#{k} = :{k}" for k in values)
    if remove:
        expression += " REMOVE " + ", ".join(f"#{k}" for k in remove)
    _table("PACKS_TABLE").update_item(
        Key={"user_id": user_id, "pack_id": pack_id},
        UpdateExpression=expression,
        ExpressionAttributeNames=names,
        ExpressionAttributeValues={f":{k}": v for k, v in gen.to_dynamo(values).items()},
    )


# Every answer has every key the state machine's ResultSelector reads (null when it does not
# apply): a missing path there is States.Runtime on AWS, which no Catch catches.

# --------------------------------------------------------------------------- plan
def plan(event: dict) -> dict:
    user_id = validate_id(event["user_id"], "user_id")
    if _erased(user_id):
        return {"enabled": False, "erased": True, "pack_id": None}
    pack = event.get("pack")
    requested = pack if isinstance(pack, dict) and "pack_id" in pack else None  # else: the training run's
    table = _table("PACKS_TABLE")
    now = gen.utc_now()
    if requested:  # POST /users/{u}/packs wrote the row (styles, version) before starting us
        pack_id = validate_id(requested["pack_id"], "pack_id")
        row = _pack_row(user_id, pack_id)
        sizes = {k: int(event[k]) for k in ("images_per_style", "keep_per_style") if k not in row}
        if sizes:
            _update(user_id, pack_id, sizes)
            row.update(sizes)
    else:
        count = int(event.get("styles_count") or 0)
        if count <= 0:
            return {"enabled": False, "erased": False, "pack_id": None}
        pack_id = packs.pack_id_for(event["execution_arn"])
        chosen = styles.pick(_catalogue(), None, count)
        row = {
            "user_id": user_id,
            "pack_id": pack_id,
            "status": packs.PENDING,
            "model_version": validate_id(event["version"], "model_version"),
            "styles": [s.name for s in chosen],
            "images_per_style": int(event["images_per_style"]),
            "keep_per_style": int(event["keep_per_style"]),
            "origin": "training",
            "created_at": now,
            "updated_at": now,
            "ttl": int((datetime.now(UTC) + timedelta(days=_env_int("GENERATION_TTL_DAYS", 30))).timestamp()),
        }
        try:
            table.put_item(Item=gen.to_dynamo(row), ConditionExpression="attribute_not_exists(pack_id)")
        except ClientError as err:  # a retried task: the row is there
            if err.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                raise
            row = _pack_row(user_id, pack_id)
    # CloudFormation cannot compare two parameters: KeepPerStyle above ImagesPerStyle keeps all.
    if int(row["keep_per_style"]) > int(row["images_per_style"]):
        row["keep_per_style"] = int(row["images_per_style"])
        _update(user_id, pack_id, {"keep_per_style": row["keep_per_style"]})
    logger.append_keys(user_id=user_id, pack_id=pack_id)
    _update(
        user_id,
        pack_id,
        {
            "status": packs.RUNNING,
            "todo": row["styles"],
            "round": 0,
            "generation_ids": row.get("generation_ids") or [],
            "updated_at": now,
            "execution_arn": event.get("execution_arn") or "",
        },
    )
    logger.info("pack planned", extra={"styles": len(row["styles"])})
    return {"enabled": True, "erased": False, "pack_id": pack_id, "styles": len(row["styles"])}


# --------------------------------------------------------------------------- round
def _adapter_words(user_id: str, version: str) -> tuple[str, str]:
    """(token, subject_class) the model was trained with (adapter.json), for the prompts."""
    key = keys.model_prefix(user_id, version) + keys.ADAPTER_CONFIG
    try:
        config = json.loads(aws().s3.get_object(Bucket=os.environ["BUCKET_NAME"], Key=key)["Body"].read())
    except (ClientError, ValueError):
        config = {}
    token = config.get("token") if isinstance(config.get("token"), str) else "sks"
    subject = config.get("subject_class") if isinstance(config.get("subject_class"), str) else "person"
    return token, subject


def _release(user_id: str, pack_id: str, generation_id: str) -> bool:
    """Take one generation off the pack's waiting set; True when it was the last one (the
    caller then sends the task token). The condition makes a repeat a no-op."""
    try:
        answer = _table("PACKS_TABLE").update_item(
            Key={"user_id": user_id, "pack_id": pack_id},
            UpdateExpression="DELETE waiting :g",
            ConditionExpression="contains(waiting, :id)",
            ExpressionAttributeValues={":g": {generation_id}, ":id": generation_id},
            ReturnValues="ALL_NEW",
        )
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
            return False
        raise
    return not answer.get("Attributes", {}).get("waiting")


def _resume(token: str) -> None:
    aws().sfn.send_task_success(taskToken=token, output=json.dumps({"resumed": True}))


def round_(event: dict) -> dict:
    user_id = validate_id(event["user_id"], "user_id")
    pack_id = validate_id(event["pack_id"], "pack_id")
    logger.append_keys(user_id=user_id, pack_id=pack_id)
    if _erased(user_id):
        raise UserErased("the user was erased; the pack is dropped")
    row = _pack_row(user_id, pack_id)
    by_name = {s.name: s for s in _catalogue()}
    token, subject_class = _adapter_words(user_id, row["model_version"])
    round_index = int(row.get("round") or 0)
    planned = []
    for name in row.get("todo") or []:
        style = by_name.get(name)
        if style is None:
            logger.warning("a style of the pack is no longer in the catalogue", extra={"style": name})
            continue
        document = {
            "generation_id": new_id(),
            "user_id": user_id,
            "model_version": row["model_version"],
            "prompt": style.render(token, subject_class),
            "negative_prompt": style.negative_prompt,
            "num_images": min(int(row["images_per_style"]), packs.MAX_IMAGES_PER_STYLE),
            "steps": style.steps,
            "guidance_scale": style.guidance_scale,
            "width": style.width,
            "height": style.height,
            "seed": style.seed(round_index),
        }
        planned.append((name, document))
    ids = [doc["generation_id"] for _, doc in planned]
    # The waiting set and the token are on the row before the first invoke: a fast endpoint's
    # notice may arrive before InvokeEndpointAsync returns.
    values = {
        "task_token": event["task_token"],
        "generation_ids": [*(row.get("generation_ids") or []), *ids],
        "updated_at": gen.utc_now(),
    }
    if ids:
        _table("PACKS_TABLE").update_item(
            Key={"user_id": user_id, "pack_id": pack_id},
            UpdateExpression="SET task_token = :t, generation_ids = :g, updated_at = :u, waiting = :w",
            ExpressionAttributeValues={
                ":t": values["task_token"],
                ":g": values["generation_ids"],
                ":u": values["updated_at"],
                ":w": set(ids),
            },
        )
    else:
        _update(user_id, pack_id, values)
    last = not ids
    for name, document in planned:
        try:
            gen.queue_generation(
                s3=aws().s3,
                runtime=aws().runtime,
                table=_table("GENERATIONS_TABLE"),
                bucket=os.environ["BUCKET_NAME"],
                endpoint_name=os.environ["ENDPOINT_NAME"],
                document=document,
                ttl_days=_env_int("GENERATION_TTL_DAYS", 30),
                extra={"pack_id": pack_id, "style": name, "pack_round": round_index},
            )
        except gen.NotQueued:
            logger.exception("the endpoint refused a style's generation", extra={"style": name})
            metrics.add_metric(name="PackGenerationsNotQueued", unit=MetricUnit.Count, value=1)
            last = _release(user_id, pack_id, document["generation_id"]) or last
    if last:  # nothing to wait for: resume the state machine ourselves
        _resume(event["task_token"])
    metrics.add_metric(name="PackGenerationsQueued", unit=MetricUnit.Count, value=len(planned))
    logger.info("pack round queued", extra={"round": round_index, "generations": len(planned)})
    return {"queued": len(planned)}


# --------------------------------------------------------------------------- review
def _generation_rows(ids: list[str]) -> list[dict]:
    table = _table("GENERATIONS_TABLE")
    rows = []
    for generation_id in ids:
        item = table.get_item(Key={"generation_id": generation_id}, ConsistentRead=True).get("Item")
        if item is not None:
            rows.append(gen.from_dynamo(item))
    return rows


def _sign(key: str, ttl: int) -> str:
    return aws().s3.generate_presigned_url(
        "get_object", Params={"Bucket": os.environ["BUCKET_NAME"], "Key": key}, ExpiresIn=ttl
    )


def _contact_sheet(user_id: str, pack_id: str, outcomes: list[dict], titles: dict[str, str]) -> bytes:
    bucket = os.environ["BUCKET_NAME"]
    rows = []
    for outcome in outcomes:
        images = []
        for image in outcome["images"]:
            # Only keys inside the user's own generation folders are read (never another user's).
            if not image["key"].startswith(keys.user_prefix(keys.GENERATIONS, user_id)):
                continue
            data = aws().s3.get_object(Bucket=bucket, Key=image["key"])["Body"].read()
            images.append((data, image.get("identity_similarity")))
        rows.append(
            pack_sheet.Row(titles.get(outcome["name"], outcome["name"]), images, outcome.get("error"))
        )
    return pack_sheet.draw(f"avatar pack {pack_id[:12]}", rows)


def review(event: dict) -> dict:
    user_id = validate_id(event["user_id"], "user_id")
    pack_id = validate_id(event["pack_id"], "pack_id")
    logger.append_keys(user_id=user_id, pack_id=pack_id)
    if _erased(user_id):
        return {"erased": True, "again": False, "status": None, "notification": None}
    row = _pack_row(user_id, pack_id)
    keep = int(row["keep_per_style"])
    rows = _generation_rows(row.get("generation_ids") or [])
    outcomes = [
        packs.style_outcome(name, [r for r in rows if r.get("style") == name], keep) for name in row["styles"]
    ]
    round_index = int(row.get("round") or 0)
    min_similarity = float(os.environ.get("PACK_MIN_SIMILARITY") or 0.35)
    again = [o["name"] for o in outcomes if packs.needs_regeneration(o, min_similarity)]
    if again and round_index < _env_int("PACK_REGENERATIONS", 1) and not event.get("wait_error"):
        _update(
            user_id,
            pack_id,
            {"todo": again, "round": round_index + 1, "updated_at": gen.utc_now()},
            remove=("task_token",),
        )
        logger.info("styles below the likeness threshold go round again", extra={"styles": len(again)})
        metrics.add_metric(name="PackStylesRegenerated", unit=MetricUnit.Count, value=len(again))
        return {"erased": False, "again": True, "status": None, "notification": None}

    status = packs.pack_status(outcomes)
    bucket = os.environ["BUCKET_NAME"]
    titles = {s.name: s.title for s in _catalogue()}
    sheet = _contact_sheet(user_id, pack_id, outcomes, titles)
    sheet_key = keys.contact_sheet_key(user_id, pack_id)
    manifest_key = keys.pack_manifest_key(user_id, pack_id)
    now = gen.utc_now()
    manifest = {
        "pack_id": pack_id,
        "user_id": user_id,
        "model_version": row["model_version"],
        "status": status,
        "created_at": row.get("created_at"),
        "completed_at": now,
        "keep_per_style": keep,
        "images_per_style": int(row["images_per_style"]),
        "rounds": round_index + 1,
        "min_similarity": min_similarity,
        "styles": outcomes,
        "contact_sheet": sheet_key,
    }
    aws().s3.put_object(Bucket=bucket, Key=sheet_key, Body=sheet, ContentType="image/png")
    aws().s3.put_object(
        Bucket=bucket, Key=manifest_key, Body=json.dumps(manifest).encode(), ContentType="application/json"
    )
    _update(
        user_id,
        pack_id,
        {
            "status": status,
            "result": outcomes,
            "contact_sheet_key": sheet_key,
            "manifest_key": manifest_key,
            "completed_at": now,
            "updated_at": now,
        },
        remove=("task_token", "todo"),
    )
    if _erased(user_id):  # erased while we wrote: the sweep removes what we wrote; nothing is sent
        return {"erased": True, "again": False, "status": None, "notification": None}
    ttl = _env_int("PACK_LINK_TTL_SECONDS", 3600)
    links = {o["name"]: [_sign(i["key"], ttl) for i in o["images"]] for o in outcomes}
    text = notifications.pack_ready(user_id, pack_id, outcomes, titles, _sign(sheet_key, ttl), links, ttl)
    metrics.add_metric(name=f"Packs{status.title()}", unit=MetricUnit.Count, value=1)
    logger.info(
        "pack done",
        extra={"status": status, "failed_styles": sum(o["status"] != "COMPLETED" for o in outcomes)},
    )
    return {"erased": False, "again": False, "status": status, "notification": text}


ACTIONS = {"plan": plan, "round": round_, "review": review}


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict, context) -> dict:
    return ACTIONS[event["action"]](event)
