"""The training queue in the real state machine, with stand-in training jobs
(avatarflow_local.queue_world: the stack from template.yaml, no torch, chosen durations; the
EventBridge rule delivered locally): past the limit batches wait (resumed by their grant's
task token) and all finish in fair order; a wait that times out asks again and keeps its
place; a failed, a timed-out and a stopped execution each free their slot (the stopped one
only through the template's cleanup rule); a refused CreateTrainingJob (ResourceLimitExceeded,
throttling) waits instead of failing the batch."""

import threading

import boto3
import pytest

from avatarflow_local import training_job
from avatarflow_local.queue_world import queue_world

pytestmark = pytest.mark.e2e


def _inbox(world):
    sqs = boto3.client("sqs")
    url = sqs.create_queue(QueueName="inbox")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    boto3.client("sns").subscribe(TopicArn=world.stack.topic_arn, Protocol="sqs", Endpoint=arn,
                                  Attributes={"RawMessageDelivery": "true"})
    return sqs, url


def _mail(sqs, url):
    found = []
    while True:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, MessageAttributeNames=["All"])
        if not got.get("Messages"):
            return found
        for m in got["Messages"]:
            found.append((m["MessageAttributes"]["event"]["StringValue"],
                          m["MessageAttributes"]["user_id"]["StringValue"], m["Body"]))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])


def _started_order(jobs):
    return [(j["tags"]["avatarflow:user_id"], j["tags"]["avatarflow:batch_id"])
            for j in sorted(jobs, key=lambda j: j["started"])]


def test_past_the_limit_batches_wait_their_turn_fairly_and_all_finish():
    before = len(training_job.JOBS)
    # The first job runs until everyone is in line (intake takes seconds on a busy machine).
    everyone_in_line = threading.Event()
    stand_in = training_job.StandIn(duration_s=lambda r: 0.5 if everyone_in_line.wait(60) else 0)
    with queue_world(1, stand_in) as world:
        sqs, inbox = _inbox(world)
        ann = [world.start("ann", f"b{i}") for i in (1, 2, 3)]
        # ann's three batches are in (one training, two waiting) before bob and cy upload.
        world.wait_for(lambda: len(world.queue().snapshot()["waiting"]) == 2, what="ann's batches queued")
        others = [world.start("bob", "b1"), world.start("cy", "b1")]
        world.wait_for(lambda: len(world.queue().snapshot()["waiting"]) == 4, what="everyone queued")
        everyone_in_line.set()
        done = world.wait([*ann, *others])
        assert {d["status"] for d in done.values()} == {"SUCCEEDED"}
        assert training_job.peak_running() == 1
        order = _started_order(training_job.JOBS[before:])
        # Whichever of ann's batches came first trains first; bob's and cy's first batches then
        # go before ann's second and third, although those were waiting longer.
        assert order[0][0] == "ann" and set(order[1:3]) == {("bob", "b1"), ("cy", "b1")}
        assert [user for user, _ in order[3:]] == ["ann", "ann"] and len(set(order)) == 5
        assert world.queue().snapshot()["running"] == [] and world.queue().snapshot()["waiting"] == []
        queued = [(user, body) for event, user, body in _mail(sqs, inbox) if event == "MODEL_QUEUED"]
        assert {user for user, _ in queued} >= {"ann", "bob", "cy"}
        assert all("in line, estimated wait about" in body for _, body in queued)


