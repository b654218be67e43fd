"""Erasure of one user as a state, not a loop over prefixes.

DELETE /users/{user_id} first writes a *mark* (one row of the erasures table, env
ERASURES_TABLE); the erase_user function then deletes everything of the user and sweeps
again, pass after pass, until the work that was in flight at the DELETE (a generation on the
endpoint, a training run) has drained or timed out. Every writer that could still produce
something for the user (the inference container, on_generation_done, register_model,
notify, on_upload, the API's upload and generation routes) asks `is_erased` first and drops
its output, so a pass never races a writer for long.

Why the mark is keyed by SHA-256 of the user id and not by the id: the mark has to outlive
the user's data (a late SQS redelivery or notice must still find it), but once the sweep is
done no table may hold the user id. After the last pass the mark says DONE and expires
`tombstone_s` later (DynamoDB TTL on `ttl`). TTL deletes lazily (within days), so readers
compare `ttl` with the clock themselves: an expired mark is no mark.

Times are epoch seconds (DynamoDB numbers), so conditions can compare them."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from avatarflow.ids import validate_id

PENDING = "PENDING"
DONE = "DONE"

KEY = "user_key"  # the erasures table's partition key: sha256(user_id), hex


# Timing field -> the environment variable that sets it (template.yaml, erase_user).
TIMING_ENV = {
    "sweep_interval_s": "ERASURE_SWEEP_INTERVAL_SECONDS",
    "min_age_s": "ERASURE_MIN_AGE_SECONDS",
    "generation_wait_s": "ERASURE_GENERATION_WAIT_SECONDS",
    "max_age_s": "ERASURE_MAX_AGE_SECONDS",
    "tombstone_s": "ERASURE_TOMBSTONE_SECONDS",
}


class UserErased(Exception):
    """The user asked for erasure: whatever was being produced for them must not be written."""


@dataclass(frozen=True)
class Timing:
    """How the sweep paces itself (seconds). The defaults are the template's values:

    - sweep_interval_s: the delay between passes while work is in flight; SQS DelaySeconds
      allows at most 900.
    - min_age_s: no erasure ends sooner. Upload forms signed before the DELETE stay valid
      for the API's UPLOAD_URL_TTL_SECONDS (900 s) and an upload begun just before a form
      expires still lands; 1200 s lets those land and be swept.
    - generation_wait_s: a generation still PENDING this long after its creation has timed
      out: SageMaker drops a queued request after RequestTTLSeconds (21600 s by default) and
      an invocation after InvocationTimeoutSeconds (900 s by default).
    - max_age_s: the hard bound. A training run ends before it (the state machine bounds every
      state: settle 20 x SettleSeconds, Train = the stopping condition + 1 h, ...); past it the
      sweep deletes whatever is left and ends, in-flight or not.
    - tombstone_s: how long a DONE mark keeps refusing writes for the user id (late SQS
      redeliveries of upload events, late notices) before it expires.
    """

    sweep_interval_s: int = 900
    min_age_s: int = 1200
    generation_wait_s: int = 22500
    max_age_s: int = 345600
    tombstone_s: int = 86400

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Timing:
        """The values the function's environment sets (TIMING_ENV), the defaults elsewhere."""
        values = {field: int(env[name]) for field, name in TIMING_ENV.items() if env.get(name)}
        timing = cls(**values)
        if not 0 <= timing.sweep_interval_s <= 900:
            raise ValueError("ERASURE_SWEEP_INTERVAL_SECONDS must be 0..900 (SQS DelaySeconds)")
        return timing


def user_key(user_id: str) -> str:
    """The mark's key: SHA-256 of the (validated) user id, hex."""
    return hashlib.sha256(validate_id(user_id, "user_id").encode()).hexdigest()


def now_s() -> int:
    return int(time.time())


def iso(epoch: object) -> str | None:
    """Epoch seconds (a DynamoDB number) as ISO-8601 UTC, for API answers."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def get_mark(table, user_id: str, now: int | None = None) -> dict[str, Any] | None:
    """The user's mark (strongly consistent read), or None when there is none or it expired."""
    item = table.get_item(Key={KEY: user_key(user_id)}, ConsistentRead=True).get("Item")
    if item is None:
        return None
    if int(item.get("ttl", 0)) <= (now_s() if now is None else now):
        return None
    return item


def is_erased(table, user_id: str) -> bool:
    """True while the user is marked erased (sweep pending, or done and not yet expired)."""
    return get_mark(table, user_id) is not None


def checker(table) -> Callable[[str], bool]:
    """`is_erased` bound to one table, for writers that take a callable (the container)."""
    return lambda user_id: is_erased(table, user_id)


def request(table, user_id: str, timing: Timing, now: int | None = None) -> tuple[str, dict[str, Any]]:
    """Mark the user erased. Returns (outcome, mark): "started" (a new mark), "pending" (a
    sweep is already under way) or "done" (erased already; the tombstone is still there).

    A PENDING mark expires only after max_age_s + tombstone_s: if every pass failed, the
    writers keep refusing the user for as long as any work of theirs could still run."""
    from botocore.exceptions import ClientError

    now = now_s() if now is None else now
    mark = get_mark(table, user_id, now)
    if mark is not None:
        return ("done" if mark.get("status") == DONE else "pending"), mark
    item = {
        KEY: user_key(user_id),
        "status": PENDING,
        "requested_at": now,
        "updated_at": now,
        "sweeps": 0,
        "ttl": now + timing.max_age_s + timing.tombstone_s,
    }
    try:
        # A mark that TTL has not yet removed but that expired counts as absent.
        table.put_item(
            Item=item,
            ConditionExpression=f"attribute_not_exists({KEY}) OR #ttl <= :now",
            ExpressionAttributeNames={"#ttl": "ttl"},
            ExpressionAttributeValues={":now": now},
        )
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
            raise
        mark = get_mark(table, user_id, now)  # a concurrent DELETE wrote it first
        if mark is None:
            raise
        return ("done" if mark.get("status") == DONE else "pending"), mark
    return "started", item


def view(user_id: str, mark: Mapping[str, Any]) -> dict[str, Any]:
    """The mark as GET /users/{user_id}/deletion shows it."""
    out: dict[str, Any] = {
        "user_id": user_id,
        "status": mark.get("status"),
        "requested_at": iso(mark.get("requested_at")),
        "sweeps": int(mark.get("sweeps", 0)),
    }
    if mark.get("status") == DONE:
        out["completed_at"] = iso(mark.get("completed_at"))
        out["timed_out"] = bool(mark.get("timed_out", False))
    else:
        out["next_sweep_at"] = iso(mark.get("next_sweep_at"))
        in_flight = mark.get("in_flight") or {}
        out["in_flight"] = {k: int(v) for k, v in in_flight.items()}
    return out
