"""The training capacity queue (functions/training_queue, avatarflow.training_queue): the
semaphore and its fair order one call at a time (unit tier: template-built stack, the
function run as Lambda with its role), then the real state machine with stand-in training
jobs (avatarflow_local.queue_world: no torch; e2e): the limit holds and every batch
finishes, a failed, a timed-out and a stopped execution each free their slot (the stopped
one through the template's EventBridge rule, delivered locally), fairness across users, and
a refused CreateTrainingJob (ResourceLimitExceeded, throttling) waits instead of failing."""

import json
import time

import boto3
import pytest
import unit_stack

from avatarflow import notifications
from avatarflow.training_queue import (
    PROVISIONAL_RANK,
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


def test_estimated_wait_follows_the_slots_as_they_free():
    now = float(int(time.time()))
    since = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now - 100))
    holders = {"a": {"user_id": "u", "since": since}, "b": {"user_id": "v", "since": since}}
    # Two slots, both 100 s into 600 s jobs: first in line waits ~500 s, second too, third ~1100 s.
    assert [estimate_wait(i, 2, holders, 600, now) for i in range(3)] == [500, 500, 1100]
    assert estimate_wait(0, 3, holders, 600, now) == 0  # a free slot


# --------------------------------------------------------------------------- one call at a time
def _acquire(stack, user, batch):
    return stack.call("training_queue", {"action": "acquire", "user_id": user, "batch_id": batch,
                                         "execution_arn": _arn(f"{user}-{batch}"),
                                         "training_job": "avatar-x"})


def _release(stack, user, batch, outcome="trained"):
    return stack.call("training_queue", {"action": "release", "outcome": outcome, "user_id": user,
                                         "batch_id": batch, "execution_arn": _arn(f"{user}-{batch}")})


def _batch(stack, user, batch):
    table = boto3.resource("dynamodb").Table(stack.resources.physical["BatchesTable"]["Ref"])
    return table.get_item(Key={"user_id": user, "batch_id": batch}).get("Item")


def test_the_limit_holds_and_a_release_lets_the_next_in(stack):
    # TrainingConcurrency's default (2) reaches the function through its template environment.
    assert stack.hook.specs["training_queue"].environment["TRAINING_CONCURRENCY"] == "2"
    assert _acquire(stack, "ann", "b1")["acquired"] is True
    assert _acquire(stack, "bob", "b1")["acquired"] is True
    third = _acquire(stack, "cy", "b1")
    assert third["acquired"] is False and third["position"] == 1 and third["estimated_wait_seconds"] > 0
    assert _batch(stack, "cy", "b1")["stage"] == "queued"
    assert _acquire(stack, "ann", "b1")["acquired"] is True  # a holder asking again still holds
    assert _acquire(stack, "cy", "b1")["acquired"] is False  # still full
    assert _release(stack, "ann", "b1") == {"released": True, "dropped_waiting": 0}
    assert _release(stack, "ann", "b1") == {"released": False, "dropped_waiting": 0}  # idempotent
    assert _batch(stack, "ann", "b1")["stage"] == "registering"
    assert _acquire(stack, "cy", "b1")["acquired"] is True
    assert _batch(stack, "cy", "b1")["stage"] == "training"


def test_a_free_slot_goes_to_the_head_of_the_fair_order_not_to_whoever_asks(stack):
    for user in ("ann", "bob"):
        assert _acquire(stack, user, "b1")["acquired"] is True
    assert _acquire(stack, "ann", "b2")["position"] == 1  # ann's second, first in line for now
    assert _acquire(stack, "cy", "b1")["position"] == 1  # cy's first goes ahead of ann's second
    _release(stack, "bob", "b1")
    assert _acquire(stack, "ann", "b2")["acquired"] is False  # asks first, is not first
    assert _acquire(stack, "cy", "b1")["acquired"] is True


def test_the_cleanup_rule_frees_a_stopped_execution_and_drops_a_waiting_one(stack):
    for user in ("ann", "bob", "cy"):
        _acquire(stack, user, "b1")

    def status_event(user, status):
        return {"version": "0", "id": "1", "detail-type": "Step Functions Execution Status Change",
                "source": "aws.states", "account": ACCOUNT, "region": REGION, "time": "2026-01-01T00:00:00Z",
                "resources": [_arn(f"{user}-b1")],
                "detail": {"executionArn": _arn(f"{user}-b1"), "stateMachineArn": MACHINE, "status": status,
                           "name": f"{user}-b1", "input": json.dumps({"user_id": user, "batch_id": "b1"})}}

    assert stack.call("training_queue", status_event("ann", "RUNNING")) == {"released": False,
                                                                              "dropped_waiting": 0}
    assert stack.call("training_queue", status_event("ann", "ABORTED"))["released"] is True
    assert stack.call("training_queue", status_event("cy", "TIMED_OUT")) == {"released": False,
                                                                              "dropped_waiting": 1}
    assert _batch(stack, "ann", "b1")["stage"] == "failed" and _batch(stack, "cy", "b1")["stage"] == "failed"
    other = status_event("bob", "FAILED")
    other["detail"]["stateMachineArn"] = MACHINE + "-other"
    with pytest.raises(ValueError, match="another state machine"):
        stack.call("training_queue", other)


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


def test_two_batches_of_one_user_joining_at_once_never_both_rank_first(stack):
    """The race the workflow test once lost: ann's b1 has written its waiting entry but not yet
    ranked it (another Lambda, mid-call) when b2 joins. b2 must count b1; b1, ranking itself
    after, must not count b2 (b2's entry is later)."""
    table = boto3.resource("dynamodb").Table(stack.resources.physical["TrainingQueueTable"]["Ref"])
    queue = TrainingQueue(table, 1, 600)
    assert queue.acquire("zed", "b0", _arn("zed-b0")).acquired  # the one slot is taken
    table.put_item(Item={"queue": "waiting", "entry": f"2000-01-01T00:00:00.000+00:00#{_arn('ann-b1')}",
                         "user_id": "ann", "batch_id": "b1", "execution_arn": _arn("ann-b1"),
                         "enqueued_at": "2000-01-01T00:00:00.000+00:00", "rank": PROVISIONAL_RANK})
    assert queue.acquire("ann", "b2", _arn("ann-b2")).rank == 1
    assert queue.acquire("bob", "b1", _arn("bob-b1")).rank == 0
    # bob's first goes before ann's second; ann's first (still provisional) sorts last for now.
    assert [w.execution_arn for w in fair_order(queue.waiting())][:2] == [_arn("bob-b1"), _arn("ann-b2")]
