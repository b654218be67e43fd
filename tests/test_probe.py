"""The probe: malformed and hostile requests sent over raw sockets to the running local stack
(LocalRuntime: the front door, the JWT authorizer, route throttling, functions/api as Lambda
runs it). Every one must get an API-Gateway-like answer (a status and a JSON body) within a
bounded time, and the stack must log no traceback while answering them.

One test, one stack: the cases run in order on one LocalRuntime (the route buckets they spend
are shared), and each failure is collected, so a run reports every case that broke."""

import http.client
import json
import logging
import select
import socket
import time
from urllib.parse import urlsplit

import pytest

from avatarflow_local.runtime import LocalRuntime, Settings

pytestmark = pytest.mark.e2e

READ_TIMEOUT_S = 1.0  # the front door's request deadline for this run (10 s by default)
FAST_S = 2.0  # what an answer that needs no waiting may take, on a loaded 2-core machine
USER, OTHER = "alice", "bob"
UPLOAD = {"files": [{"name": "a.jpg", "content_type": "image/jpeg"}]}
GENERATE = {"prompt": "portrait of sks person", "num_images": 1, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    # A stack name of its own: moto's state outlives a LocalRuntime in this process, so another
    # e2e test's stack of the default name may still be there.
    settings = Settings(out_dir=tmp_path_factory.mktemp("probe") / "out", users=(USER,), stack_name="probe")
    with LocalRuntime(settings) as runtime:
        runtime.api.read_timeout_s = READ_TIMEOUT_S
        yield runtime


class Answer:
    def __init__(self, status: int, headers: dict[str, str], data: bytes, seconds: float):
        self.status, self.headers, self.data, self.seconds = status, headers, data, seconds
        try:
            self.json = json.loads(data)
        except ValueError:
            self.json = None

    def __repr__(self) -> str:
        return f"{self.status} {self.data[:160]!r} in {self.seconds:.2f} s"


def exchange(rt, raw: bytes, trickle: tuple[bytes, ...] = (), gap: float = 0.3) -> Answer:
    """Send raw bytes (then each piece of `trickle`, `gap` seconds apart, until the server
    answers) on a new connection and read one response. A send the server cut short (it
    answered first) is not an error."""
    parts = urlsplit(rt.api_url)
    started = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        try:
            sock.sendall(raw)
            for piece in trickle:
                if select.select([sock], [], [], gap)[0]:
                    break  # answered already
                sock.sendall(piece)
        except OSError:
            pass
        response = http.client.HTTPResponse(sock)
        response.begin()
        data = response.read()
    return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, data,
                  time.monotonic() - started)


