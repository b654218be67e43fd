"""The training capacity queue: a DynamoDB semaphore with a fair waiting list, woken by
task tokens instead of polls.

AWS's published Step Functions concurrency-control pattern keeps one lock item whose count
may only grow while it is below the limit (a conditional UpdateItem), with the holding
execution's id as an attribute so a release removes exactly that holder and a cleanup path
(EventBridge "Step Functions Execution Status Change" FAILED/TIMED_OUT/ABORTED -> release)
frees the slot of an execution that died without releasing. The pattern's waiters poll
(Wait, ask again); a plain semaphore is also unfair: whoever polls first after a release
wins, so one user's tenth batch can overtake another user's first. Here:

* Waiting executions are items of an ordered waiting list, and a free slot goes to the head
  of the *fair order*:

    rank(entry) = the slots its user held + the user's entries already waiting, when it joined;
    order       = by (rank, enqueued_at).

  So every user's first batch goes before anyone's second (round-robin across users), and
  within a rank the earlier arrival goes first. The rank is fixed when the batch joins: a
  user's second batch stays behind other users' first ones even after the user's first has
  finished (recomputing it then would let it jump back ahead of batches that came later but
  are someone's first). The price: in sustained overload a second batch waits until no first
  batch is waiting (docs/architecture.md, "Training queue").
* Nobody polls. A waiting execution sits in a `.waitForTaskToken` task; its entry holds the
  token. Whoever changes the queue (a batch joining, a slot released) then *dispatches*:
  while a slot is free, take it for the head of the fair order (one transaction: the lock's
  `count < limit` and the head's waiting entry deleted) and hand the grant to that execution
  (`deliver`: SendTaskSuccess). Each joining or releasing call dispatches after its own
  write, so a free slot with someone waiting never outlives the last call that saw it: a
  join that a releaser's read missed sees the freed count itself, and two dispatchers that
  race for one head lose nothing (the loser's transaction fails and it looks again).
* A grant that cannot be delivered is not lost. `deliver` says what became of it:
  DELIVERED; RECHECK (the token expired: the execution is alive and asks again, as every
  waiter does after QueueRecheckSeconds, and finds itself a holder: granted at once); ENDED
  (the execution is over: its slot is released here and the next head dispatched).

The limit stays exact under races: a slot only changes hands in a transaction whose
condition is `count < limit`.

Table (TrainingQueueTable, keys `queue` + `entry`):
  queue "slots",   entry "lock":  count, holders {execution_arn: {user_id, batch_id, since,
                                  rank, enqueued_at, ranked_at, decided_at}}
  queue "slots",   entry "stats": mean_job_seconds (moving average of finished jobs), jobs
  queue "waiting", entry "<execution_arn>": user_id, batch_id, execution_arn, enqueued_at,
                   rank, ranked_at, task_token, training_job
The waiting list is one partition read with a consistent Query (small items: thousands fit
a few pages), never an eventually consistent index; only a join (its rank) and a dispatch
that found a free slot read it.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum

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
    task_token: str = ""
    training_job: str = ""
    ranked_at: str = ""


class Delivery(Enum):
    """What became of a grant handed to a waiting execution (see the module docstring)."""

    DELIVERED = "delivered"
    RECHECK = "recheck"  # token expired; the execution asks again and finds its slot
    ENDED = "ended"  # the execution is over: release the slot


@dataclass(frozen=True)
class Grant:
    """A slot taken for a waiting execution; `output` is what its AcquireSlot task returns."""

    waiting: Waiting
    decided_at: str  # when the waiting list it was chosen from was read
    granted_at: str

    @property
    def output(self) -> dict:
        return {
            "acquired": True,
            "rank": self.waiting.rank,
            "enqueued_at": self.waiting.enqueued_at,
            "ranked_at": self.waiting.ranked_at,
            "decided_at": self.decided_at,
            "granted_at": self.granted_at,
        }


Deliver = Callable[[Grant], Delivery]


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


def rank_of(user_id: str, earlier: list[Waiting], holders: dict[str, dict]) -> int:
    """A joining batch's rank: the slots its user holds + the user's batches already waiting
    (`earlier`: the entries in line before it; a batch read in both, having just moved from
    the line to a slot, counts once), and never below the rank of one of the user's earlier
    batches still in line (one of theirs may have left the line since they were ranked): a
    user's batches keep their order."""
    mine = [w for w in earlier if w.user_id == user_id]
    rank = len({arn for arn, h in holders.items() if h["user_id"] == user_id} | {w.entry for w in mine})
    return max([rank, *(w.rank for w in mine if w.rank != PROVISIONAL_RANK)])


