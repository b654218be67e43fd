"""A local OIDC issuer shaped like the Cognito user pool the template creates.

template.yaml's HttpApi trusts one issuer (`JwtConfiguration`): the stack's Cognito user
pool, or any OIDC provider given as the JwtIssuer/JwtAudience parameters. Locally this
module is that provider: an RSA key pair made per run (kept in memory: never written, never
logged, so printed tokens die with the process), a JWKS holding its public half under a
`kid`, and an OIDC discovery document, served on 127.0.0.1 at Cognito's paths
(`{issuer}/.well-known/openid-configuration`, `{issuer}/.well-known/jwks.json`, issuer =
`http://127.0.0.1:<port>/<region>_<pool>`). It has its own port, as Cognito has its own
host: the API's port serves only the template's routes (anything else is API Gateway's 404).

It mints tokens like Cognito's: access tokens (`token_use=access`, `client_id`, `scope`, no
`aud`) and id tokens (`token_use=id`, `aud`, `email`), RS256 with the key's `kid`. A second app
client, `backend_client_id`, plays the template's BackendClient: its client-credentials
access tokens are Cognito's shape for that grant (`sub` = `client_id` = the client's id,
`scope` = the resource server's scopes, here `avatarflow/admin`; no `username`).
The local runtime mints tokens for the users it is told about, and the web app signs in through the
same two endpoints Cognito's hosted UI gives a public app client (`/oauth2/authorize`,
`/oauth2/token`; authorization code with PKCE S256, RFC 7636), so the app's sign-in code is
the one that runs in the cloud. The local authorize page asks only for a user id: there are
no passwords locally. Its rules follow Cognito's: the redirect_uri must be a registered
callback URL (`allow_callback`), a code is single use and lives 5 minutes, and the token
request must repeat the client id and redirect_uri and prove the PKCE verifier. PKCE is
required here (Cognito makes it optional; the app always sends it).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import secrets
import string
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from joserfc import jwt
from joserfc.jwk import RSAKey

from avatarflow.ids import validate_id
from avatarflow_local.background_server import BackgroundServer
from avatarflow_local.workflow_stack import REGION, load_template

LOG = logging.getLogger(__name__)
ALGORITHM = "RS256"  # what Cognito signs with; the JWKS key says so (`alg`), so only RS256 verifies
COGNITO_SIGNIN_SCOPE = "aws.cognito.signin.user.admin"  # the scope of a USER_PASSWORD_AUTH access token
ADMIN_SCOPE = "avatarflow/admin"  # template: ApiResourceServer `avatarflow`, scope `admin`
UNIT_S = {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400}
CODE_TTL_S = 300  # Cognito's authorization codes are valid for 5 minutes
AUTHORIZE_PATH = "/oauth2/authorize"  # the paths of a Cognito user pool domain
TOKEN_PATH = "/oauth2/token"  # noqa: S105 - a URL path, not a secret
OIDC_SCOPES = ("openid", "email", "phone", "profile")


def _random(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def error_page(problem: str) -> str:
    return (f"<!doctype html><html lang=en><title>Sign-in error</title>"
            f"<main><h1>Sign-in error</h1><p>{html.escape(problem)}</p></main>")


def token_validity_s(template: dict | None = None) -> tuple[int, int]:
    """(access, id) token lifetimes in seconds from the template's UserPoolClient
    (AccessTokenValidity / IdTokenValidity in TokenValidityUnits; Cognito's defaults: 1, hours)."""
    template = template or load_template()
    clients = [r for r in template["Resources"].values() if r["Type"] == "AWS::Cognito::UserPoolClient"]
    props = clients[0].get("Properties", {}) if clients else {}
    units = props.get("TokenValidityUnits", {})
    return tuple(int(props.get(f"{kind}TokenValidity", 1)) * UNIT_S[units.get(f"{kind}Token", "hours")]
                 for kind in ("Access", "Id"))


class LocalIssuer(BackgroundServer):
    """Per-run RSA key, JWKS, discovery document and token minting, served on 127.0.0.1.

    `issuer` and `client_id` play the template's `!If [CreateUserPool, ...]` values: the
    user pool's issuer URL and the app client id (the authorizer's audience)."""

    thread_name = "local-issuer"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, pool_id: str | None = None,
                 client_id: str | None = None, backend_client_id: str | None = None):
        # The Cognito shapes: pool "us-east-1_AbC123xyZ", app client id of 26 [a-z0-9].
        self.pool_id = pool_id or f"{REGION}_{_random(string.ascii_letters + string.digits, 9)}"
        self.client_id = client_id or _random(string.ascii_lowercase + string.digits, 26)
        self.backend_client_id = backend_client_id or _random(string.ascii_lowercase + string.digits, 26)
        self.access_ttl_s, self.id_ttl_s = token_validity_s()  # the template's app client: 60 minutes
        self._key = RSAKey.generate_key(2048, parameters={"use": "sig", "alg": ALGORITHM}, auto_kid=True)
        self.kid = self._key.kid
        self.callback_urls: set[str] = set()
        self._codes: dict[str, dict[str, Any]] = {}
        self._codes_lock = threading.Lock()
        self.server = ThreadingHTTPServer((host, port), self._handler_class())
        self.server.daemon_threads = True

    def allow_callback(self, url: str) -> None:
        """Register an app's callback URL (Cognito: the app client's CallbackURLs); the
        origin of a callback URL may also call the token endpoint from a browser (CORS)."""
        self.callback_urls.add(url)

    def __repr__(self) -> str:  # never the key
        return (f"LocalIssuer(issuer={self.issuer!r}, client_id={self.client_id!r}, "
                f"backend_client_id={self.backend_client_id!r}, kid={self.kid!r})")

    # ------------------------------------------------------------------ documents
    @property
    def issuer(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/{self.pool_id}"

    @property
    def base_url(self) -> str:
        """The sign-in endpoints' host (Cognito: the user pool domain)."""
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def authorize_url(self) -> str:
        return self.base_url + AUTHORIZE_PATH

    @property
    def token_url(self) -> str:
        return self.base_url + TOKEN_PATH

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/.well-known/jwks.json"

    def jwks(self) -> dict:
        """The public key set: one RSA key, `kid`, `alg` RS256, `use` sig (no private parts)."""
        return {"keys": [self._key.as_dict(private=False)]}

    def discovery(self) -> dict:
        """The OIDC discovery document's fields a relying party such as API Gateway reads,
        and the sign-in endpoints a browser app uses."""
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "authorization_endpoint": self.authorize_url,
            "token_endpoint": self.token_url,
            "grant_types_supported": ["authorization_code"],
            "code_challenge_methods_supported": ["S256"],
            "response_types_supported": ["code", "token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [ALGORITHM],
            "scopes_supported": ["openid", "email", "phone", "profile"],
        }

    # ------------------------------------------------------------------ tokens
    def sign(self, claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
        """Any claims, signed RS256 with this run's key; `header` entries replace the
        defaults (`alg` RS256, `kid`), e.g. another `kid`. Tests use it for bad tokens."""
        return jwt.encode({"alg": ALGORITHM, "kid": self.kid, **(header or {})}, claims, self._key,
                          algorithms=[ALGORITHM])

    def _base(self, sub: str, token_use: str, ttl_s: int, overrides: dict[str, Any]) -> dict[str, Any]:
        validate_id(sub, "user_id")
        now = int(time.time())
        claims = {"sub": sub, "iss": self.issuer, "token_use": token_use, "auth_time": now, "iat": now,
                  "exp": now + ttl_s, "jti": str(uuid.uuid4()), "origin_jti": str(uuid.uuid4())}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}  # an override of None drops a claim

    def access_token(self, sub: str, scopes: tuple[str, ...] = (COGNITO_SIGNIN_SCOPE,),
                     **overrides: Any) -> str:
        """A Cognito-style access token: `client_id` (no `aud`), `scope` space-separated,
        `username`. Keyword overrides replace claims (None removes one), e.g. `exp=...`."""
        claims = {"client_id": self.client_id, "scope": " ".join(scopes), "username": sub, **overrides}
        return self.sign(self._base(sub, "access", self.access_ttl_s, claims))

    def client_credentials_token(self, scopes: tuple[str, ...] = (ADMIN_SCOPE,), **overrides: Any) -> str:
        """What Cognito's token endpoint answers BackendClient's client-credentials grant: an
        access token whose `sub` and `client_id` are the client's id, `scope` the granted
        resource-server scopes, and no `username` (there is no user)."""
        now = int(time.time())
        claims = {"sub": self.backend_client_id, "client_id": self.backend_client_id, "iss": self.issuer,
                  "token_use": "access", "scope": " ".join(scopes), "auth_time": now, "iat": now,
                  "exp": now + self.access_ttl_s, "jti": str(uuid.uuid4()), "version": 2, **overrides}
        return self.sign({k: v for k, v in claims.items() if v is not None})

    def id_token(self, sub: str, email: str | None = None, **overrides: Any) -> str:
        """A Cognito-style id token: `aud` = the app client id, `email`, `cognito:username`."""
        claims = {"aud": self.client_id, "email": email or f"{sub}@example.com", "email_verified": True,
                  "cognito:username": sub, **overrides}
        return self.sign(self._base(sub, "id", self.id_ttl_s, claims))

    # ------------------------------------------------------------------ sign-in (code + PKCE)
    def check_authorize(self, params: dict[str, str]) -> str | None:
        """The problem with an authorize request, or None. Checked before any redirect: an
        unregistered redirect_uri gets an error page, never a redirect (no open redirector)."""
        if params.get("client_id") != self.client_id:
            return "unknown client_id"
        if params.get("redirect_uri") not in self.callback_urls:
            return "redirect_uri is not a callback URL of this client"
        if params.get("response_type") != "code":
            return "response_type must be code"
        if params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
            return "PKCE with code_challenge_method S256 is required"
        return None

    def issue_code(self, params: dict[str, str], user_id: str) -> str:
        """A single-use code for this user, bound to the client, redirect_uri and challenge;
        returns the redirect URL (code and state on the callback URL)."""
        validate_id(user_id, "user_id")
        scopes = [s for s in params.get("scope", "openid").split() if s in OIDC_SCOPES] or ["openid"]
        code = secrets.token_urlsafe(32)
        with self._codes_lock:
            now = time.time()
            self._codes = {k: v for k, v in self._codes.items() if v["expires"] > now}
            self._codes[code] = {"client_id": params["client_id"], "redirect_uri": params["redirect_uri"],
                                 "challenge": params["code_challenge"], "sub": user_id,
                                 "scopes": tuple(scopes), "expires": now + CODE_TTL_S}
        answer = {"code": code, **({"state": params["state"]} if params.get("state") else {})}
        return f"{params['redirect_uri']}?{urlencode(answer)}"

    def exchange(self, form: dict[str, str]) -> tuple[int, dict]:
        """The token endpoint: (status, body) as OAuth 2.0 answers (RFC 6749 5.1 / 5.2)."""
        if form.get("grant_type") != "authorization_code":
            return 400, {"error": "unsupported_grant_type"}
        with self._codes_lock:
            grant = self._codes.pop(form.get("code", ""), None)  # single use, even when refused
        if grant is None or grant["expires"] <= time.time():
            return 400, {"error": "invalid_grant"}
        if form.get("client_id") != grant["client_id"]:
            return 400, {"error": "invalid_client"}
        verifier = form.get("code_verifier", "")
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if form.get("redirect_uri") != grant["redirect_uri"] or not secrets.compare_digest(
                digest, grant["challenge"]):
            return 400, {"error": "invalid_grant"}
        sub = grant["sub"]
        return 200, {"access_token": self.access_token(sub, grant["scopes"]), "id_token": self.id_token(sub),
                     "token_type": "Bearer", "expires_in": self.access_ttl_s}

    def cors_origin(self, origin: str | None) -> str | None:
        origins = {"{0.scheme}://{0.netloc}".format(urlsplit(u)) for u in self.callback_urls}
        return origin if origin in origins else None

    def sign_in_page(self, params: dict[str, str], problem: str = "") -> str:
        """The local stand-in for the hosted UI: a user id, no password (local only)."""
        hidden = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                         for k, v in params.items() if k != "username")
        alert = f'<p role="alert"><strong>{html.escape(problem)}</strong></p>' if problem else ""
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in (local) · avatarflow</title>
<style>body{{font-family:system-ui,sans-serif;max-width:28rem;margin:2rem auto;padding:0 1rem;color:#1b1f24}}
label{{display:block;font-weight:600;margin:1rem 0 .25rem}}input{{font:inherit;width:100%;padding:.5rem}}
button{{font:inherit;font-weight:600;min-height:44px;margin-top:1rem;padding:.5rem 1rem;background:#1d4ed8;
color:#fff;border:0;border-radius:6px}}:focus-visible{{outline:3px solid #f59e0b;outline-offset:2px}}</style>
</head><body><main><h1>Sign in</h1>
<p>The local stack's stand-in for the Cognito hosted UI: any user id signs in (no password locally).</p>
{alert}<form method="post" action="{AUTHORIZE_PATH}">{hidden}
<label for="username">User id</label>
<input id="username" name="username" required autocomplete="username" maxlength="64"
 pattern="[A-Za-z0-9][A-Za-z0-9_\\-]*">
<button type="submit">Sign in</button></form></main></body></html>"""

    # ------------------------------------------------------------------ server

    def _handler_class(self):
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "avatarflow-local-issuer"

            def log_message(self, fmt, *args):  # noqa: A003 - stdlib name
                LOG.info("issuer %s", fmt % args)

            def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, body: dict, extra: dict | None = None):
                self._send(status, json.dumps(body).encode(), "application/json", extra)

            def _page(self, status: int, text: str):
                # The page needs no script; its form posts here, then redirects to the app.
                self._send(status, text.encode(), "text/html; charset=utf-8", {
                    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                               "frame-ancestors 'none'; base-uri 'none'",
                    "X-Content-Type-Options": "nosniff"})

            def _form(self) -> dict[str, str]:
                length = int(self.headers.get("Content-Length") or 0)
                if length > 16384:
                    return {}
                return dict(parse_qsl(self.rfile.read(length).decode("utf-8", "replace")))

            def do_GET(self):  # noqa: N802 - stdlib name
                path, _, query = self.path.partition("?")
                if path == AUTHORIZE_PATH:
                    params = dict(parse_qsl(query))
                    problem = issuer.check_authorize(params)
                    if problem:
                        return self._page(400, error_page(problem))
                    return self._page(200, issuer.sign_in_page(params))
                prefix = f"/{issuer.pool_id}/.well-known/"
                documents = {f"{prefix}openid-configuration": issuer.discovery,
                             f"{prefix}jwks.json": issuer.jwks}
                make = documents.get(path)
                status, body = (200, make()) if make else (404, {"message": "Not Found"})
                self._json(status, body)

            def do_POST(self):  # noqa: N802 - stdlib name
                path = self.path.partition("?")[0]
                form = self._form()
                if path == AUTHORIZE_PATH:
                    problem = issuer.check_authorize(form)
                    if problem:
                        return self._page(400, error_page(problem))
                    try:
                        location = issuer.issue_code(form, form.get("username", "").strip())
                    except ValueError:
                        return self._page(400, issuer.sign_in_page(form, "That is not a valid user id."))
                    self.send_response(302)
                    self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                if path == TOKEN_PATH:
                    origin = issuer.cors_origin(self.headers.get("Origin"))
                    status, body = issuer.exchange(form)
                    cors = {"Access-Control-Allow-Origin": origin} if origin else None
                    return self._json(status, body, cors)
                return self._json(404, {"message": "Not Found"})

        return Handler