def request(method: str, path: str, *, token: str | None = None, body: bytes | None = None,
            headers: dict[str, str] | None = None, length: str | None = "auto") -> bytes:
    """A request's bytes. Content-Length: the body's length ("auto"), this text, or none (None)."""
    head = {"Host": "127.0.0.1", "Content-Type": "application/json", **(headers or {})}
    if token:
        head["Authorization"] = f"Bearer {token}"
    if length == "auto":
        if body is not None:
            head["Content-Length"] = str(len(body))
    elif length is not None:
        head["Content-Length"] = length
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def nested(depth: int) -> bytes:
    return ('{"prompt": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}").encode()


def gateway(status: int):
    """API Gateway's own answer: exactly {"message": <the reason phrase>}."""
    phrase = http.client.responses[status]
    return status, lambda body: body == {"message": phrase}


def api(status: int, check=lambda body: True):
    """The API function's answer: its JSON with statusCode and a message."""
    return status, lambda body: isinstance(body, dict) and body.get("statusCode") == status \
        and isinstance(body.get("message"), str) and check(body)


def fields(*names: str):
    return lambda body: {e["field"] for e in body.get("errors", [])} >= set(names)


def test_every_malformed_request_gets_an_api_gateway_answer_in_bounded_time(rt, caplog, capfd):
    caplog.set_level(logging.WARNING)
    token = rt.token(USER)
    gen, up, models = f"/users/{USER}/generations", f"/users/{USER}/uploads", f"/users/{USER}/models"
    chunked_te = {"Transfer-Encoding": "chunked"}
    upload = json.dumps(UPLOAD).encode()

    def post(path: str, body: bytes, **kw) -> bytes:
        return request("POST", path, token=token, body=body, **kw)

    def head_of(raw: bytes) -> bytes:
        return raw.split(b"\r\n\r\n")[0] + b"\r\n\r\n"

    def typed(**patch) -> bytes:
        return json.dumps({**GENERATE, **patch}).encode()

    fast, slow = FAST_S, READ_TIMEOUT_S + FAST_S
    cases = [
        # (name, request bytes, trickle, (status, body check), seconds allowed)
        # --- the API behind the front door (the generation route first: its bucket is full)
        ("body not UTF-8", post(gen, b'{"prompt": "\xff\xfe"}'), (), api(400, fields("body")), fast),
        ("JSON nested 1,500 deep", post(gen, nested(1500)), (), api(400, fields("body")), fast),
        ("a string where a float goes", post(gen, typed(guidance_scale="7.5")), (),
         api(400, fields("body.guidance_scale")), fast),
        ("a float where an int goes", post(gen, typed(num_images=1.0)), (),
         api(400, fields("body.num_images")), fast),
        ("another user's route, deep body",
         request("POST", f"/users/{OTHER}/generations", token=token, body=nested(1500)), (), api(403), fast),
        ("another user's route, bad UTF-8",
         request("POST", f"/users/{OTHER}/uploads", token=token, body=b"\xff" * 100), (), api(403), fast),
        ("3.5 MB of unknown keys", post(up, json.dumps({f"k{i}": 0 for i in range(200_000)}).encode()), (),
         api(413), fast),
        ("7 MB body: over Lambda's 6 MB", post(up, b"[" + b" " * (7 << 20) + b"]"), (), gateway(413), 4.0),
        ("no token, deep body", request("POST", gen, body=nested(1500)), (), gateway(401), fast),
        ("a valid upload, chunked",
         post(up, chunked(upload[:10], upload[10:]), length=None, headers=chunked_te), (),
         (200, lambda body: body["uploads"][0]["name"] == "a.jpg"), fast),
        ("a valid upload, Expect: 100-continue", post(up, upload, headers={"Expect": "100-continue"}), (),
         (200, lambda body: len(body["uploads"]) == 1), fast),
        # --- framing
        ("Content-Length: abc", post(up, b"", length="abc"), (), gateway(400), fast),
        ("Content-Length: -5", post(up, b"", length="-5"), (), gateway(400), fast),
        ("Content-Length: 1.5", post(up, b"x", length="1.5"), (), gateway(400), fast),
        ("two different Content-Lengths", post(up, b"{}", headers={"content-length": "3"}), (),
         gateway(400), fast),
        ("Content-Length over 10 MB", head_of(post(up, b"", length=str((10 << 20) + 1))), (),
         gateway(413), fast),
        ("Content-Length of 5,000 digits", head_of(post(up, b"", length="9" * 5000)), (), gateway(413), fast),
        ("Content-Length larger than the body sent", post(up, b"{}", length="100"), (), gateway(408), slow),
        ("slowloris: a header a byte at a time", b"POST " + up.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Slow: ",
         (b"a",) * 8, gateway(408), slow),
        ("slowloris: the body a byte at a time", head_of(post(up, upload)),
         tuple(upload[i:i + 1] for i in range(8)), gateway(408), slow),
        ("chunked with a bad chunk size", post(up, b"zz\r\n{}\r\n0\r\n\r\n", length=None, headers=chunked_te),
         (), gateway(400), fast),
        ("chunked chunk over 10 MB", post(up, b"A00001\r\n", length=None, headers=chunked_te), (),
         gateway(413), fast),
        ("chunked and Content-Length", post(up, chunked(upload), length="5", headers=chunked_te), (),
         gateway(400), fast),
        ("Transfer-Encoding: gzip", post(up, upload, length=None, headers={"Transfer-Encoding": "gzip"}), (),
         gateway(400), fast),
        # --- request line and headers (HTTP API: 10,240 bytes together)
        ("URL of 11,000 bytes", request("GET", f"{models}?q=" + "a" * 11_000, token=token), (),
         gateway(414), fast),
        ("URL of 70,000 bytes", request("GET", "/" + "a" * 70_000), (), gateway(414), fast),
        ("headers over 10,240 bytes", request("GET", models, token=token,
                                              headers={f"X-H{i}": "v" * 200 for i in range(60)}), (),
         gateway(431), fast),
        ("one header of 70,000 bytes", request("GET", models, headers={"X-Big": "v" * 70_000}), (),
         gateway(431), fast),
        ("101 headers", request("GET", models, headers={f"X-{i}": "1" for i in range(101)}), (),
         gateway(431), fast),
        ("garbage request line", b"\x00\x01\x02 garbage\r\n\r\n", (), gateway(400), fast),
        ("blank request line", b"   \r\n\r\n", (), gateway(400), fast),
        ("HTTP/2.0 request line", b"GET / HTTP/2.0\r\n\r\n", (), gateway(505), fast),
        ("HTTP/0.9 request", b"GET /users/alice/models\r\n", (), gateway(400), fast),
        ("unknown method", request("BREW", models, token=token), (), gateway(404), fast),
    ]
    failures = []
    capfd.readouterr()  # what the stack printed while starting is not the probe's
    for name, raw, trickle, (status, check), bound in cases:
        try:
            answer = exchange(rt, raw, trickle)
        except (OSError, http.client.HTTPException) as err:
            failures.append(f"{name}: no answer ({type(err).__name__}: {err})")
            continue
        if answer.status != status or answer.json is None or not check(answer.json):
            failures.append(f"{name}: expected {status} with an API Gateway JSON body, got {answer!r}")
        elif answer.headers.get("content-type") != "application/json":
            failures.append(f"{name}: content-type {answer.headers.get('content-type')!r}")
        elif answer.seconds > bound:
            failures.append(f"{name}: answered after {answer.seconds:.2f} s (bound {bound} s)")

    # --- throttling: the authorizer before the route's bucket, one bucket per route
    flood = [exchange(rt, request("GET", models, token=t)).status for t in (None, "x.y.z", "Bearer") * 20]
    if flood != [401] * 60:
        failures.append(f"tokenless flood: expected 60 x 401, got {sorted(set(flood))}")
    after = [exchange(rt, request("GET", models, token=token)).status for _ in range(5)]
    if after != [200] * 5:
        failures.append(f"after a tokenless flood the signed-in user gets {after}, not 5 x 200")
    bad_generation = json.dumps({**GENERATE, "steps": "30"}).encode()  # 400: nothing queued
    started, burst = time.monotonic(), []
    while len(burst) < 40 and burst.count(429) < 2:
        burst.append(exchange(rt, post(gen, bad_generation)).status)
    refill = 2 * (time.monotonic() - started) + 1  # the template's 2/s while the loop ran
    if set(burst) != {400, 429} or burst.index(429) > 10 + refill:
        failures.append(f"generation route: expected its own burst (10) then 429, got {burst}")
    if exchange(rt, request("GET", models, token=token)).status != 200:
        failures.append("the generation route's spent bucket throttled another route")

    printed = capfd.readouterr()
    logged = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    for where, text in (("stdout", printed.out), ("stderr", printed.err)):
        if "Traceback" in text:
            failures.append(f"a traceback on {where}: {text[text.index('Traceback'):][:600]}")
    failures += [f"a traceback in the log: {r.name}: {r.getMessage()[:200]}" for r in logged]
    assert not failures, "\n".join(failures)
