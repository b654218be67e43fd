"""The local API Gateway: HTTP requests -> HTTP API (payload 2.0) events for functions/api.

What API Gateway does before the Lambda runs is done here too: only the template's routes
exist (others: 404 `{"message": "Not Found"}`), CORS preflights are answered from the
template's CorsConfiguration, and the JWT authorizer is played by a local dev token: a
signed token whose claims become `requestContext.authorizer.jwt.claims`. The signing key is
random per run (printed tokens stop working when the stack stops); nothing secret is in
the repository. Missing or bad token: 401 `{"message": "Unauthorized"}`, as API Gateway.
The stage's route throttling (the template's DefaultRouteSettings rate and burst) is a
token bucket: over it, 429 `{"message": "Too Many Requests"}` before the Lambda runs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from avatarflow.ids import validate_id
from avatarflow_local.workflow_stack import ACCOUNT, HttpRoute, Throttle

LOG = logging.getLogger(__name__)
MAX_BODY_BYTES = 10 * 1024 * 1024  # API Gateway's payload limit
TOKEN_PREFIX = "local"  # noqa: S105 - a format marker, not a secret


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class DevTokens:
    """`local.<claims>.<hmac-sha256>` tokens signed with a key made for this run."""

    issuer = "avatarflow-local"

    def __init__(self, key: bytes | None = None, ttl_s: int = 24 * 3600):
        self._key = key or secrets.token_bytes(32)
        self.ttl_s = ttl_s

    def issue(self, sub: str) -> str:
        validate_id(sub, "user_id")
        now = int(time.time())
        claims = {"sub": sub, "iss": self.issuer, "token_use": "access", "iat": now, "exp": now + self.ttl_s}
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{TOKEN_PREFIX}.{body}.{self._sign(body)}"

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._key, f"{TOKEN_PREFIX}.{body}".encode(), hashlib.sha256).digest())

    def verify(self, token: str) -> dict | None:
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            return None
        if not hmac.compare_digest(parts[2], self._sign(parts[1])):
            return None
        try:
            claims = json.loads(_unb64(parts[1]))
        except ValueError:
            return None
        if not isinstance(claims, dict) or claims.get("exp", 0) < time.time():
            return None
        return {k: str(v) for k, v in claims.items()}  # API Gateway passes claims as strings


class TokenBucket:
    """API Gateway's throttling algorithm: `burst` tokens, refilled at `rate` per second;
    a request takes one or is refused. One bucket per stage, as DefaultRouteSettings
    applies the same limit to every route (the local API has one stage)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = float(rate), int(burst), clock
        self._tokens = float(burst)
        self._at = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self.clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False


def _route_pattern(path: str) -> re.Pattern:
    return re.compile("^" + re.sub(r"\\\{([A-Za-z0-9_]+)\\\}", r"(?P<\1>[^/]+)", re.escape(path)) + "$")