def test_failed_timed_out_and_stopped_executions_each_release_their_slot():
    released_by_operator = threading.Event()  # the stopped batch's job runs until then
    plans = {"fail": (0.5, "fail"), "slow": (30, None),
             "cap": (0.5, "ResourceLimitExceeded"), "throttle": (0.5, "ThrottlingException")}
    refused = set()

    def batch_of(request):
        return {t["Key"]: t["Value"] for t in request["Tags"]}["avatarflow:batch_id"]

    def outcome(request):
        batch = batch_of(request)
        kind = plans.get(batch, (0.5, None))[1]
        if kind in ("ResourceLimitExceeded", "ThrottlingException"):
            if batch in refused:
                return None  # capacity came back
            refused.add(batch)
        return kind

    def duration(request):
        if batch_of(request) == "stop":
            released_by_operator.wait(30)
        return plans.get(batch_of(request), (0.5, None))[0]

    stand_in = training_job.StandIn(duration_s=duration, outcome=outcome)
    with queue_world(1, stand_in, max_runtime_s=3) as world:
        queue = world.queue()
        # Stopped by an operator, one while training and one while waiting: nothing in the
        # workflow runs after a stop, so only the template's cleanup rule can free them.
        stop = world.start("ann", "stop")
        world.wait_for(lambda: queue.snapshot()["running"], what="the stop batch training")
        waiting = world.start("bob", "stopped-waiting")
        world.wait_for(lambda: queue.snapshot()["waiting"], what="a batch waiting")
        world.sfn.stop_execution(executionArn=stop, error="Operator", cause="stopped by an operator")
        world.sfn.stop_execution(executionArn=waiting, error="Operator", cause="stopped by an operator")
        released_by_operator.set()  # Step Functions stops the job of a stopped .sync task
        assert {d["status"] for d in world.wait([stop, waiting]).values()} == {"ABORTED"}
        world.wait_for(lambda: queue.snapshot()["running"] == [] and queue.snapshot()["waiting"] == [],
                       timeout=20, what="the cleanup rule")
        assert {e["detail"]["status"] for _, e in world.events.delivered} == {"ABORTED"}
        assert world.batch_row("ann", "stop")["stage"] == "failed"

        # One slot, five batches at once: each gets it only after the one before released it.
        # A failed job, a job past its stopping condition (MaxRuntimeInSeconds 3) and a
        # refused CreateTrainingJob (capacity, throttling: waits and trains) all hand it on.
        names = ["fail", "slow", "cap", "throttle", "after"]
        arns = {world.start(f"u{i}", batch): batch for i, batch in enumerate(names)}
        done = {arns[arn]: d for arn, d in world.wait(list(arns), timeout=180).items()}
        assert {b: d["status"] for b, d in done.items()} == {
            "fail": "FAILED", "slow": "FAILED", "cap": "SUCCEEDED", "throttle": "SUCCEEDED",
            "after": "SUCCEEDED"}
        assert refused == {"cap", "throttle"}
        assert training_job.peak_running() == 1
        assert queue.snapshot()["running"] == [] and queue.snapshot()["waiting"] == []
        assert world.batch_row("u1", "slow")["stage"] == "failed"


def test_a_wait_that_times_out_asks_again_and_never_trains_without_its_grant():
    """QueueRecheckSeconds 2: bob's wait times out (at least once) while ann trains; each time
    he asks again with a new token and keeps his place. When ann's slot frees, the grant goes to
    whichever token is current (a stale one is refused as AWS refuses it: moto_strict; the slot
    then stays his until he asks again), and he trains only after ann, never beside her."""
    bob_asked_again = threading.Event()  # ann's job runs until then
    stand_in = training_job.StandIn(duration_s=lambda r: 0.5 if bob_asked_again.wait(60) else 0)
    before = len(training_job.JOBS)
    with queue_world(1, stand_in, recheck_s=2) as world:
        ann = world.start("ann", "b1")
        world.wait_for(lambda: world.queue().snapshot()["running"], what="ann training")
        bob = world.start("bob", "b1")

        def entered(arn):
            events = world.sfn.get_execution_history(executionArn=arn, maxResults=1000)["events"]
            return [e["stateEnteredEventDetails"]["name"] for e in events
                    if e["type"].endswith("StateEntered")]

        world.wait_for(lambda: "AskAgain" in entered(bob), what="bob's wait timing out")
        bob_asked_again.set()
        done = world.wait([ann, bob], timeout=120)
        assert {d["status"] for d in done.values()} == {"SUCCEEDED"}
        assert training_job.peak_running() == 1
        jobs = {j["tags"]["avatarflow:user_id"]: j for j in training_job.JOBS[before:]}
        assert jobs["bob"]["started"] >= jobs["ann"]["ended"]
        names = entered(bob)
        asks = names.count("AcquireSlot")
        assert asks >= 2 and names.count("AskAgain") == asks - 1
        assert names.index("MarkTraining") > max(i for i, n in enumerate(names) if n == "AcquireSlot")
        events = world.sfn.get_execution_history(executionArn=bob, maxResults=1000)["events"]
        timed_out = [e["taskTimedOutEventDetails"]["error"] for e in events if e["type"] == "TaskTimedOut"]
        assert timed_out == ["States.Timeout"] * (asks - 1)
        assert world.queue().snapshot()["running"] == [] and world.queue().snapshot()["waiting"] == []
        assert world.batch_row("bob", "b1")["stage"] in ("registering", "ready")
