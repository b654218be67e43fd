"""The training capacity queue (functions/training_queue, avatarflow.training_queue), one call
at a time (unit tier: template-built stack, the function run as Lambda with its role): the
semaphore, its fair order, grants handed to the waiting task's token (SendTaskSuccess,
recorded here; the real state machine resuming on them is tests/test_queue_workflow.py), a
grant whose token went stale, the cleanup rule, and what a join costs."""

import json
import time

import boto3
import pytest
import unit_stack
from botocore.exceptions import ClientError

from avatarflow import notifications
from avatarflow.training_queue import (
    PROVISIONAL_RANK,
    Delivery,
    TrainingQueue,
    Waiting,
    estimate_wait,
    fair_order,
    rank_of,
)
from avatarflow_local.event_sources import execution_status_event, matches
from avatarflow_local.workflow_stack import ACCOUNT, REGION

module_stack, stack = unit_stack.module_stack, unit_stack.stack  # one stack per module, emptied per test

MACHINE = f"arn:aws:states:{REGION}:{ACCOUNT}:stateMachine:avatarflow-local-train-avatar"


def _arn(name: str) -> str:
    return MACHINE.replace(":stateMachine:", ":execution:") + ":" + name


def _join(waiting: list[Waiting], n: int, user: str, holders: dict | None = None) -> list[Waiting]:
    rank = rank_of(user, waiting, holders or {})
    entry = f"2026-01-01T00:00:{n:02d}#{user}{n}"
    return [*waiting, Waiting(entry, user, f"b{n}", _arn(f"{user}{n}"), "", rank)]


# --------------------------------------------------------------------------- the order, on paper
def test_fair_order_puts_every_users_first_batch_before_anyones_second():
    waiting: list[Waiting] = []
    for n, user in enumerate(("ann", "ann", "ann", "bob", "cy"), start=1):
        waiting = _join(waiting, n, user)
    order = [(w.user_id, w.batch_id) for w in fair_order(waiting)]
    assert order == [("ann", "b1"), ("bob", "b4"), ("cy", "b5"), ("ann", "b2"), ("ann", "b3")]
    # ann's first leaves the line (granted): her second still waits behind bob's and cy's first.
    assert [w.user_id for w in fair_order(waiting[1:])] == ["bob", "cy", "ann", "ann"]
    # A user already training counts: bob's first waiting batch goes before ann's, who holds a slot.
    holders = {_arn("x"): {"user_id": "ann", "batch_id": "b0", "since": "2026-01-01T00:00:00+00:00"}}
    assert [w.user_id for w in fair_order(_join(_join([], 1, "ann", holders), 2, "bob", holders))] == [
        "bob", "ann"]


def test_a_rank_counts_a_batch_read_twice_once_and_keeps_a_users_batches_in_order():
    # ann's b1 moved from the line to a slot between the two reads of a joining batch: once.
    b1 = Waiting(_arn("ann1"), "ann", "b1", _arn("ann1"), "2026-01-01T00:00:01", 0)
    holders = {_arn("ann1"): {"user_id": "ann", "batch_id": "b1", "since": "2026-01-01T00:00:02+00:00"}}
    assert rank_of("ann", [b1], holders) == 1
    # ann's b2 joined with rank 2 (b0 training, b1 waiting); b1 then failed and left the line and
    # b0 finished: b3 counts one batch ahead of it but must not overtake b2.
    b2 = Waiting(_arn("ann2"), "ann", "b2", _arn("ann2"), "2026-01-01T00:00:03", 2)
    assert rank_of("ann", [b2], {}) == 2
    assert [w.batch_id for w in fair_order([b2, Waiting(_arn("ann3"), "ann", "b3", _arn("ann3"),
                                                        "2026-01-01T00:00:04", rank_of("ann", [b2], {}))])] \
        == ["b2", "b3"]
    assert rank_of("bob", [b2], holders) == 0  # other users' batches never count


def test_estimated_wait_follows_the_slots_as_they_free():
    now = float(int(time.time()))
    since = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now - 100))
    holders = {"a": {"user_id": "u", "since": since}, "b": {"user_id": "v", "since": since}}
    # Two slots, both 100 s into 600 s jobs: first in line waits ~500 s, second too, third ~1100 s.
    assert [estimate_wait(i, 2, holders, 600, now) for i in range(3)] == [500, 500, 1100]
    assert estimate_wait(0, 3, holders, 600, now) == 0  # a free slot


