"""The local API Gateway: HTTP requests -> HTTP API (payload 2.0) events for functions/api.

What API Gateway does before the Lambda runs is done here too: only the template's routes
exist (others: 404 `{"message": "Not Found"}`), CORS preflights are answered from the
template's CorsConfiguration, and each route's JWT authorizer (the template's HttpApi
`Auth`: issuer, audience, AuthorizationScopes) checks the bearer token by the rules API
Gateway documents for HTTP API JWT authorizers (`JwtVerifier`): keys from the issuer's
jwks_uri, RS256, `kid`, `iss`, `aud`/`client_id`, `exp`, `nbf`, `iat`, scopes. A refused
token is 401 `{"message": "Unauthorized"}` (403 `{"message": "Forbidden"}` for a missing
scope) and never reaches the Lambda; an accepted one's claims become
`requestContext.authorizer.jwt.claims`, rendered as API Gateway renders them.
Route throttling (the template's DefaultRouteSettings, and RouteSettings per route key) is
one token bucket per route, taken after the authorizer accepted the token: over it, 429
`{"message": "Too Many Requests"}` before the Lambda runs. Requests that fail authorization
are not metered (AWS does not charge them), so a tokenless flood cannot spend the bucket
that signed-in users share.

The front door itself answers every malformed request as API Gateway does, with a JSON
`{"message": ...}` body and within a bounded time (`read_timeout_s` for the whole request,
from its first byte to the body's last): the HTTP API quotas (request line and header
values together at most 10,240 bytes: 414 for the request line, 431 for the headers;
payload at most 10 MB: 413), Content-Length a plain decimal (else 400), chunked bodies
decoded (malformed chunks 400), Transfer-Encoding with Content-Length 400, a request that
stalls 408; a body that is not UTF-8 text reaches the Lambda base64-encoded; an event or a
Lambda answer over Lambda's 6 MB invocation payload is 413 / 500. No traceback: a client
that goes away is a log line.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import socket
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from avatarflow_local.background_server import BackgroundServer
from avatarflow_local.workflow_stack import ACCOUNT, HttpRoute, JwtAuthorizer, Throttle

LOG = logging.getLogger(__name__)
MAX_BODY_BYTES = 10 * 1024 * 1024  # HTTP API quota "Payload size": 10 MB
MAX_HEAD_BYTES = 10240  # HTTP API quota "Total combined size of request line and header values"
MAX_INVOKE_BYTES = 6 * 1024 * 1024  # Lambda: 6 MB each for a synchronous request and response
READ_TIMEOUT_S = 10.0  # the whole request, first byte to last; also a keep-alive connection's idle time
JWKS_CACHE_S = 2 * 3600  # API Gateway "can cache the public key for two hours"
ALGORITHMS = ("RS256",)  # API Gateway: RSA only; the issuer's JWK pins its key to RS256 (`alg`)


class Denied(Exception):  # noqa: N818 - an answer, not a fault
    """A request the authorizer refuses: 401 invalid_token, or 403 insufficient_scope."""

    def __init__(self, description: str, status: int = 401):
        super().__init__(description)
        self.status = status
        self.description = description

    def answer(self, scopes: tuple[str, ...]) -> tuple[int, dict, dict[str, str]]:
        """Status, body and `www-authenticate` as API Gateway sends them. The header's form is
        AWS's published example (`Bearer scope="" error="invalid_token" error_description="the
        token does not have a valid audience"`); that description is AWS's, the others are
        this adapter's own wording in the same style."""
        error = "invalid_token" if self.status == 401 else "insufficient_scope"
        header = f'Bearer scope="{" ".join(scopes)}" error="{error}" error_description="{self.description}"'
        body = {"message": "Unauthorized" if self.status == 401 else "Forbidden"}
        return self.status, body, {"www-authenticate": header}


