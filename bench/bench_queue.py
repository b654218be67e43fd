"""make bench-queue: the training queue at scale, simulated with the REAL state machine.

200 batches from 50 users (4 each, arriving evenly over 150 s, twice as fast as 4 slots drain
them, so the line grows to about 100) against TrainingConcurrency 4, through
avatarflow_local.queue_world: the stack from template.yaml in moto, every handler run as
Lambda with its role, the real ASL executed by moto's interpreter, and stand-in training jobs
(training_job.STAND_IN: no torch) of chosen durations (4-8 local seconds by default: the
queue's behaviour depends on the order of events, not on their scale).

Checks (the run fails otherwise): no execution fails, never more than `limit` jobs at once
(the stand-in counts them), fair order (no batch of a higher rank -- a user's later batch --
is granted a slot while a lower-rank batch was already ranked in line and is granted later),
the queue empty at the end, and no grant missing its waiting task (a wait timing out over half
QueueRecheckSeconds after its batch got the slot: the slot sat idle until the batch asked again).
Reports: queue-wait percentiles (the queue's own clock: joined ->
granted, from each AcquireSlot grant), state transitions per batch (the history's
*StateEntered events: what Step Functions bills), rechecks (AcquireSlot timeouts), and the
on-paper projection for 10,000 batches a day (--paper) from the measured transitions, a
discrete-event model of the same fair queue, and bench/data/prices.json.

    python bench/bench_queue.py [--batches 200 --users 50 --limit 4 --json out/bench_queue.json]
    python bench/bench_queue.py --paper-only --job-minutes 20 --limit 4
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "true")
os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "ERROR")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

PRICES = REPO / "bench" / "data" / "prices.json"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


# --------------------------------------------------------------------------- the simulation
def simulate(batches: int, users: int, limit: int, job_s: tuple[float, float], seed: int,
             arrival_s: float, recheck_s: int = 60) -> dict:
    import logging

    logging.disable(logging.WARNING)
    from avatarflow_local import training_job
    from avatarflow_local.queue_world import queue_world

    rng = random.Random(seed)
    durations: dict[str, float] = {}

    def duration(request: dict) -> float:
        tags = {t["Key"]: t["Value"] for t in request["Tags"]}
        return durations[f"{tags['avatarflow:user_id']}/{tags['avatarflow:batch_id']}"]

    per_user = batches // users
    plan = [(f"user{u:02d}", f"b{k}") for k in range(per_user) for u in range(users)]
    rng.shuffle(plan)
    # Each user's batches keep their own order (b0 before b1 ...): a user uploads one after another.
    order: dict[str, list[str]] = {}
    for user, _ in plan:
        order.setdefault(user, [])
    arrivals = []
    for user, _ in plan:
        batch = f"b{len(order[user])}"
        order[user].append(batch)
        arrivals.append((user, batch))
    for user, batch in arrivals:
        durations[f"{user}/{batch}"] = rng.uniform(*job_s)

    before = len(training_job.JOBS)
    t0 = time.monotonic()
    with queue_world(limit, training_job.StandIn(duration_s=duration), recheck_s=recheck_s) as world:
        arns = {}
        starter_errors = []

        def start_all() -> None:
            # Spread evenly over `arrival_s`: still faster than the queue drains (4 slots of 4-8 s
            # jobs take ~0.67 batches a second), so the line grows. All 200 in the same second
            # starve the one-process emulator's Lambdas of CPU (docs/benchmarks.md).
            begin = time.monotonic()
            for n, (user, batch) in enumerate(arrivals):
                time.sleep(max(0.0, begin + n * arrival_s / len(arrivals) - time.monotonic()))
                try:
                    arns[world.start(user, batch)] = (user, batch)
                except Exception as err:  # noqa: BLE001 - reported below
                    starter_errors.append(repr(err))

        starter = threading.Thread(target=start_all)
        starter.start()
        starter.join()
        done = world.wait(list(arns), timeout=3600)
        wall = time.monotonic() - t0
        peak = training_job.peak_running()
        jobs = training_job.JOBS[before:]
        histories = {arn: world.sfn.get_execution_history(executionArn=arn, maxResults=1000)["events"]
                     for arn in arns}
        snapshot = world.queue().snapshot()

    statuses = {}
    failures: dict[str, int] = {}
    for arn, desc in done.items():
        statuses[desc["status"]] = statuses.get(desc["status"], 0) + 1
        if desc["status"] != "SUCCEEDED":
            # The last task failure (a wait's States.Timeout is routine: it asks again), and the
            # state it happened in.
            events = histories[arn]
            ends = [i for i, e in enumerate(events) if e["type"] in ("TaskFailed", "LambdaFunctionFailed")]
            cut = ends[-1] if ends else len(events) - 1
            last = events[cut]
            detail = {"error": desc.get("error"), "cause": desc.get("cause")}
            if ends:
                detail = last.get("taskFailedEventDetails") or last.get("lambdaFunctionFailedEventDetails")
            states = [e["stateEnteredEventDetails"]["name"] for e in events[:cut + 1]
                      if e["type"].endswith("StateEntered")]
            cause = str(detail.get("cause"))
            cause = "Task timed out" if "timed out" in cause else cause[:120]
            key = f"{states[-1] if states else '?'}: {detail.get('error')}: {cause}"
            failures[key] = failures.get(key, 0) + 1
    # Concurrency from the jobs' own start/end marks (a second count, beside the stand-in's).
    marks = sorted([(j["started"], 1) for j in jobs] + [(j["ended"], -1) for j in jobs])
    running = most = 0
    for _, step in marks:
        running += step
        most = max(most, running)

    clock = time.time() - time.monotonic()  # the jobs' marks are monotonic
    jobs_of = {(j["tags"]["avatarflow:user_id"], j["tags"]["avatarflow:batch_id"]): j for j in jobs}
    records = []
    for arn, events in histories.items():
        entered = [e for e in events if e["type"].endswith("StateEntered")]
        acquires = [e for e in entered if e["stateEnteredEventDetails"]["name"] == "AcquireSlot"]
        user, batch = arns[arn]
        # The grant the AcquireSlot task resumed with (SendTaskSuccess's output): the rank the
        # batch joined with and the queue's own times.
        outputs = [e["taskSucceededEventDetails"]["output"] for e in events if e["type"] == "TaskSucceeded"]
        grants = [json.loads(out) for out in outputs if '"granted_at"' in out]
        grant = grants[0] if grants else {}
        resumed = [e["timestamp"].timestamp() for e in events if e["type"] == "TaskSucceeded"
                   and '"granted_at"' in e["taskSucceededEventDetails"]["output"]]
        waits_timed_out = [e["timestamp"].timestamp() for e in events if e["type"] == "TaskTimedOut"]
        job = jobs_of.get((user, batch), {})
        releases = [e["timestamp"].timestamp() for e in entered
                    if e["stateEnteredEventDetails"]["name"] in ("ReleaseSlot", "ReleaseAfterFailure")]
        records.append({
            "user": user, "batch": batch, "transitions": len(entered), "rechecks": max(0, len(acquires) - 1),
            "job_started": job["started"] + clock if job else None,
            "job_ended": job["ended"] + clock if job and job["ended"] else None,
            "released": releases[0] if releases else None,
            "resumed": resumed[0] if resumed else None,
            "waits_timed_out": waits_timed_out,
            "acquire_events": [e["type"] for e in events if e["type"].startswith(("Task", "Lambda"))
                               and any(a["id"] < e["id"] for a in acquires)
                               and not any(m["id"] < e["id"] for m in entered
                                           if m["stateEnteredEventDetails"]["name"] == "MarkTraining")],
            "rank": grant.get("rank"), **{k: _seconds(grant.get(k)) for k in
                                          ("enqueued_at", "ranked_at", "decided_at", "granted_at")},
        })
    waits = [r["granted_at"] - r["enqueued_at"] for r in records if r["granted_at"] and r["enqueued_at"]]
    violations = fairness_violations(records)
    lags = [r["resumed"] - r["granted_at"] for r in records if r["resumed"] and r["granted_at"]]
    return {
        "batches": len(arrivals), "users": users, "limit": limit, "job_seconds": list(job_s), "seed": seed,
        "arrival_seconds": arrival_s,
        "start_errors": starter_errors, "statuses": statuses, "failures": failures,
        "peak_running_stand_in": peak,
        "peak_running_from_job_marks": most, "fairness_violations": violations,
        "user_order_violations": user_order_violations(records),
        "queue_left": {"running": len(snapshot["running"]), "waiting": len(snapshot["waiting"])},
        "wall_seconds": round(wall, 1),
        "queue_wait_seconds": {f"p{q}": round(percentile(waits, q), 1) for q in (50, 90, 95, 99, 100)},
        "transitions_per_batch": {
            "mean": round(statistics.mean(r["transitions"] for r in records), 1),
            "p50": percentile([r["transitions"] for r in records], 50),
            "max": max(r["transitions"] for r in records),
        },
        "rechecks": sum(r["rechecks"] for r in records),
        # Slot taken -> the waiting task resumed: the emulator's own latency under load (the
        # grant travels through the Lambda thread and moto's interpreter on 2 shared cores).
        "delivery_lag_seconds": {f"p{q}": round(percentile(lags, q), 2) for q in (50, 99, 100)},
        # A wait that timed out long after its batch got the slot (over half QueueRecheckSeconds):
        # the grant never reached the waiting task, and the slot sat idle until the batch asked
        # again. (A wait timing out a moment after its grant was sent is the race every token
        # wait has; the batch asks again at once and finds its slot: that is delivery lag.)
        "grants_missed": sum(any(t > r["granted_at"] + recheck_s / 2 for t in r["waits_timed_out"])
                             for r in records if r["granted_at"]),
        "records": records,
    }


def _seconds(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


def fairness_violations(records: list[dict], slack_s: float = 1.0) -> list[dict]:
    """Batch x granted a slot although batch y of a lower rank (the rank each joined the line
    with) was already ranked in line when x's dispatcher read the list, and y was granted
    after x. `slack_s` covers only the time between a timestamp and the write or read it
    stamps (the rank is stamped just before it is written, the list read just after it is
    stamped); a dispatcher grants strictly the head of what it read."""
    queued = [r for r in records if r["granted_at"] and r["ranked_at"] and r["rank"] is not None]
    found = []
    for x in queued:
        for y in queued:
            if y["rank"] < x["rank"] and y["ranked_at"] + slack_s < x["decided_at"] \
                    and y["granted_at"] > x["granted_at"]:
                found.append({"granted": f"{x['user']}/{x['batch']} (rank {x['rank']})",
                              "while_waiting": f"{y['user']}/{y['batch']} (rank {y['rank']})"})
    return found


def user_order_violations(records: list[dict]) -> list[str]:
    """A user's batches are granted in the order they joined."""
    found = []
    by_user: dict[str, list[dict]] = {}
    for r in records:
        if r["granted_at"] and r["enqueued_at"]:
            by_user.setdefault(r["user"], []).append(r)
    for user, mine in by_user.items():
        granted = [r["batch"] for r in sorted(mine, key=lambda r: r["granted_at"])]
        joined = [r["batch"] for r in sorted(mine, key=lambda r: r["enqueued_at"])]
        if granted != joined:
            found.append(f"{user}: joined {joined}, granted {granted}")
    return found