# --------------------------------------------------------------------------- one call at a time
def _token(user, batch):
    return f"token-{user}-{batch}"


def _acquire(stack, user, batch, token=None):
    return stack.call("training_queue", {"action": "acquire", "user_id": user, "batch_id": batch,
                                         "execution_arn": _arn(f"{user}-{batch}"),
                                         "training_job": f"avatar-{user}-{batch}",
                                         "task_token": token or _token(user, batch)})


def _release(stack, user, batch, outcome="trained"):
    return stack.call("training_queue", {"action": "release", "outcome": outcome, "user_id": user,
                                         "batch_id": batch, "execution_arn": _arn(f"{user}-{batch}")})


def _batch(stack, user, batch):
    table = boto3.resource("dynamodb").Table(stack.resources.physical["BatchesTable"]["Ref"])
    return table.get_item(Key={"user_id": user, "batch_id": batch}).get("Item")


class Grants:
    """The function's SendTaskSuccess calls, recorded (the unit tier runs no executions):
    `delivered` lists (token, output). A token in `stale` is answered as Step Functions
    answers a token nobody waits on any more; DescribeExecution then reports
    `statuses[execution_arn]`, or asks moto (as the function's role: IAM enforced), which
    knows no such execution."""

    def __init__(self, sfn):
        self.delivered: list[tuple[str, dict]] = []
        self.stale: set[str] = set()
        self.statuses: dict[str, str] = {}
        self.described: list[str] = []
        self._describe = sfn.describe_execution

    def send_task_success(self, taskToken, output):  # noqa: N803 - boto3's parameter names
        if taskToken in self.stale:
            raise ClientError({"Error": {"Code": "TaskTimedOut", "Message": "Task Timed Out"}},
                              "SendTaskSuccess")
        self.delivered.append((taskToken, json.loads(output)))
        return {}

    def describe_execution(self, executionArn):  # noqa: N803
        self.described.append(executionArn)
        if executionArn in self.statuses:
            return {"executionArn": executionArn, "status": self.statuses[executionArn]}
        return self._describe(executionArn=executionArn)

    def tokens(self) -> list[str]:
        return [token for token, _ in self.delivered]


@pytest.fixture
def grants(stack, monkeypatch):
    sfn = stack.module("training_queue").aws().sfn
    recorder = Grants(sfn)
    monkeypatch.setattr(sfn, "send_task_success", recorder.send_task_success)
    monkeypatch.setattr(sfn, "describe_execution", recorder.describe_execution)
    return recorder


def test_the_limit_holds_and_a_release_hands_the_slot_to_the_next(stack, grants):
    # TrainingConcurrency's default (2) reaches the function through its template environment.
    assert stack.hook.specs["training_queue"].environment["TRAINING_CONCURRENCY"] == "2"
    assert _acquire(stack, "ann", "b1")["acquired"] is True
    assert _acquire(stack, "bob", "b1")["acquired"] is True
    assert grants.tokens() == [_token("ann", "b1"), _token("bob", "b1")]  # each resumed by its grant
    third = _acquire(stack, "cy", "b1")
    assert third["acquired"] is False and third["position"] == 1 and third["estimated_wait_seconds"] > 0
    assert _batch(stack, "cy", "b1")["stage"] == "queued" and len(grants.delivered) == 2
    assert _release(stack, "ann", "b1") == {"released": True, "dropped_waiting": 0, "granted": 1}
    # The release resumed cy's waiting task at once: nobody polls.
    token, output = grants.delivered[-1]
    assert token == _token("cy", "b1") and output["acquired"] is True and output["rank"] == 0
    assert _batch(stack, "cy", "b1")["stage"] == "training"
    assert _batch(stack, "cy", "b1")["training_job"] == "avatar-cy-b1"
    assert _batch(stack, "ann", "b1")["stage"] == "registering"
    assert _release(stack, "ann", "b1") == {"released": False, "dropped_waiting": 0, "granted": 0}
    # A holder asking again (its task timed out before the grant arrived) is handed it at once.
    assert _acquire(stack, "cy", "b1", token="token-cy-b1-again")["acquired"] is True
    assert grants.tokens()[-1] == "token-cy-b1-again"
    assert _acquire(stack, "dan", "b1")["acquired"] is False  # still two holders: bob and cy


