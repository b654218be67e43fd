"""Per-user quotas and usage metering in one DynamoDB table (template: UsageTable).

Rows, keyed (user_id, period):
- ``day#YYYY-MM-DD`` (UTC): the day's quota counters, ``batches`` (with ``batch_ids``, the
  batches counted, so a retried Lambda never counts one twice) and ``images``; expires
  (``ttl``) two days after the day ends.
- ``month#YYYY-MM``: what the user consumed that month: ``training_seconds`` (SageMaker's
  BillableTimeInSeconds), ``inference_seconds`` (the generation's own timings),
  ``images``, ``trainings``, ``generations`` and ``cost_usd`` (estimated from
  avatarflow/prices.json); ``recorded`` holds the training job names and generation ids
  already counted (idempotence for retries and duplicate notices).
- ``total``: the same sums over the user's life, written in the same transaction as the
  month row, so the admin listing reads one row per user.

Quotas are taken with one conditional UpdateItem each: DynamoDB applies it atomically, so
two requests for the last unit cannot both get it (tests/test_platform_access.py races
them). Why here and not in the API alone: batches can reach the workflow without the API
(an upload form signed earlier, the S3 console), so the workflow takes the batch unit
(build_dataset) and the API only refuses early when the day's batches are spent."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cache
from pathlib import Path

from botocore.exceptions import ClientError

DAY_TTL_DAYS = 2
PRICES_FILE = Path(__file__).with_name("prices.json")
METERED = ("training_seconds", "inference_seconds", "images", "trainings", "generations", "cost_usd")


class QuotaExceeded(Exception):  # noqa: N818 - an answer, not a fault
    """The day's quota of `kind` is spent; it renews at `retry_at` (next UTC midnight)."""

    def __init__(self, kind: str, limit: int, used: int, retry_at: datetime):
        self.kind, self.limit, self.used, self.retry_at = kind, limit, used, retry_at
        super().__init__(f"daily {kind} quota of {limit} reached")

    def retry_after_s(self, now: datetime | None = None) -> int:
        return max(1, int((self.retry_at - (now or datetime.now(UTC))).total_seconds()) + 1)

    def message(self) -> str:
        unit = "training batches" if self.kind == "batches" else "images"
        return (f"daily quota reached: {self.used} of {self.limit} {unit} used today; "
                f"try again after {self.retry_at.strftime('%Y-%m-%d %H:%M')} UTC")


@dataclass(frozen=True)
class Quotas:
    """Limits per user and UTC day (template: QuotaTrainingBatchesPerDay, QuotaImagesPerDay)."""

    batches_per_day: int
    images_per_day: int

    @classmethod
    def from_env(cls, environ) -> Quotas:
        return cls(int(environ["QUOTA_BATCHES_PER_DAY"]), int(environ["QUOTA_IMAGES_PER_DAY"]))


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).astimezone(UTC)


def day_key(now: datetime | None = None) -> str:
    return "day#" + _now(now).strftime("%Y-%m-%d")


def month_key(now: datetime | None = None) -> str:
    return "month#" + _now(now).strftime("%Y-%m")


def next_day(now: datetime | None = None) -> datetime:
    today = _now(now).replace(hour=0, minute=0, second=0, microsecond=0)
    return today + timedelta(days=1)


def _day_ttl(now: datetime | None) -> int:
    return int((next_day(now) + timedelta(days=DAY_TTL_DAYS)).timestamp())


def _failed_condition(err: ClientError) -> bool:
    return err.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


def today(table, user_id: str, now: datetime | None = None) -> dict:
    """The day row's counters ({"batches": n, "images": n}; zeros when there is none)."""
    key = {"user_id": user_id, "period": day_key(now)}
    item = table.get_item(Key=key, ConsistentRead=True).get("Item") or {}
    return {"batches": int(item.get("batches", 0)), "images": int(item.get("images", 0)),
            "batch_ids": set(item.get("batch_ids", set()))}


def check_batches(table, user_id: str, limit: int, now: datetime | None = None) -> None:
    """Raises QuotaExceeded when today's batches are spent (a read: the API's early 429)."""
    used = today(table, user_id, now)["batches"]
    if used >= limit:
        raise QuotaExceeded("batches", limit, used, next_day(now))


def take_images(table, user_id: str, count: int, limit: int, now: datetime | None = None) -> int:
    """Take `count` of today's images atomically; returns the day's images after it."""
    if count > limit:
        raise QuotaExceeded("images", limit, today(table, user_id, now)["images"], next_day(now))
    try:
        answer = table.update_item(
            Key={"user_id": user_id, "period": day_key(now)},
            UpdateExpression="ADD images :n SET #ttl = if_not_exists(#ttl, :ttl)",
            ConditionExpression="attribute_not_exists(images) OR images <= :room",
            ExpressionAttributeNames={"#ttl": "ttl"},
            ExpressionAttributeValues={":n": count, ":room": limit - count, ":ttl": _day_ttl(now)},
            ReturnValues="UPDATED_NEW",
        )
    except ClientError as err:
        if not _failed_condition(err):
            raise
        raise QuotaExceeded("images", limit, today(table, user_id, now)["images"], next_day(now)) from None
    return int(answer["Attributes"]["images"])