# --------------------------------------------------------------------------- on paper
def fair_queue_model(batches_per_day: int, users: int, limit: int, job_minutes: float, seed: int,
                     peak_share: float = 0.0) -> dict:
    """A discrete-event model of the same queue (the same fair order: rank, then arrival) for
    one day of Poisson arrivals (`peak_share` of them inside one evening hour), jobs of
    `job_minutes`: wait percentiles in minutes and the busy instance hours."""
    from avatarflow.training_queue import Waiting, fair_order, rank_of

    rng = random.Random(seed)
    day = 24 * 60.0
    times = []
    for _ in range(batches_per_day):
        if rng.random() < peak_share:
            times.append(19 * 60 + rng.random() * 60)
        else:
            times.append(rng.random() * day)
    arrivals = sorted((t, f"u{rng.randrange(users)}") for t in times)
    free_at = [0.0] * limit
    heapq.heapify(free_at)
    holders: list[tuple[float, str]] = []  # (end, user)
    waiting: list[Waiting] = []
    waits, i, now = [], 0, 0.0
    while i < len(arrivals) or waiting:
        next_arrival = arrivals[i][0] if i < len(arrivals) else math.inf
        next_free = free_at[0]
        if waiting and next_free <= next_arrival:
            now = max(now, heapq.heappop(free_at))
            holders = [(end, u) for end, u in holders if end > now]
            head = fair_order(waiting)[0]
            waiting.remove(head)
            waits.append(now - head.enqueued_at)
            heapq.heappush(free_at, now + job_minutes)
            holders.append((now + job_minutes, head.user_id))
            continue
        now, user = arrivals[i]
        i += 1
        holders = [(end, u) for end, u in holders if end > now]
        rank = rank_of(user, waiting, {f"h{n}": {"user_id": u} for n, (_, u) in enumerate(holders)})
        waiting.append(Waiting(f"{now:012.4f}#{i}", user, f"b{i}", str(i), now, rank))  # type: ignore[arg-type]
    return {"wait_minutes": {"mean": round(statistics.mean(waits), 1),
                             **{f"p{q}": round(percentile(waits, q), 1) for q in (50, 90, 99, 100)}},
            "instance_hours": round(batches_per_day * job_minutes / 60, 1),
            "utilisation": round(batches_per_day * job_minutes / (limit * day), 2)}