def test_a_free_slot_goes_to_the_head_of_the_fair_order_not_to_whoever_asks(stack, grants):
    for user in ("ann", "bob"):
        assert _acquire(stack, user, "b1")["acquired"] is True
    assert _acquire(stack, "ann", "b2")["position"] == 1  # ann's second, first in line for now
    assert _acquire(stack, "cy", "b1")["position"] == 1  # cy's first goes ahead of ann's second
    _release(stack, "bob", "b1")
    assert grants.tokens()[-1] == _token("cy", "b1")
    # ann's second asking again (a recheck) is still not first: the slot is taken.
    assert _acquire(stack, "ann", "b2", token="token-ann-b2-again") == {
        "acquired": False, "position": None, "estimated_wait_seconds": None, "rank": 1}
    _release(stack, "ann", "b1")
    assert grants.tokens()[-1] == "token-ann-b2-again"  # the renewed token gets the grant


def test_a_stale_token_keeps_the_slot_for_a_running_execution_and_frees_it_for_an_ended_one(stack, grants):
    _acquire(stack, "ann", "b1")
    _acquire(stack, "bob", "b1")
    _acquire(stack, "cy", "b1")  # waits
    _acquire(stack, "dan", "b1")  # waits behind cy
    # cy's task timed out just as the slot freed (it is RUNNING and will ask again): the slot stays
    # cy's, and cy's next ask is granted at once; dan still waits.
    grants.stale, grants.statuses = {_token("cy", "b1")}, {_arn("cy-b1"): "RUNNING"}
    assert _release(stack, "ann", "b1")["granted"] == 1
    queue = TrainingQueue(boto3.resource("dynamodb").Table(
        stack.resources.physical["TrainingQueueTable"]["Ref"]), 2, 600)
    assert _arn("cy-b1") in queue.lock()["holders"] and _token("cy", "b1") not in grants.tokens()
    assert _acquire(stack, "cy", "b1", token="token-cy-b1-2")["acquired"] is True
    assert grants.tokens()[-1] == "token-cy-b1-2"
    # dan's execution ended while waiting and its cleanup event has not arrived yet (here it is
    # gone altogether: moto's ExecutionDoesNotExist, asked as the function's role): the grant
    # gives the slot back and hands it to the next (eve).
    _acquire(stack, "eve", "b1")
    grants.stale, grants.statuses = {_token("dan", "b1")}, {}
    assert _release(stack, "bob", "b1")["granted"] == 2
    assert grants.described == [_arn("cy-b1"), _arn("dan-b1")]
    role = stack.hook.specs["training_queue"].role_arn.rsplit("/", 1)[1]
    assert (role, "states:DescribeExecution") in stack.enforcer.allowed
    assert grants.tokens()[-1] == _token("eve", "b1")
    assert set(queue.lock()["holders"]) == {_arn("cy-b1"), _arn("eve-b1")}
    assert queue.snapshot()["waiting"] == []


def test_the_cleanup_rule_frees_a_stopped_execution_and_drops_a_waiting_one(stack, grants):
    for user in ("ann", "bob", "cy", "dan"):
        _acquire(stack, user, "b1")

    def status_event(user, status):
        return {"version": "0", "id": "1", "detail-type": "Step Functions Execution Status Change",
                "source": "aws.states", "account": ACCOUNT, "region": REGION, "time": "2026-01-01T00:00:00Z",
                "resources": [_arn(f"{user}-b1")],
                "detail": {"executionArn": _arn(f"{user}-b1"), "stateMachineArn": MACHINE, "status": status,
                           "name": f"{user}-b1", "input": json.dumps({"user_id": user, "batch_id": "b1"})}}

    assert stack.call("training_queue", status_event("ann", "RUNNING")) == {
        "released": False, "dropped_waiting": 0, "granted": 0}
    assert stack.call("training_queue", status_event("cy", "TIMED_OUT")) == {
        "released": False, "dropped_waiting": 1, "granted": 0}
    assert stack.call("training_queue", status_event("ann", "ABORTED")) == {
        "released": True, "dropped_waiting": 0, "granted": 1}
    assert grants.tokens()[-1] == _token("dan", "b1")  # cy left the line: dan was next
    assert _batch(stack, "ann", "b1")["stage"] == "failed" and _batch(stack, "cy", "b1")["stage"] == "failed"
    other = status_event("bob", "FAILED")
    other["detail"]["stateMachineArn"] = MACHINE + "-other"
    with pytest.raises(ValueError, match="another state machine"):
        stack.call("training_queue", other)