def fair_order(waiting: list[Waiting]) -> list[Waiting]:
    """The waiting entries in the order slots are granted (see the module docstring)."""
    return sorted(waiting, key=lambda w: (w.rank, w.enqueued_at, w.entry))


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


def _as_waiting(item: dict) -> Waiting:
    return Waiting(item["entry"], item["user_id"], item["batch_id"], item["execution_arn"],
                   item["enqueued_at"], int(item.get("rank", 0)), item.get("task_token", ""),
                   item.get("training_job", ""), item.get("ranked_at", ""))


def _refused(err: ClientError, code: str) -> bool:
    return err.response["Error"]["Code"] == code


class TrainingQueue:
    """Acquire/release/dispatch against the queue table (a boto3 Table resource). `deliver`
    hands a grant to its execution (the function's SendTaskSuccess); readers (the API's
    place, the operator CLI) leave it out."""

    def __init__(self, table, limit: int, default_job_seconds: float, batches=None,
                 deliver: Deliver | None = None):
        if limit < 1:
            raise ValueError("the training concurrency limit must be at least 1")
        self.table = table
        self.limit = limit
        self.default_job_seconds = default_job_seconds
        self.batches = batches  # BatchesTable (stage, place): optional
        self.deliver = deliver

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

    def waiting_entry(self, execution_arn: str) -> Waiting | None:
        """The execution's own waiting entry (one consistent GetItem), None when not waiting."""
        item = self.table.get_item(Key={"queue": WAITING, "entry": execution_arn}, ConsistentRead=True).get(
            "Item")
        return _as_waiting(item) if item else None

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
        return [_as_waiting(i) for i in items]

    def _place(self, execution_arn: str, waiting: list[Waiting], holders: dict[str, dict]) -> Place | None:
        for index, item in enumerate(fair_order(waiting)):
            if item.execution_arn == execution_arn:
                wait = estimate_wait(index, self.limit, holders, self.mean_job_seconds(), time.time())
                return Place(acquired=False, position=index + 1, estimated_wait_seconds=wait, rank=item.rank)
        return None

    def place_of(self, execution_arn: str) -> Place | None:
        """Where an execution stands now (None: neither holding nor waiting)."""
        holders = self.lock().get("holders", {})
        if execution_arn in holders:
            return Place(acquired=True)
        return self._place(execution_arn, self.waiting(), holders)

    def snapshot(self) -> dict:
        """The whole queue, for operators: holders and the waiting list in grant order
        (never the task tokens: whoever holds one can resume the execution)."""
        holders = self.lock().get("holders", {})
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
    def _ensure_lock(self) -> dict:
        lock = self.lock()
        if lock:
            return lock
        self.table.update_item(
            Key={"queue": SLOTS, "entry": LOCK},
            UpdateExpression="SET #count = if_not_exists(#count, :zero),"
            " holders = if_not_exists(holders, :none)",
            ExpressionAttributeNames={"#count": "count"},
            ExpressionAttributeValues={":zero": 0, ":none": {}},
        )
        return self.lock()

    def _deliver(self, grant: Grant) -> Delivery:
        if self.deliver is None:
            raise RuntimeError("this TrainingQueue only reads: it was made without a deliver function")
        return self.deliver(grant)

    def acquire(self, user_id: str, batch_id: str, execution_arn: str, task_token: str,
                training_job: str = "", _retried: bool = False) -> Place:
        """Join the waiting list with this task token (or, asking again after a recheck
        timeout, renew the token), then dispatch. Returns acquired when the slot came to this
        execution (its grant is delivered to `task_token` like any other); otherwise, on the
        first call, its place and estimated wait (the queued email)."""
        # Its own entry first, then the lock: a dispatcher that takes the entry between the two
        # reads shows in the lock as this execution's slot (read the other way round, the
        # execution would see neither and join the line a second time while holding a slot).
        mine = self.waiting_entry(execution_arn)
        holder = self._ensure_lock().get("holders", {}).get(execution_arn)
        if holder:
            # It holds a slot whose grant it never received (an expired token): hand it over.
            held = Waiting(execution_arn, user_id, batch_id, execution_arn,
                           holder.get("enqueued_at", holder["since"]), int(holder.get("rank", 0)), task_token,
                           training_job, holder.get("ranked_at", ""))
            grant = Grant(held, holder.get("decided_at", holder["since"]), holder["since"])
            if self._deliver(grant) is Delivery.ENDED:
                self._release_slot(execution_arn)
                self.dispatch()
            return Place(acquired=True)
        first_time = mine is None
        if mine is None:
            mine, waiting, holders = self._join(user_id, batch_id, execution_arn, task_token, training_job)
        elif not self._renew_token(mine, task_token) and not _retried:
            # The entry left the line between the read and the renewal: a dispatcher granted it
            # (to the old token, which is refused now: the slot is ours, hand it over) or the
            # cleanup dropped it. Ask once more: holder or newcomer.
            return self.acquire(user_id, batch_id, execution_arn, task_token, training_job, _retried=True)
        granted = self.dispatch()
        if execution_arn in granted:
            return Place(acquired=True, first_time=first_time, rank=mine.rank)
        if not first_time:
            return Place(acquired=False, rank=mine.rank)  # the API computes the place on demand
        place = self._place(execution_arn, waiting, holders)
        if place is None:  # granted by another dispatcher meanwhile
            return Place(acquired=True, first_time=True, rank=mine.rank)
        return Place(False, place.position, place.estimated_wait_seconds, first_time=True, rank=mine.rank)

    def _join(self, user_id: str, batch_id: str, execution_arn: str, task_token: str, training_job: str):
        """Write the waiting entry first, then rank it from what is there after the write: a
        batch of the same user joining at the same moment sees this entry (and this one sees
        it, if it was written earlier), so two batches of one user never both get rank 0. The
        list is read before the lock item: a batch moving from the list to a slot in between
        is counted twice (ranked later), never missed. Until its rank is written the entry
        sorts last (PROVISIONAL_RANK). The write is conditional: a retried call (the same
        task invoked again) keeps the first arrival time."""
        enqueued = now_iso()
        entry = execution_arn
        try:
            self.table.put_item(
                Item={
                    "queue": WAITING,
                    "entry": entry,
                    "user_id": user_id,
                    "batch_id": batch_id,
                    "execution_arn": execution_arn,
                    "enqueued_at": enqueued,
                    "rank": PROVISIONAL_RANK,
                    "task_token": task_token,
                    "training_job": training_job,
                },
                ConditionExpression="attribute_not_exists(execution_arn)",
            )
        except ClientError as err:
            if not _refused(err, "ConditionalCheckFailedException"):
                raise
        waiting = self.waiting()
        holders = self.lock().get("holders", {})
        mine_now = next((w for w in waiting if w.entry == entry), None)
        if mine_now is not None:
            enqueued = mine_now.enqueued_at
        rank = rank_of(user_id, [w for w in waiting if (w.enqueued_at, w.entry) < (enqueued, entry)], holders)
        if mine_now is not None and mine_now.rank != PROVISIONAL_RANK:
            rank = mine_now.rank  # already ranked by the earlier call: the rank is fixed at joining
        ranked_at = now_iso()
        try:
            self.table.update_item(
                Key={"queue": WAITING, "entry": entry},
                UpdateExpression="SET #rank = :rank, ranked_at = if_not_exists(ranked_at, :at),"
                " task_token = :token",
                ConditionExpression="attribute_exists(execution_arn)",
                ExpressionAttributeNames={"#rank": "rank"},
                ExpressionAttributeValues={":rank": rank, ":at": ranked_at, ":token": task_token},
            )
        except ClientError as err:
            if not _refused(err, "ConditionalCheckFailedException"):
                raise
            # Granted (or dropped) between the write and the ranking: the dispatch that took it
            # delivered the grant, or the cleanup removed it.
        mine = Waiting(entry, user_id, batch_id, execution_arn, enqueued, rank, task_token, training_job,
                       ranked_at)
        return mine, [w for w in waiting if w.entry != entry] + [mine], holders

    def _renew_token(self, mine: Waiting, task_token: str) -> bool:
        """An execution asking again (its wait timed out) waits on a new task token. False:
        its entry is no longer in line."""
        try:
            self.table.update_item(
                Key={"queue": WAITING, "entry": mine.entry},
                UpdateExpression="SET task_token = :token",
                ConditionExpression="attribute_exists(execution_arn)",
                ExpressionAttributeValues={":token": task_token},
            )
        except ClientError as err:
            if not _refused(err, "ConditionalCheckFailedException"):
                raise
            return False
        return True

    def dispatch(self) -> list[str]:
        """While a slot is free and someone waits: take the slot for the head of the fair
        order and deliver the grant. Returns the execution ARNs granted. Bounded: every
        round either grants, or lost a race that someone else's round won."""
        granted: list[str] = []
        for _ in range(4 * self.limit + 8):
            if int(self.lock().get("count", 0)) >= self.limit:
                break
            decided_at = now_iso()
            waiting = self.waiting()
            if not waiting:
                break
            head = fair_order(waiting)[0]
            grant = self._take(head, decided_at)
            if grant is None:
                continue  # another dispatcher took it (or the slot) first: look again
            granted.append(head.execution_arn)
            if self._deliver(grant) is Delivery.ENDED:
                self._release_slot(head.execution_arn)
        return granted

    def _take(self, head: Waiting, decided_at: str) -> Grant | None:
        """One transaction: count < limit and not yet a holder -> count + 1, holder added,
        waiting entry (still with the token read) deleted. None when another dispatcher won the
        slot or the entry, or the execution renewed its token."""
        granted_at = now_iso()
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
                            "ExpressionAttributeNames": {"#count": "count", "#me": head.execution_arn},
                            "ExpressionAttributeValues": {
                                ":one": 1,
                                ":limit": self.limit,
                                ":holder": {"user_id": head.user_id, "batch_id": head.batch_id,
                                            "since": granted_at, "rank": head.rank,
                                            "enqueued_at": head.enqueued_at, "ranked_at": head.ranked_at,
                                            "decided_at": decided_at},
                            },
                        }
                    },
                    {
                        # The token read must still be the one it waits on: an execution that
                        # asked again meanwhile is granted on its new token (the next round).
                        "Delete": {
                            "TableName": self.table.name,
                            "Key": {"queue": WAITING, "entry": head.entry},
                            "ConditionExpression": "attribute_exists(execution_arn) AND task_token = :token",
                            "ExpressionAttributeValues": {":token": head.task_token},
                        }
                    },
                ]
            )
        except ClientError as err:
            if _refused(err, "TransactionCanceledException"):
                return None
            raise
        return Grant(head, decided_at, granted_at)

    def _release_slot(self, execution_arn: str) -> tuple[bool, str | None]:
        holder = self.lock().get("holders", {}).get(execution_arn)
        if not holder:
            return False, None
        try:
            self.table.update_item(
                Key={"queue": SLOTS, "entry": LOCK},
                UpdateExpression="SET #count = #count - :one REMOVE holders.#me",
                ConditionExpression="attribute_exists(holders.#me)",
                ExpressionAttributeNames={"#count": "count", "#me": execution_arn},
                ExpressionAttributeValues={":one": 1},
            )
        except ClientError as err:
            if _refused(err, "ConditionalCheckFailedException"):
                return False, None
            raise
        return True, holder.get("since")

    def release(self, execution_arn: str, trained: bool = False) -> dict:
        """Free the execution's slot and drop it from the waiting list (both no-ops when
        already done, so the workflow's own release and the cleanup rule may both run), then
        hand the freed slot on. A job that trained updates the moving average behind the wait
        estimates."""
        released, since = self._release_slot(execution_arn)
        old = self.table.delete_item(Key={"queue": WAITING, "entry": execution_arn}, ReturnValues="ALL_OLD")
        dropped = 1 if old.get("Attributes") else 0
        if released and trained and since:
            self._record_duration(_seconds_since(since, time.time()))
        granted = self.dispatch() if self.deliver is not None else []
        return {"released": released, "dropped_waiting": dropped, "granted": len(granted)}

    def _record_duration(self, seconds: float) -> None:
        mean = self.mean_job_seconds()
        item = self.table.get_item(Key={"queue": SLOTS, "entry": STATS}).get("Item")
        new = seconds if not item else (1 - ESTIMATE_WEIGHT) * mean + ESTIMATE_WEIGHT * seconds
        self.table.update_item(
            Key={"queue": SLOTS, "entry": STATS},
            UpdateExpression="SET mean_job_seconds = :mean ADD jobs :one",
            ExpressionAttributeValues={":mean": Decimal(str(round(float(new), 3))), ":one": 1},
        )