def paper(measured: dict | None, batches_per_day: int, job_minutes: float, limits: list[int],
          recheck_seconds: int, users: int, seed: int) -> dict:
    """Per deployment size: waits and instance hours from the model, Step Functions
    transitions from the measured per-batch count (a wait itself costs none; a batch waiting
    longer than QueueRecheckSeconds asks again once per recheck: AskAgain + AcquireSlot, 2
    transitions)."""
    prices = json.loads(PRICES.read_text())
    transition_price = prices["step_functions_standard_per_1000_transitions"]["usd"] / 1000
    instance = prices["sagemaker_training_ml.g5.2xlarge_on_demand_per_hour"]
    base = measured["transitions_per_batch"]["mean"] - 2 * measured["rechecks"] / measured["batches"] \
        if measured else None
    rows = []
    for limit in limits:
        for label, share in (("spread over the day", 0.0), ("30 % in one evening hour", 0.3)):
            model = fair_queue_model(batches_per_day, users, limit, job_minutes, seed, share)
            rechecks = 2 * model["wait_minutes"]["mean"] * 60 / recheck_seconds  # AskAgain + AcquireSlot
            row = {"limit": limit, "arrivals": label, **model,
                   "instance_cost_usd_per_day": round(model["instance_hours"] * instance["usd"], 2),
                   "recheck_transitions_per_batch_mean": round(rechecks, 1)}
            if base is not None:
                per_batch = base + rechecks
                row["transitions_per_batch"] = round(per_batch, 1)
                row["step_functions_usd_per_day"] = round(batches_per_day * per_batch * transition_price, 2)
            rows.append(row)
    needed = math.ceil(batches_per_day * job_minutes / (24 * 60))
    return {"batches_per_day": batches_per_day, "job_minutes": job_minutes,
            "recheck_seconds": recheck_seconds,
            "slots_needed_to_keep_up": needed, "instance_price": instance,
            "transition_price_per_1000": prices["step_functions_standard_per_1000_transitions"]["usd"],
            "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--job-seconds", type=float, nargs=2, default=(4.0, 8.0), metavar=("MIN", "MAX"))
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--arrival-seconds", type=float, default=150.0,
                        help="the batches arrive evenly over this many seconds (0: all at once)")
    parser.add_argument("--json", type=Path, default=REPO / "out" / "bench_queue.json")
    parser.add_argument("--paper-only", action="store_true", help="only the on-paper projection")
    parser.add_argument("--per-day", type=int, default=10_000)
    parser.add_argument("--job-minutes", type=float, default=20.0,
                        help="minutes a training job holds its instance (NOT measured on a GPU here)")
    parser.add_argument("--paper-limits", type=int, nargs="+", default=[4, 150, 160, 200])
    args = parser.parse_args()

    measured = None
    if not args.paper_only:
        measured = simulate(args.batches, args.users, args.limit, tuple(args.job_seconds), args.seed,
                            args.arrival_seconds)
        print(json.dumps({k: v for k, v in measured.items() if k != "records"}, indent=1))
    projection = paper(measured, args.per_day, args.job_minutes, args.paper_limits, 900, 2000, args.seed)
    print(json.dumps(projection, indent=1))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"simulation": measured, "paper": projection}, indent=1))
    if measured:
        problems = []
        if set(measured["statuses"]) != {"SUCCEEDED"} or measured["start_errors"]:
            problems.append(f"failures: {measured['statuses']} {measured['start_errors'][:3]}")
        if max(measured["peak_running_stand_in"], measured["peak_running_from_job_marks"]) > args.limit:
            problems.append("more jobs at once than the limit")
        if measured["fairness_violations"] or measured["user_order_violations"]:
            problems.append(f"unfair grants: {measured['fairness_violations'][:5]}"
                            f" {measured['user_order_violations'][:5]}")
        if measured["grants_missed"]:
            problems.append(f"{measured['grants_missed']} grants missed their waiting task"
                            " (the slot sat idle until a recheck)")
        if any(measured["queue_left"].values()):
            problems.append(f"queue not empty at the end: {measured['queue_left']}")
        for problem in problems:
            print("FAIL:", problem, file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