def test_bad_calls_are_refused_with_a_reason(stack, grants):
    good = {"action": "acquire", "user_id": "ann", "batch_id": "b1", "execution_arn": _arn("ann-b1"),
            "training_job": "avatar-1", "task_token": "t"}
    for change, reason in (({"task_token": ""}, "task_token"), ({"task_token": "x" * 1025}, "task_token"),
                           ({"execution_arn": "arn:aws:s3:::bucket"}, "execution_arn"),
                           ({"user_id": "../eve"}, "user_id"), ({"action": "grab"}, "action")):
        with pytest.raises(ValueError, match=reason):
            stack.call("training_queue", {**good, **change})
    assert grants.delivered == [] and _batch(stack, "ann", "b1") is None


def test_the_template_rule_matches_only_executions_that_end_without_releasing(stack):
    (rule,) = [s for s in stack.resources.event_sources if s.kind == "EventBridge"]
    assert rule.function == "training_queue"
    start = {"startDate": __import__("datetime").datetime(2026, 1, 1, tzinfo=__import__("datetime").UTC)}

    def event(status, machine=MACHINE):
        return execution_status_event({"executionArn": _arn("x")}, {
            **start, "stateMachineArn": machine, "name": "x", "status": status, "input": "{}"})

    assert [s for s in ("RUNNING", "SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED")
            if matches(rule.pattern, event(s))] == ["FAILED", "TIMED_OUT", "ABORTED"]
    assert not matches(rule.pattern, event("ABORTED", MACHINE + "-other"))


def test_the_queued_email_gives_place_and_wait_in_plain_words():
    text = notifications.queued("ann", "b7", 3, 1500)
    assert "batch b7" in text["subject"] and "place 3 in line" in text["message"]
    assert "about 25 minutes" in text["message"] and "GET /users/ann/batches/b7" in text["message"]
    assert "about 3 hours" in notifications.queued("ann", "b7", 40, 3 * 3600)["message"]


def _queue(stack, limit, delivered):
    table = boto3.resource("dynamodb").Table(stack.resources.physical["TrainingQueueTable"]["Ref"])

    def deliver(grant):
        delivered.append(grant.waiting.execution_arn)
        return Delivery.DELIVERED

    return TrainingQueue(table, limit, 600, deliver=deliver)


def test_two_batches_of_one_user_joining_at_once_never_both_rank_first(stack):
    """The race the workflow test once lost: ann's b1 has written its waiting entry but not yet
    ranked it (another Lambda, mid-call) when b2 joins. b2 must count b1; b1, ranking itself
    after, must not count b2 (b2's entry is later)."""
    delivered: list[str] = []
    queue = _queue(stack, 1, delivered)
    assert queue.acquire("zed", "b0", _arn("zed-b0"), "t0").acquired  # the one slot is taken
    queue.table.put_item(Item={"queue": "waiting", "entry": _arn("ann-b1"),
                               "user_id": "ann", "batch_id": "b1", "execution_arn": _arn("ann-b1"),
                               "enqueued_at": "2000-01-01T00:00:00.000+00:00", "rank": PROVISIONAL_RANK})
    assert queue.acquire("ann", "b2", _arn("ann-b2"), "t2").rank == 1
    assert queue.acquire("bob", "b1", _arn("bob-b1"), "t3").rank == 0
    # bob's first goes before ann's second; ann's first (still provisional) sorts last for now.
    assert [w.execution_arn for w in fair_order(queue.waiting())][:2] == [_arn("bob-b1"), _arn("ann-b2")]
    assert delivered == [_arn("zed-b0")]


