"""Soak the local API (`make soak`): N concurrent clients on the generate and status routes.

Loopback only, bounded in count and time, stops by itself. Starts the local runtime in
process (moto on 127.0.0.1, the template's resources, the real handlers, the async inference
endpoint on the tiny model; as `make demo`), trains one user's model through the real
workflow (upload -> on_upload -> state machine -> training stand-in -> MODEL_READY), then
runs the clients:

  each client thread, on its own keep-alive connection, alternates
  POST /users/{u}/generations (64 px, 1 step, 1 image) and
  GET /users/{u}/generations/{id} (one of its accepted ids), until --seconds have passed or
  --max-requests were sent in all; once --max-generations were accepted it only polls, so
  the single CPU inference worker can drain the queue within the bounded wait (a soft cap:
  POSTs already in flight when it is reached still count, up to clients - 1 more).

The API answers with the template's stage throttling (DefaultRouteSettings rate/burst), so
429 is an expected answer. Checks (exit 1 if any fails): every request sent got an HTTP
answer (no connection error, no timeout), every answer is 202/200 or 429 (no 5xx, nothing
else), and every accepted generation reaches COMPLETED or FAILED within --drain-seconds.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from avatarflow import keys
from avatarflow.sample_photos import one_person_batch
from avatarflow_local.runtime import LocalRuntime, Settings

ROUTES = ("POST /users/{u}/generations", "GET /users/{u}/generations/{id}")
BODY = {"prompt": "a portrait of zwx person", "num_images": 1, "steps": 1, "width": 64, "height": 64}


class Client(threading.Thread):
    def __init__(self, url: str, user: str, token: str, stats: "Stats"):
        super().__init__(daemon=True)
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.user, self.token, self.stats = user, token, stats
        self.conn: http.client.HTTPConnection | None = None
        self.ids: list[str] = []

    def request(self, route: str, method: str, path: str, body: dict | None = None):
        """(status, JSON body), or None when not sent (limits reached) or not answered."""
        if not self.stats.may_send():
            return None
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        t0 = time.perf_counter()
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            self.conn.request(method, path, body=json.dumps(body) if body else None, headers=headers)
            response = self.conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as err:
            self.stats.error(route, f"{type(err).__name__}: {err}")
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            return None
        self.stats.answer(route, response.status, time.perf_counter() - t0)
        try:
            return response.status, json.loads(data or b"{}")
        except ValueError:
            return response.status, {}

    def run(self) -> None:
        n = 0
        while not self.stats.stopped():
            if self.stats.want_generation():
                got = self.request(ROUTES[0], "POST", f"/users/{self.user}/generations", BODY)
                if got and got[0] == 202:
                    self.ids.append(got[1]["generation_id"])
                    self.stats.accepted(got[1]["generation_id"])
            ids = self.ids or self.stats.ids  # its own generations, else anyone's
            if ids:
                self.request(ROUTES[1], "GET", f"/users/{self.user}/generations/{ids[n % len(ids)]}")
            n += 1
        if self.conn is not None:
            self.conn.close()


class Stats:
    def __init__(self, seconds: float, max_requests: int, max_generations: int):
        self.deadline = time.monotonic() + seconds
        self.max_requests, self.max_generations = max_requests, max_generations
        self.lock = threading.Lock()
        self.sent = 0
        self.codes: dict[str, Counter] = {r: Counter() for r in ROUTES}
        self.latency: dict[str, list[float]] = {r: [] for r in ROUTES}
        self.errors: list[str] = []
        self.ids: list[str] = []

    def stopped(self) -> bool:
        return time.monotonic() >= self.deadline or self.sent >= self.max_requests

    def may_send(self) -> bool:
        with self.lock:
            if self.stopped():
                return False
            self.sent += 1
            return True

    def want_generation(self) -> bool:
        return len(self.ids) < self.max_generations

    def accepted(self, gid: str) -> None:
        with self.lock:
            self.ids.append(gid)

    def answer(self, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.codes[route][status] += 1
            self.latency[route].append(seconds)

    def error(self, route: str, text: str) -> None:
        with self.lock:
            self.errors.append(f"{route}: {text}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def train_model(rt: LocalRuntime, user: str, batch: str, timeout: float) -> str:
    s3 = rt.client("s3")
    for name, data in one_person_batch(8):
        s3.put_object(Bucket=rt.bucket, Key=keys.upload_prefix(user, batch) + name, Body=data)
    desc = rt.wait_for_execution(user, batch, timeout=timeout)
    if desc["status"] != "SUCCEEDED":
        cause = desc.get("cause", "")[:300]
        raise SystemExit(f"training workflow {desc['status']}: {desc.get('error')} {cause}")
    return batch


def drain(rt: LocalRuntime, user: str, token: str, ids: list[str], timeout: float) -> Counter:
    """Final status of every accepted generation, polled slowly (under the stage rate)."""
    final: dict[str, str] = {}
    parts = urlsplit(rt.api_url)
    deadline = time.monotonic() + timeout
    while len(final) < len(ids) and time.monotonic() < deadline:
        for gid in [g for g in ids if g not in final]:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            headers = {"Authorization": f"Bearer {token}"}
            conn.request("GET", f"/users/{user}/generations/{gid}", headers=headers)
            response = conn.getresponse()
            body = json.loads(response.read() or b"{}")
            conn.close()
            if response.status == 200 and body.get("status") in ("COMPLETED", "FAILED"):
                final[gid] = body["status"]
            time.sleep(0.1)  # 10 requests/s: below the template's stage rate
            if time.monotonic() >= deadline:
                break
        time.sleep(0.5)
    out = Counter(final.values())
    out["UNFINISHED"] = len(ids) - len(final)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0, help="load phase length")
    ap.add_argument("--max-requests", type=int, default=20_000, help="cap on requests sent in all")
    ap.add_argument("--max-generations", type=int, default=48, help="stop posting after this many accepted")
    ap.add_argument("--drain-seconds", type=float, default=180.0, help="wait for accepted generations")
    ap.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = ap.parse_args(argv)
    if not (1 <= args.clients <= 64 and 0 < args.seconds <= 300):
        ap.error("--clients 1-64, --seconds up to 300")

    user = "soak"
    t_all = time.monotonic()
    settings = dict(train_steps=2, users=(user,))
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp, \
            LocalRuntime(Settings(out_dir=Path(tmp), **settings), on_event=lambda kind, text: None) as rt:
        t = time.monotonic()
        train_model(rt, user, "b1", timeout=300)
        setup_s = time.monotonic() - t_all
        print(f"runtime up and one model trained in {setup_s:.1f} s "
              f"(training workflow {time.monotonic() - t:.1f} s)")
        token = rt.token(user)
        throttle = rt.resources.throttle
        print(f"stage throttling from template.yaml: rate {throttle.rate:g}/s, burst {throttle.burst}")

        stats = Stats(args.seconds, args.max_requests, args.max_generations)
        clients = [Client(rt.api_url, user, token, stats) for _ in range(args.clients)]
        t0 = time.monotonic()
        for c in clients:
            c.start()
        for c in clients:
            c.join(args.seconds + 60)  # every request has a 30 s socket timeout
        load_s = time.monotonic() - t0
        hung = sum(c.is_alive() for c in clients)

        t = time.monotonic()
        outcomes = drain(rt, user, token, stats.ids, args.drain_seconds)
        drain_s = time.monotonic() - t

    answered = sum(sum(c.values()) for c in stats.codes.values())
    bad = {r: {s: n for s, n in c.items() if s not in (200, 202, 429)} for r, c in stats.codes.items()}
    def latency(route: str, q: float | None) -> float:
        values = stats.latency[route]
        return round((percentile(values, q) if q else max(values, default=float("nan"))) * 1000, 1)

    report = {
        "clients": args.clients, "load_seconds": round(load_s, 1), "sent": stats.sent, "answered": answered,
        "errors": len(stats.errors), "error_samples": stats.errors[:5], "hung_clients": hung,
        "requests_per_s": round(answered / load_s, 1),
        "routes": {r: {"codes": dict(sorted(stats.codes[r].items())),
                       "p50_ms": latency(r, 0.50), "p99_ms": latency(r, 0.99), "max_ms": latency(r, None)}
                   for r in ROUTES},
        "throttle": {"rate": throttle.rate, "burst": throttle.burst},
        "generations_accepted": len(stats.ids), "generations": dict(outcomes),
        "drain_seconds": round(drain_s, 1), "setup_seconds": round(setup_s, 1),
        "total_seconds": round(time.monotonic() - t_all, 1),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))

    problems = []
    if answered != stats.sent or stats.errors or hung:
        problems.append(f"lost: sent {stats.sent}, answered {answered}, "
                        f"errors {len(stats.errors)}, hung clients {hung}")
    if any(bad.values()):
        problems.append(f"answers other than 200/202/429: {bad}")
    if outcomes["UNFINISHED"]:
        problems.append(f"{outcomes['UNFINISHED']} accepted generations not finished "
                        f"after {args.drain_seconds} s")
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    print("soak " + ("FAILED" if problems else "passed: every request answered, every generation finished"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
