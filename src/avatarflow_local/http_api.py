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
The stage's route throttling (the template's DefaultRouteSettings rate and burst) is a
token bucket: over it, 429 `{"message": "Too Many Requests"}` before the Lambda runs.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from avatarflow_local.workflow_stack import ACCOUNT, HttpRoute, JwtAuthorizer, Throttle

LOG = logging.getLogger(__name__)
MAX_BODY_BYTES = 10 * 1024 * 1024  # API Gateway's payload limit
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
        authorizers: dict[str, JwtAuthorizer],
        *,
        function: str = "api",
        cors: dict | None = None,
        throttle: Throttle | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
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
                route, path_parameters = matched
                try:
                    authorizer = api.authorize(route, headers)
                except Denied as denied:
                    status, answer, challenge = denied.answer(route.scopes)
                    self._json(status, answer, {**cors, **challenge})
                    return
                event = api.event(
                    self.command,
                    split.path,
                    split.query,
                    headers,
                    body,
                    f"{route.method} {route.path}",
                    path_parameters,
                    authorizer,
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