def test_a_join_with_every_slot_taken_reads_the_list_once_and_takes_nothing(stack):
    """~200 batches join in a burst: a join costs one list read (its rank and place) and a
    dispatch that finds no free slot stops at the lock item. Counted at the client."""
    delivered: list[str] = []
    queue = _queue(stack, 1, delivered)
    calls: list[str] = []
    queue.table.meta.client.meta.events.register("before-call.dynamodb",
                                                 lambda model, **_: calls.append(model.name))
    assert queue.acquire("zed", "b0", _arn("zed-b0"), "t0").acquired
    queue.acquire("ann", "b1", _arn("ann-b1"), "t1")
    calls.clear()
    place = queue.acquire("bob", "b1", _arn("bob-b1"), "t2")
    assert (place.acquired, place.position, place.first_time) == (False, 2, True)
    assert calls.count("Query") == 1 and "TransactWriteItems" not in calls
    assert queue.place_of(_arn("bob-b1")).position == 2  # the API's place, computed on demand
    # A release hands the slot to the head (ann) in the same call; bob's own release drops him.
    assert queue.release(_arn("zed-b0"), trained=True) == {
        "released": True, "dropped_waiting": 0, "granted": 1}
    assert delivered == [_arn("zed-b0"), _arn("ann-b1")]
    assert queue.release(_arn("bob-b1")) == {"released": False, "dropped_waiting": 1, "granted": 0}
    assert queue.snapshot()["waiting"] == [] and queue.mean_job_seconds() < 600


def test_a_token_renewed_under_a_dispatcher_is_the_one_granted(stack):
    """The races of an execution asking again (its wait timed out) while a dispatcher works:
    a slot is only taken with the token it was read with, and an execution whose entry left
    the line just before its renewal, or just before its read, finds itself a holder and gets
    the grant on its new token (never a second place in line)."""
    delivered: list[str] = []
    tokens: list[str] = []
    queue = _queue(stack, 1, delivered)
    queue.deliver = lambda grant: tokens.append(grant.waiting.task_token) or Delivery.DELIVERED
    assert queue.acquire("zed", "b0", _arn("zed-b0"), "z1").acquired
    queue.acquire("ann", "b1", _arn("ann-b1"), "old")
    read = queue.waiting_entry(_arn("ann-b1"))  # a dispatcher reads ann's entry (token "old") ...
    queue.acquire("ann", "b1", _arn("ann-b1"), "new")  # ... ann asks again meanwhile
    queue._release_slot(_arn("zed-b0"))  # the slot frees
    assert queue._take(read, "2026-01-01T00:00:00") is None  # the stale read takes nothing
    assert queue.dispatch() == [_arn("ann-b1")] and tokens == ["z1", "new"]

    # bob's entry is granted (to a token that has expired: the grant is never received) between
    # his read of the entry and his renewal.
    queue.release(_arn("ann-b1"))
    assert queue.acquire("cy", "b1", _arn("cy-b1"), "c1").acquired
    queue.acquire("bob", "b1", _arn("bob-b1"), "b-old")
    original = queue.waiting_entry

    def read_then_granted(arn):
        found = original(arn)
        queue.release(_arn("cy-b1"))  # a release right after bob's read grants him, on "b-old"
        return found

    queue.waiting_entry = read_then_granted  # bob asks again
    try:
        assert queue.acquire("bob", "b1", _arn("bob-b1"), "b-new").acquired is True
    finally:
        queue.waiting_entry = original
    assert tokens[-2:] == ["b-old", "b-new"]

    # Granted (to an expired token) just before the execution, asking again, reads its entry:
    # no entry, but a slot in the lock. It must take the slot, not join the line a second time.
    queue.acquire("dan", "b1", _arn("dan-b1"), "d-old")

    def granted_then_read(arn):
        queue.release(_arn("bob-b1"))  # grants dan on "d-old"
        return original(arn)

    queue.waiting_entry = granted_then_read
    try:
        assert queue.acquire("dan", "b1", _arn("dan-b1"), "d-new").acquired is True
    finally:
        queue.waiting_entry = original
    assert tokens[-2:] == ["d-old", "d-new"] and queue.waiting() == []
