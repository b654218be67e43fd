"""The training capacity queue: a DynamoDB semaphore with a fair waiting list.

AWS's published Step Functions concurrency-control pattern keeps one lock item whose count
may only grow while it is below the limit (a conditional UpdateItem), with the holding
execution's id as an attribute so a release removes exactly that holder and a cleanup path
(EventBridge "Step Functions Execution Status Change" FAILED/TIMED_OUT/ABORTED -> release)
frees the slot of an execution that died without releasing. A plain semaphore is not fair:
whoever polls first after a release wins, so one user's tenth batch can overtake another
user's first. Here waiting executions are also written to an ordered waiting list, and a
free slot may only be taken by the head of the *fair order*:

  rank(entry) = the slots its user held + the user's entries already waiting, when it joined;
  order       = by (rank, enqueued_at).

So every user's first batch goes before anyone's second (round-robin across users), and
within a rank the earlier arrival goes first. The rank is fixed when the batch joins: a
user's second batch stays behind other users' first ones even after the user's first has
finished (recomputing it then would let it jump back ahead of batches that came later but
are someone's first). The price: in sustained overload a second batch waits until no first
batch is waiting (documented in docs/architecture.md, "Training queue").

The limit stays exact under races: the slot is taken in one transaction with the lock
item's condition `count < limit` and the waiting entry's deletion; a loser simply waits for
its next poll.

Table (TrainingQueueTable, keys `queue` + `entry`):
  queue "slots",   entry "lock":  count, holders {execution_arn: {user_id, batch_id, since}}
  queue "slots",   entry "stats": mean_job_seconds (moving average of finished jobs), jobs
  queue "waiting", entry "<enqueued_at>#<execution_arn>": user_id, batch_id, execution_arn
The waiting list is one partition read with a consistent Query (small items: thousands
fit a few pages), never an eventually consistent index.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from boto3.dynamodb.conditions import Key
from botocore.exceptions import ClientError

SLOTS = "slots"
WAITING = "waiting"
LOCK = "lock"
STATS = "stats"
# The rank a waiting entry has for the moment between its write and its ranking (sorts last).
PROVISIONAL_RANK = 1_000_000
# Weight of the newest job in the moving average of job durations (the wait estimate).
ESTIMATE_WEIGHT = 0.2


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _seconds_since(iso: str, now: float) -> float:
    return max(0.0, now - datetime.fromisoformat(iso).timestamp())


@dataclass(frozen=True)
class Waiting:
    entry: str
    user_id: str
    batch_id: str
    execution_arn: str
    enqueued_at: str
    rank: int = 0


@dataclass(frozen=True)
class Place:
    """Where a batch stands: acquired, or its 1-based position in the fair order and the
    estimated seconds until it gets a slot."""

    acquired: bool
    position: int | None = None
    estimated_wait_seconds: int | None = None
    first_time: bool = False
    rank: int | None = None  # the rank it joined the line with (None: it never waited)

    def as_dict(self) -> dict:
        return {
            "acquired": self.acquired,
            "position": self.position,
            "estimated_wait_seconds": self.estimated_wait_seconds,
            "rank": self.rank,
        }


def rank_of(user_id: str, waiting: list[Waiting], holders: dict[str, dict]) -> int:
    """A joining batch's rank: the slots its user holds + the user's batches already waiting."""
    return sum(h["user_id"] == user_id for h in holders.values()) + sum(w.user_id == user_id for w in waiting)


def fair_order(waiting: list[Waiting]) -> list[Waiting]:
    """The waiting entries in the order slots are granted (see the module docstring)."""
    return sorted(waiting, key=lambda w: (w.rank, w.entry))


def estimate_wait(index: int, limit: int, holders: dict[str, dict], mean_job_s: float, now: float) -> int:
    """Seconds until the entry at `index` (0-based, fair order) gets a slot: every slot frees
    when its job is expected to end (a job runs `mean_job_s`), and each freed slot goes to
    the next entry in order and stays busy another `mean_job_s`."""
    free_at = [max(0.0, mean_job_s - _seconds_since(h["since"], now)) for h in holders.values()]
    free_at += [0.0] * max(0, limit - len(free_at))
    heapq.heapify(free_at)
    start = 0.0
    for _ in range(index + 1):
        start = heapq.heappop(free_at)
        heapq.heappush(free_at, start + mean_job_s)
    return round(start)


class TrainingQueue:
    """Acquire/release against the queue table (a boto3 Table resource)."""

    def __init__(self, table, limit: int, default_job_seconds: float, batches=None):
        if limit < 1:
            raise ValueError("the training concurrency limit must be at least 1")
        self.table = table
        self.limit = limit
        self.default_job_seconds = default_job_seconds
        self.batches = batches  # BatchesTable (stage, place): optional

    # ------------------------------------------------------------------ reads
    def lock(self) -> dict:
        item = self.table.get_item(Key={"queue": SLOTS, "entry": LOCK}, ConsistentRead=True).get("Item")
        return item or {}

    def mean_job_seconds(self) -> float:
        item = self.table.get_item(Key={"queue": SLOTS, "entry": STATS}, ConsistentRead=True).get("Item")
        return (
            float(item["mean_job_seconds"])
            if item and "mean_job_seconds" in item
            else float(self.default_job_seconds)
        )

    def waiting(self) -> list[Waiting]:
        items, start = [], None
        while True:
            kwargs = {"KeyConditionExpression": Key("queue").eq(WAITING), "ConsistentRead": True}
            if start:
                kwargs["ExclusiveStartKey"] = start
            page = self.table.query(**kwargs)
            items += page.get("Items", [])
            start = page.get("LastEvaluatedKey")
            if not start:
                break
        return [
            Waiting(
                i["entry"],
                i["user_id"],
                i["batch_id"],
                i["execution_arn"],
                i["enqueued_at"],
                int(i.get("rank", 0)),
            )
            for i in items
        ]

    def place_of(self, execution_arn: str) -> Place | None:
        """Where an execution stands now (None: neither holding nor waiting)."""
        lock = self.lock()
        holders = lock.get("holders", {})
        if execution_arn in holders:
            return Place(acquired=True)
        order = fair_order(self.waiting())
        for index, item in enumerate(order):
            if item.execution_arn == execution_arn:
                wait = estimate_wait(index, self.limit, holders, self.mean_job_seconds(), time.time())
                return Place(acquired=False, position=index + 1, estimated_wait_seconds=wait)
        return None

    def snapshot(self) -> dict:
        """The whole queue, for operators: holders and the waiting list in grant order."""
        lock = self.lock()
        holders = lock.get("holders", {})
        order = fair_order(self.waiting())
        mean = self.mean_job_seconds()
        now = time.time()
        return {
            "limit": self.limit,
            "running": [{"execution_arn": arn, **h} for arn, h in sorted(holders.items())],
            "waiting": [
                {
                    "position": i + 1,
                    "user_id": w.user_id,
                    "batch_id": w.batch_id,
                    "execution_arn": w.execution_arn,
                    "enqueued_at": w.enqueued_at,
                    "rank": w.rank,
                    "estimated_wait_seconds": estimate_wait(i, self.limit, holders, mean, now),
                }
                for i, w in enumerate(order)
            ],
            "mean_job_seconds": round(mean),
        }

    # ------------------------------------------------------------------ writes
    def _ensure_lock(self) -> None:
        self.table.update_item(
            Key={"queue": SLOTS, "entry": LOCK},
            UpdateExpression="SET #count = if_not_exists(#count, :zero),"
            " holders = if_not_exists(holders, :none)",
            ExpressionAttributeNames={"#count": "count"},
            ExpressionAttributeValues={":zero": 0, ":none": {}},
        )

    def acquire(self, user_id: str, batch_id: str, execution_arn: str) -> Place:
        """Take a slot if this execution is within the free slots of the fair order; else
        join (or stay on) the waiting list. Idempotent: a holder asking again holds."""
        lock = self.lock()
        if not lock:
            self._ensure_lock()
            lock = self.lock()
        holders = lock.get("holders", {})
        if execution_arn in holders:
            return Place(acquired=True)
        waiting = self.waiting()
        mine = next((w for w in waiting if w.execution_arn == execution_arn), None)
        first_time = mine is None
        if mine is None:
            mine, waiting, holders, lock = self._join(user_id, batch_id, execution_arn)
        order = fair_order(waiting)
        index = next(i for i, w in enumerate(order) if w.execution_arn == execution_arn)
        if index < self.limit - int(lock.get("count", 0)) and self._take(mine):
            return Place(acquired=True, first_time=first_time, rank=mine.rank)
        wait = estimate_wait(index, self.limit, holders, self.mean_job_seconds(), time.time())
        return Place(
            acquired=False,
            position=index + 1,
            estimated_wait_seconds=wait,
            first_time=first_time,
            rank=mine.rank,
        )

    def _join(self, user_id: str, batch_id: str, execution_arn: str):
        """Write the waiting entry first, then rank it from what is there after the write: a
        batch of the same user joining at the same moment sees this entry (and this one sees
        it, if it was written earlier), so two batches of one user never both get rank 0. The
        list is read before the lock item: a batch moving from the list to a slot in between
        is counted twice (ranked later), never missed. Until its rank is written the entry
        sorts last (PROVISIONAL_RANK): at worst it waits one more poll."""
        enqueued = now_iso()
        entry = f"{enqueued}#{execution_arn}"
        self.table.put_item(
            Item={
                "queue": WAITING,
                "entry": entry,
                "user_id": user_id,
                "batch_id": batch_id,
                "execution_arn": execution_arn,
                "enqueued_at": enqueued,
                "rank": PROVISIONAL_RANK,
            }
        )
        waiting = self.waiting()
        lock = self.lock()
        holders = lock.get("holders", {})
        rank = sum(h["user_id"] == user_id for h in holders.values()) + sum(
            w.user_id == user_id and w.entry < entry for w in waiting
        )
        self.table.update_item(
            Key={"queue": WAITING, "entry": entry},
            UpdateExpression="SET #rank = :rank",
            ConditionExpression="attribute_exists(execution_arn)",
            ExpressionAttributeNames={"#rank": "rank"},
            ExpressionAttributeValues={":rank": rank},
        )
        mine = Waiting(entry, user_id, batch_id, execution_arn, enqueued, rank)
        return mine, [w for w in waiting if w.entry != entry] + [mine], holders, lock

    def _take(self, mine: Waiting) -> bool:
        """One transaction: count < limit and not yet a holder -> count + 1, holder added,
        waiting entry deleted. False when another execution won the slot meanwhile."""
        client = self.table.meta.client
        try:
            client.transact_write_items(
                TransactItems=[
                    {
                        "Update": {
                            "TableName": self.table.name,
                            "Key": {"queue": SLOTS, "entry": LOCK},
                            "UpdateExpression": "SET #count = #count + :one, holders.#me = :holder",
                            "ConditionExpression": "#count < :limit AND attribute_not_exists(holders.#me)",
                            "ExpressionAttributeNames": {"#count": "count", "#me": mine.execution_arn},
                            "ExpressionAttributeValues": {
                                ":one": 1,
                                ":limit": self.limit,
                                ":holder": {
                                    "user_id": mine.user_id,
                                    "batch_id": mine.batch_id,
                                    "since": now_iso(),
                                },
                            },
                        }
                    },
                    {
                        "Delete": {
                            "TableName": self.table.name,
                            "Key": {"queue": WAITING, "entry": mine.entry},
                            "ConditionExpression": "attribute_exists(execution_arn)",
                        }
                    },
                ]
            )
        except ClientError as err:
            if err.response["Error"]["Code"] == "TransactionCanceledException":
                return False
            raise
        return True

    def release(self, execution_arn: str, trained: bool = False) -> dict:
        """Free the execution's slot and drop it from the waiting list; both are no-ops
        when already done, so the workflow's own release and the cleanup rule may both run.
        A job that trained updates the moving average behind the wait estimates."""
        released, since = False, None
        holder = self.lock().get("holders", {}).get(execution_arn)
        if holder:
            since = holder.get("since")
            try:
                self.table.update_item(
                    Key={"queue": SLOTS, "entry": LOCK},
                    UpdateExpression="SET #count = #count - :one REMOVE holders.#me",
                    ConditionExpression="attribute_exists(holders.#me)",
                    ExpressionAttributeNames={"#count": "count", "#me": execution_arn},
                    ExpressionAttributeValues={":one": 1},
                )
                released = True
            except ClientError as err:
                if err.response["Error"]["Code"] != "ConditionalCheckFailedException":
                    raise
        dropped = 0
        for item in self.waiting():
            if item.execution_arn == execution_arn:
                self.table.delete_item(Key={"queue": WAITING, "entry": item.entry})
                dropped += 1
        if released and trained and since:
            self._record_duration(_seconds_since(since, time.time()))
        return {"released": released, "dropped_waiting": dropped}

    def _record_duration(self, seconds: float) -> None:
        mean = self.mean_job_seconds()
        item = self.table.get_item(Key={"queue": SLOTS, "entry": STATS}).get("Item")
        new = seconds if not item else (1 - ESTIMATE_WEIGHT) * mean + ESTIMATE_WEIGHT * seconds
        self.table.update_item(
            Key={"queue": SLOTS, "entry": STATS},
            UpdateExpression="SET mean_job_seconds = :mean ADD jobs :one",
            ExpressionAttributeValues={":mean": Decimal(str(round(float(new), 3))), ":one": 1},
        )