def give_back_images(table, user_id: str, count: int, now: datetime | None = None) -> None:
    """Return images taken for a request that was never queued (the endpoint refused it)."""
    table.update_item(Key={"user_id": user_id, "period": day_key(now)},
                      UpdateExpression="ADD images :n", ExpressionAttributeValues={":n": -count})


def take_batch(table, user_id: str, batch_id: str, limit: int, now: datetime | None = None) -> int:
    """Count `batch_id` against today's batches once (a retry finds it counted); returns the
    day's batches. Raises QuotaExceeded when the day's batches are spent."""
    try:
        answer = table.update_item(
            Key={"user_id": user_id, "period": day_key(now)},
            UpdateExpression="ADD batches :one, batch_ids :ids SET #ttl = if_not_exists(#ttl, :ttl)",
            ConditionExpression="(attribute_not_exists(batches) OR batches < :limit) "
                                "AND NOT contains(batch_ids, :batch)",
            ExpressionAttributeNames={"#ttl": "ttl"},
            ExpressionAttributeValues={":one": 1, ":ids": {batch_id}, ":limit": limit, ":batch": batch_id,
                                       ":ttl": _day_ttl(now)},
            ReturnValues="UPDATED_NEW",
        )
    except ClientError as err:
        if not _failed_condition(err):
            raise
        day = today(table, user_id, now)
        if batch_id in day["batch_ids"]:
            return day["batches"]
        raise QuotaExceeded("batches", limit, day["batches"], next_day(now)) from None
    return int(answer["Attributes"]["batches"])


# --------------------------------------------------------------------------- metering


@cache
def prices() -> dict:
    """prices.json: USD per instance-hour by SageMaker instance type, with its source and date."""
    return json.loads(PRICES_FILE.read_text(encoding="utf-8"))


def estimated_cost(instance_type: str | None, seconds: float) -> Decimal | None:
    """On-demand USD for `seconds` of `instance_type` (None: the type has no price in the table)."""
    hourly = prices()["usd_per_hour"].get(instance_type or "")
    if hourly is None:
        return None
    return (Decimal(str(hourly)) * Decimal(str(seconds)) / Decimal(3600)).quantize(Decimal("0.000001"))


def _record(client, table_name: str, user_id: str, event_id: str, values: dict, now: datetime | None) -> bool:
    """Add `values` to the month and total rows in one transaction, once per `event_id`."""
    names = {f"#{k}": k for k in values}
    adds = ", ".join(f"#{k} :{k}" for k in values)
    numbers = {f":{k}": {"N": str(v)} for k, v in values.items()}
    stamp = {"S": _now(now).isoformat(timespec="seconds")}
    try:
        client.transact_write_items(TransactItems=[
            {"Update": {
                "TableName": table_name, "Key": {"user_id": {"S": user_id}, "period": {"S": month_key(now)}},
                "UpdateExpression": f"ADD {adds}, recorded :ids SET updated_at = :now",
                "ConditionExpression": "NOT contains(recorded, :id)",
                "ExpressionAttributeNames": names,
                "ExpressionAttributeValues": {**numbers, ":ids": {"SS": [event_id]}, ":id": {"S": event_id},
                                              ":now": stamp}}},
            {"Update": {
                "TableName": table_name, "Key": {"user_id": {"S": user_id}, "period": {"S": "total"}},
                "UpdateExpression": f"ADD {adds} SET updated_at = :now, "
                                    "first_seen = if_not_exists(first_seen, :now)",
                "ExpressionAttributeNames": names,
                "ExpressionAttributeValues": {**numbers, ":now": stamp}}},
        ])
    except ClientError as err:
        reasons = err.response.get("CancellationReasons") or []
        if err.response.get("Error", {}).get("Code") == "TransactionCanceledException" and reasons \
                and reasons[0].get("Code") == "ConditionalCheckFailed":
            return False  # counted already: a retried invocation or a duplicate notice
        raise
    return True


def record_training(client, table_name: str, user_id: str, training_job: str, billable_seconds: float,
                    instance_type: str | None, now: datetime | None = None) -> bool:
    """One finished training job (DescribeTrainingJob's BillableTimeInSeconds); False if counted."""
    values = {"training_seconds": int(billable_seconds), "trainings": 1}
    cost = estimated_cost(instance_type, billable_seconds)
    if cost is not None:
        values["cost_usd"] = cost
    return _record(client, table_name, user_id, f"training:{training_job}", values, now)


def record_generation(client, table_name: str, user_id: str, generation_id: str, seconds: float,
                      images: int, instance_type: str | None, now: datetime | None = None) -> bool:
    """One completed generation (its result.json timings.total_ms); False if counted."""
    values = {"inference_seconds": Decimal(str(round(seconds, 3))), "images": images, "generations": 1}
    cost = estimated_cost(instance_type, seconds)
    if cost is not None:
        values["cost_usd"] = cost
    return _record(client, table_name, user_id, f"generation:{generation_id}", values, now)


def _plain(number) -> int | float:
    value = Decimal(str(number or 0))
    return int(value) if value == value.to_integral_value() else float(value)


def view(row: dict | None) -> dict:
    """A month or total row as the API shows it (zeros for a user with no usage)."""
    row = row or {}
    return {k: _plain(row.get(k)) for k in METERED}