class HttpApi:
    """A ThreadingHTTPServer on 127.0.0.1 that turns requests into API Gateway v2 events."""

    def __init__(
        self,
        routes: list[HttpRoute],
        invoke: Callable[[str, dict], tuple[object, str | None]],
        tokens: DevTokens,
        *,
        function: str = "api",
        cors: dict | None = None,
        throttle: Throttle | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.routes = [(r.method, r.path, _route_pattern(r.path)) for r in routes]
        self.invoke = invoke
        self.tokens = tokens
        self.function = function
        self.cors = cors or {}
        self.bucket = TokenBucket(throttle.rate, throttle.burst) if throttle else None
        self.server = ThreadingHTTPServer((host, port), self._handler_class())
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HttpApi:
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, name="http-api", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    # ------------------------------------------------------------------ request -> event
    def match(self, method: str, path: str) -> tuple[str, dict] | None:
        for route_method, route_path, pattern in self.routes:
            found = pattern.match(path)
            if found and route_method in (method, "ANY"):
                return f"{route_method} {route_path}", found.groupdict()
        return None

    def cors_headers(self, origin: str | None) -> dict[str, str]:
        allowed = self.cors.get("AllowOrigins") or []
        if not origin or not allowed:
            return {}
        if "*" in allowed:
            value = "*"
        elif origin in allowed:
            value = origin
        else:
            return {}
        return {"access-control-allow-origin": value}

    def event(
        self,
        method: str,
        raw_path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        route_key: str,
        path_parameters: dict,
        claims: dict,
        source_ip: str,
    ) -> dict:
        now = datetime.now(UTC)
        text_types = ("application/json", "text/", "application/x-www-form-urlencoded")
        is_text = not body or any(t in headers.get("content-type", "") for t in text_types)
        event = {
            "version": "2.0",
            "routeKey": route_key,
            "rawPath": raw_path,
            "rawQueryString": query,
            "headers": headers,
            "requestContext": {
                "accountId": ACCOUNT,
                "apiId": "local",
                "authorizer": {"jwt": {"claims": claims, "scopes": None}},
                "domainName": headers.get("host", "127.0.0.1"),
                "domainPrefix": "local",
                "http": {
                    "method": method,
                    "path": raw_path,
                    "protocol": "HTTP/1.1",
                    "sourceIp": source_ip,
                    "userAgent": headers.get("user-agent", ""),
                },
                "requestId": str(uuid.uuid4()),
                "routeKey": route_key,
                "stage": "$default",
                "time": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
                "timeEpoch": int(now.timestamp() * 1000),
            },
            "pathParameters": path_parameters,
            "isBase64Encoded": not is_text,
        }
        if query:
            params: dict[str, list[str]] = {}
            for k, v in parse_qsl(query, keep_blank_values=True):
                params.setdefault(k, []).append(v)
            event["queryStringParameters"] = {k: ",".join(v) for k, v in params.items()}
        if "cookie" in headers:
            event["cookies"] = [c.strip() for c in headers["cookie"].split(";") if c.strip()]
        if body:
            event["body"] = body.decode("utf-8") if is_text else base64.b64encode(body).decode()
        return event

    def _handler_class(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "avatarflow-local"
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # noqa: A003 - stdlib name
                LOG.info("api %s", fmt % args)

            def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, status: int, payload: dict, extra: dict | None = None) -> None:
                self._send(
                    status,
                    {"content-type": "application/json", **(extra or {})},
                    json.dumps(payload).encode(),
                )

            def _handle(self) -> None:
                split = urlsplit(self.path)
                headers = {k.lower(): v for k, v in self.headers.items()}
                headers.update({"x-forwarded-proto": "http", "x-forwarded-for": self.client_address[0]})
                length = int(headers.get("content-length") or 0)
                if length > MAX_BODY_BYTES:
                    self._json(413, {"message": "Request Entity Too Large"})
                    return
                body = self.rfile.read(length) if length else b""
                cors = api.cors_headers(headers.get("origin"))
                if self.command == "OPTIONS" and "access-control-request-method" in headers:
                    preflight = dict(cors)
                    if cors:
                        preflight["access-control-allow-methods"] = ",".join(api.cors.get("AllowMethods", []))
                        preflight["access-control-allow-headers"] = ",".join(api.cors.get("AllowHeaders", []))
                        preflight["access-control-max-age"] = str(api.cors.get("MaxAge", 0))
                    self._send(204, preflight, b"")
                    return
                matched = api.match(self.command, split.path)
                if matched is None:
                    self._json(404, {"message": "Not Found"}, cors)
                    return
                # Throttled before the token is checked: a flood (bad tokens included) is
                # refused cheaply and never reaches the verifier or the Lambda.
                if api.bucket is not None and not api.bucket.take():
                    self._json(429, {"message": "Too Many Requests"}, cors)
                    return
                auth = headers.get("authorization", "")
                token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
                claims = api.tokens.verify(token) if token else None
                if claims is None:
                    self._json(
                        401,
                        {"message": "Unauthorized"},
                        {**cors, "www-authenticate": 'Bearer error="invalid_token"'},
                    )
                    return
                route_key, path_parameters = matched
                event = api.event(
                    self.command,
                    split.path,
                    split.query,
                    headers,
                    body,
                    route_key,
                    path_parameters,
                    claims,
                    self.client_address[0],
                )
                payload, error = api.invoke(api.function, event)
                if error is not None or not isinstance(payload, dict) or "statusCode" not in payload:
                    self._json(500, {"message": "Internal Server Error"}, cors)
                    return
                out_headers = {k.lower(): str(v) for k, v in (payload.get("headers") or {}).items()}
                for name, values in (payload.get("multiValueHeaders") or {}).items():
                    out_headers[name.lower()] = ",".join(map(str, values))
                out = payload.get("body") or ""
                data = base64.b64decode(out) if payload.get("isBase64Encoded") else out.encode("utf-8")
                self._send(int(payload["statusCode"]), {**cors, **out_headers}, data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _handle  # noqa: N815

        return Handler