def claim_text(value: Any) -> str | None:
    """A claim's value as payload 2.0 puts it in `jwt.claims`: every value a string;
    numbers and booleans as their JSON text ("1787996002", "true"); arrays in API Gateway's
    bracket form, items space-separated ("[admin editors]", not JSON); null claims left out;
    objects as JSON text (AWS's rendering of an object claim is not documented)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "[" + " ".join(v if isinstance(v, str) else json.dumps(v) for v in value) + "]"
    return json.dumps(value, separators=(",", ":"))


def _number(claims: dict, name: str, required: bool = False) -> float | None:
    value = claims.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Denied(f"the token's {name} claim is not a NumericDate")
    return float(value)


def _token_scopes(claims: dict) -> list[str] | None:
    """The token's scopes: `scope` (space-separated, Cognito's form) or else `scp`
    (a list or a space-separated string); None when it has neither."""
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str) and value.strip():
            return value.split()
        if isinstance(value, list) and value:
            return [str(v) for v in value]
    return None


def _fetch_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - the template's issuer
        return json.loads(response.read())


class JwtVerifier:
    """One HTTP API JWT authorizer, verifying as API Gateway documents it ("Control access
    to HTTP APIs with JWT authorizers"): the token (with or without `Bearer `) is decoded;
    its `alg` must be RS256 and its `kid` a key of the issuer's JWKS (from the discovery
    document's jwks_uri, cached two hours); the RS256 signature must verify with that key;
    `iss` must equal the configured issuer; `aud` (or, only when there is no `aud`,
    `client_id`) must be one of the configured audiences; `exp` must be after now, `nbf`
    and `iat` (when present) not after now. On a route with AuthorizationScopes the token's
    `scope`/`scp` must hold one of them (else 403)."""

    def __init__(self, config: JwtAuthorizer, clock: Callable[[], float] = time.time,
                 fetch: Callable[[str], dict] = _fetch_json):
        self.config = config
        self.clock = clock
        self.fetch = fetch
        self._keys: KeySet | None = None
        self._keys_at = 0.0
        self._lock = threading.Lock()

    def keys(self) -> KeySet:
        with self._lock:
            if self._keys is None or time.monotonic() - self._keys_at > JWKS_CACHE_S:
                discovery = self.fetch(f"{self.config.issuer}/.well-known/openid-configuration")
                jwks = self.fetch(discovery["jwks_uri"])
                rsa = [k for k in jwks["keys"] if k.get("kty") == "RSA" and k.get("use", "sig") == "sig"]
                self._keys = KeySet.import_key_set({"keys": rsa})
                self._keys_at = time.monotonic()
            return self._keys

    def verify(self, authorization: str, route_scopes: tuple[str, ...] = ()) -> tuple[dict, list[str] | None]:
        """(claims, scopes) for the Lambda event, or raises Denied. `scopes` is the token's
        scope list on a route with AuthorizationScopes, else None (what API Gateway passes)."""
        token = authorization.strip()
        if token[:7].lower() == "bearer ":
            token = token[7:].strip()
        if not token:
            raise Denied("the token is missing")
        parts = token.split(".")
        try:
            header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
        except (ValueError, IndexError):
            raise Denied("the token could not be decoded") from None
        if len(parts) != 3 or not isinstance(header, dict):
            raise Denied("the token could not be decoded")
        if header.get("alg") not in ALGORITHMS:
            raise Denied(f"signing method {header.get('alg')} is invalid")
        try:
            keys = self.keys()
        except (OSError, ValueError, KeyError, JoseError) as err:
            LOG.warning("JWKS of %s unavailable: %s", self.config.issuer, err)
            raise Denied("the issuer's keys could not be fetched") from None
        kid = header.get("kid")
        if not isinstance(kid, str) or not any(k.kid == kid for k in keys):
            raise Denied("the token's kid is not a key of the issuer")
        try:
            claims = jwt.decode(token, keys, algorithms=list(ALGORITHMS)).claims
        except (JoseError, ValueError):
            raise Denied("the token's signature is invalid") from None
        self._check_claims(claims)
        scopes = _token_scopes(claims)
        if route_scopes:
            if not scopes or not set(scopes) & set(route_scopes):
                raise Denied("the token does not have a valid scope", 403)
        else:
            scopes = None
        rendered = {k: claim_text(v) for k, v in claims.items()}
        return {k: v for k, v in rendered.items() if v is not None}, scopes

    def _check_claims(self, claims: dict) -> None:
        if claims.get("iss") != self.config.issuer:
            raise Denied("the token does not have a valid issuer")
        aud = claims["aud"] if "aud" in claims else claims.get("client_id")
        audiences = aud if isinstance(aud, list) else [aud]
        if not any(isinstance(a, str) and a in self.config.audience for a in audiences):
            raise Denied("the token does not have a valid audience")
        now = self.clock()
        if _number(claims, "exp", required=True) <= now:
            raise Denied("the token has expired")
        nbf = _number(claims, "nbf")
        if nbf is not None and nbf > now:
            raise Denied("the token is not valid yet")
        iat = _number(claims, "iat")
        if iat is not None and iat > now:
            raise Denied("the token was issued in the future")


class TokenBucket:
    """API Gateway's throttling algorithm: `burst` tokens, refilled at `rate` per second;
    a request takes one or is refused. One bucket per route of the stage (the local API has
    one stage): DefaultRouteSettings gives each route its limit, RouteSettings overrides it."""

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


def _items(values: list[str] | None) -> list[str]:
    """A list header's items across its repeats ("5, 5" and two "5" lines alike)."""
    return [item.strip() for item in ",".join(values or []).split(",") if item.strip()]


class Refused(Exception):  # noqa: N818 - an answer, not a fault
    """A request the front door answers itself, before any route: status and the reason
    phrase as the JSON message. The connection closes after it (the rest of the request
    may be unread)."""

    def __init__(self, status: HTTPStatus):
        super().__init__(status.phrase)
        self.status = status


class _DeadlineReader(io.RawIOBase):
    """The socket's bytes with every read bounded by the request's deadline: a client that
    sends slowly, or stops (slowloris, a Content-Length larger than what it sends), gets
    TimeoutError when the deadline passes instead of holding a thread until it leaves."""

    def __init__(self, sock: socket.socket, deadline: Callable[[], float]):
        super().__init__()
        self.sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline() - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """socketserver prints a traceback for whatever a handler lets escape; a client that
        went away is not a fault of the server: one log line. Anything else is a bug."""
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            LOG.info("api connection from %s ended: %s", client_address[0], err)
        else:
            LOG.error("api request from %s failed", client_address[0], exc_info=err)


class HttpApi(BackgroundServer):
    """A ThreadingHTTPServer on 127.0.0.1 that turns requests into API Gateway v2 events."""

    thread_name = "http-api"

    def __init__(
        self,
        routes: list[HttpRoute],
        invoke: Callable[[str, dict], tuple[object, str | None]],
        authorizers: dict[str, JwtAuthorizer],
        *,
        function: str = "api",
        cors: dict | None = None,
        throttle: Throttle | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        read_timeout_s: float = READ_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.routes = [(r, _route_pattern(r.path)) for r in routes]
        self.invoke = invoke
        missing = {r.authorizer for r in routes if r.authorizer} - set(authorizers)
        if missing:
            raise KeyError(f"routes name authorizers the API does not have: {sorted(missing)}")
        for config in authorizers.values():
            if not config.identity_source.startswith("$request.header."):
                raise ValueError(f"only header identity sources run locally: {config.identity_source}")
        self.verifiers = {name: JwtVerifier(config) for name, config in authorizers.items()}
        self.function = function
        self.cors = cors or {}
        self.read_timeout_s = read_timeout_s
        self.buckets: dict[str, TokenBucket] = {}
        if throttle is not None:
            keys = {f"{r.method} {r.path}" for r in routes}
            unknown = set(throttle.routes) - keys
            if unknown:  # CloudFormation fails the stage: "Unable to find Route by key ..."
                raise KeyError(f"RouteSettings name routes the API does not have: {sorted(unknown)}")
            for key in keys:
                limit = throttle.for_route(key)
                self.buckets[key] = TokenBucket(limit.rate, limit.burst, clock)
        self.server = _Server((host, port), self._handler_class())

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"


    # ------------------------------------------------------------------ request -> event
    def match(self, method: str, path: str) -> tuple[HttpRoute, dict] | None:
        for route, pattern in self.routes:
            found = pattern.match(path)
            if found and route.method in (method, "ANY"):
                return route, found.groupdict()
        return None

    def authorize(self, route: HttpRoute, headers: dict[str, str]) -> dict | None:
        """The event's `requestContext.authorizer` for this route (None: a route without an
        authorizer), or raises Denied."""
        if route.authorizer is None:
            return None
        verifier = self.verifiers[route.authorizer]
        header = verifier.config.identity_source.removeprefix("$request.header.").lower()
        claims, scopes = verifier.verify(headers.get(header, ""), route.scopes)
        return {"jwt": {"claims": claims, "scopes": scopes}}

    def admit(self, route_key: str) -> bool:
        """Take a token from the route's bucket (True when the API is not throttled)."""
        bucket = self.buckets.get(route_key)
        return bucket is None or bucket.take()

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
        authorizer: dict | None,
        source_ip: str,
    ) -> dict:
        now = datetime.now(UTC)
        text_types = ("application/json", "text/", "application/x-www-form-urlencoded")
        text = None
        if body and any(t in headers.get("content-type", "") for t in text_types):
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                text = None  # not text after all: the Lambda gets the bytes, base64-encoded
        event = {
            "version": "2.0",
            "routeKey": route_key,
            "rawPath": raw_path,
            "rawQueryString": query,
            "headers": headers,
            "requestContext": {
                "accountId": ACCOUNT,
                "apiId": "local",
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
            "isBase64Encoded": bool(body) and text is None,
        }
        if authorizer is not None:  # a route without an authorizer has no `authorizer` key
            event["requestContext"]["authorizer"] = authorizer
        if query:
            params: dict[str, list[str]] = {}
            for k, v in parse_qsl(query, keep_blank_values=True):
                params.setdefault(k, []).append(v)
            event["queryStringParameters"] = {k: ",".join(v) for k, v in params.items()}
        if "cookie" in headers:
            event["cookies"] = [c.strip() for c in headers["cookie"].split(";") if c.strip()]
        if body:
            event["body"] = text if text is not None else base64.b64encode(body).decode()
        return event

    def _handler_class(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "avatarflow-local"
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.rfile.close()  # the stdlib's reader holds a reference that would keep the socket open
                self._deadline = time.monotonic() + api.read_timeout_s
                self.rfile = io.BufferedReader(_DeadlineReader(self.connection, lambda: self._deadline))

            def log_message(self, fmt, *args):  # noqa: A003 - stdlib name
                LOG.info("api %s", fmt % args)

            def send_error(self, code, message=None, explain=None) -> None:
                """The stdlib's own refusals (bad request line, version, too many or too long
                header lines) as API Gateway words them: JSON, not an HTML page."""
                self.close_connection = True
                self._json(int(code), {"message": HTTPStatus(code).phrase})
                self._linger()

            def _linger(self) -> None:
                """After an answer that leaves part of the request unread: stop sending and
                drop what the client still sends, briefly (at most a second and the payload
                quota), so closing does not reset the connection before the client has read
                the answer (a close with unread data sends RST, and the answer is lost)."""
                try:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_WR)
                    self.connection.settimeout(0.2)
                    end, dropped = time.monotonic() + 1.0, 0
                    while time.monotonic() < end and dropped < MAX_BODY_BYTES:
                        data = self.connection.recv(64 * 1024)
                        if not data:
                            break
                        dropped += len(data)
                except OSError:
                    pass

            def handle_expect_100(self) -> bool:
                return True  # 100 Continue is sent once the request's head is accepted (_read_body)

            def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
                if self.request_version == "HTTP/0.9":
                    self.request_version = "HTTP/1.0"  # answer with a status line all the same
                self.connection.settimeout(api.read_timeout_s)  # writing is not bound by the read deadline
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, status: int, payload: dict, extra: dict | None = None) -> None:
                self._send(
                    status,
                    {"content-type": "application/json", **(extra or {})},
                    json.dumps(payload).encode(),
                )

            def handle_one_request(self) -> None:
                """One request, every outcome an answer: the stdlib's version would leave a
                timeout unanswered, accept any header size and let exceptions print."""
                self._deadline = time.monotonic() + api.read_timeout_s
                self.command, self.request_version, self.requestline = None, "HTTP/1.1", ""
                started = False
                try:
                    line = self.rfile.readline(MAX_HEAD_BYTES + 1)
                    if line in (b"\r\n", b"\n"):  # RFC 9112 2.2: one empty line before a request is ignored
                        line = self.rfile.readline(MAX_HEAD_BYTES + 1)
                    if not line:
                        self.close_connection = True  # the client closed the connection (or sent nothing)
                        return
                    started = True
                    self.raw_requestline = line
                    if len(line) > MAX_HEAD_BYTES:
                        self.requestline = str(line[:80], "iso-8859-1") + "..."
                        raise Refused(HTTPStatus.REQUEST_URI_TOO_LONG)
                    if len(line.split()) < 3:  # no version (HTTP/0.9), or not a request line at all
                        self.requestline = str(line[:80], "iso-8859-1").rstrip("\r\n")
                        raise Refused(HTTPStatus.BAD_REQUEST)
                    if not self.parse_request():  # it has answered (send_error)
                        self.close_connection = True
                        return
                    headers = self._head()
                    body = self._read_body()
                    self._respond(headers, body)
                    self.wfile.flush()
                except Refused as refused:
                    self.close_connection = True
                    self._json(refused.status, {"message": refused.status.phrase})
                    self._linger()
                except TimeoutError:
                    self.close_connection = True
                    LOG.info("api request from %s timed out after %.1f s", self.client_address[0],
                             api.read_timeout_s)
                    if started:
                        self._json(HTTPStatus.REQUEST_TIMEOUT, {"message": HTTPStatus.REQUEST_TIMEOUT.phrase})
                        self._linger()
                except OSError as err:  # the client went away: nobody to answer
                    self.close_connection = True
                    LOG.info("api connection from %s ended: %s", self.client_address[0], err)
                except Exception:  # a bug of this adapter: API Gateway would still answer 500
                    LOG.exception("api request %r failed", self.requestline[:200])
                    self.close_connection = True
                    self._json(500, {"message": "Internal Server Error"})

            def _head(self) -> dict[str, str]:
                """The headers as payload 2.0 carries them (names lowercased, repeats joined
                with commas), after the HTTP API quota on the head's size."""
                size = len(self.requestline) + sum(len(v) for v in self.headers.values())
                if size > MAX_HEAD_BYTES:
                    raise Refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
                headers: dict[str, str] = {}
                for name, value in self.headers.items():
                    name = name.lower()
                    headers[name] = f"{headers[name]},{value}" if name in headers else value
                return headers

            def _read_body(self) -> bytes:
                """The body by its framing: chunked, or Content-Length (1*DIGIT, repeats only
                with the same value), else none. Both framings at once is 400 (RFC 9112 6.1:
                the request smuggling case)."""
                encodings = self.headers.get_all("transfer-encoding")
                codings = [c.lower() for c in _items(encodings)]
                declared = self.headers.get_all("content-length")
                lengths = set(_items(declared))
                if (declared and not lengths) or (encodings and not codings):
                    raise Refused(HTTPStatus.BAD_REQUEST)  # the header with no value
                if codings:
                    if lengths or codings != ["chunked"]:
                        raise Refused(HTTPStatus.BAD_REQUEST)
                    self._continue()
                    return self._read_chunked()
                if not lengths:
                    return b""
                if len(lengths) != 1 or not re.fullmatch(r"[0-9]+", value := lengths.pop()):
                    raise Refused(HTTPStatus.BAD_REQUEST)
                digits = value.lstrip("0") or "0"
                if len(digits) > 12 or int(digits) > MAX_BODY_BYTES:  # never int() of 10,000 digits
                    raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
                length = int(digits)
                if not length:
                    return b""
                self._continue()
                return self._read_exactly(length)

            def _continue(self) -> None:
                expects = self.headers.get("expect", "").lower() == "100-continue"
                if expects and self.request_version >= "HTTP/1.1":
                    self.send_response_only(HTTPStatus.CONTINUE)
                    self.end_headers()

            def _read_exactly(self, size: int) -> bytes:
                data = self.rfile.read(size)
                if len(data) < size:
                    raise ConnectionAbortedError("the client closed the connection inside the body")
                return data

            def _read_chunked(self) -> bytes:
                body = bytearray()
                while True:
                    line = self.rfile.readline(1024)
                    size_text = line.split(b";", 1)[0].strip()
                    if not line.endswith(b"\n") or not re.fullmatch(rb"[0-9A-Fa-f]{1,8}", size_text):
                        raise Refused(HTTPStatus.BAD_REQUEST)
                    size = int(size_text, 16)
                    if not size:
                        break
                    if len(body) + size > MAX_BODY_BYTES:
                        raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
                    body += self._read_exactly(size)
                    if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                        raise Refused(HTTPStatus.BAD_REQUEST)
                trailers = 0
                while (line := self.rfile.readline(MAX_HEAD_BYTES + 1)) not in (b"\r\n", b"\n"):
                    trailers += len(line)
                    if not line.endswith(b"\n") or trailers > MAX_HEAD_BYTES:
                        raise Refused(HTTPStatus.BAD_REQUEST)
                return bytes(body)

            def _respond(self, headers: dict[str, str], body: bytes) -> None:
                split = urlsplit(self.path)
                headers.update({"x-forwarded-proto": "http", "x-forwarded-for": self.client_address[0]})
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
                route, path_parameters = matched
                route_key = f"{route.method} {route.path}"
                try:
                    authorizer = api.authorize(route, headers)
                except Denied as denied:
                    status, answer, challenge = denied.answer(route.scopes)
                    self._json(status, answer, {**cors, **challenge})
                    return
                # Throttled once the authorizer accepted the caller: a refused token is not
                # a metered request, so it never spends the route's bucket.
                if not api.admit(route_key):
                    self._json(429, {"message": "Too Many Requests"}, cors)
                    return
                event = api.event(self.command, split.path, split.query, headers, body, route_key,
                                  path_parameters, authorizer, self.client_address[0])
                if len(json.dumps(event)) > MAX_INVOKE_BYTES:  # Lambda refuses the invocation
                    self._json(413, {"message": "Request Entity Too Large"}, cors)
                    return
                try:
                    payload, error = api.invoke(api.function, event)
                except Exception as err:  # noqa: BLE001 - a failed Invoke is API Gateway's 500
                    LOG.warning("api: invoking %s failed: %s: %s", api.function, type(err).__name__, err)
                    payload, error = None, "Invoke"
                if (error is not None or not isinstance(payload, dict) or "statusCode" not in payload
                        or len(json.dumps(payload, default=str)) > MAX_INVOKE_BYTES):
                    self._json(500, {"message": "Internal Server Error"}, cors)
                    return
                out_headers = {k.lower(): str(v) for k, v in (payload.get("headers") or {}).items()}
                for name, values in (payload.get("multiValueHeaders") or {}).items():
                    out_headers[name.lower()] = ",".join(map(str, values))
                out = payload.get("body") or ""
                data = base64.b64decode(out) if payload.get("isBase64Encoded") else out.encode("utf-8")
                self._send(int(payload["statusCode"]), {**cors, **out_headers}, data)

        return Handler
