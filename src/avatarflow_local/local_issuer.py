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
`aud`) and id tokens (`token_use=id`, `aud`, `email`), RS256 with the key's `kid`. There is
no sign-in flow: the local runtime mints tokens for the users it is told about. A second app
client, `backend_client_id`, plays the template's BackendClient: its client-credentials
access tokens are Cognito's shape for that grant (`sub` = `client_id` = the client's id,
`scope` = the resource server's scopes, here `avatarflow/admin`; no `username`).
"""

from __future__ import annotations

import json
import logging
import secrets
import string
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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


def _random(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


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
        self.server = ThreadingHTTPServer((host, port), self._handler_class())
        self.server.daemon_threads = True

    def __repr__(self) -> str:  # never the key
        return (f"LocalIssuer(issuer={self.issuer!r}, client_id={self.client_id!r}, "
                f"backend_client_id={self.backend_client_id!r}, kid={self.kid!r})")

    # ------------------------------------------------------------------ documents
    @property
    def issuer(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/{self.pool_id}"

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/.well-known/jwks.json"

    def jwks(self) -> dict:
        """The public key set: one RSA key, `kid`, `alg` RS256, `use` sig (no private parts)."""
        return {"keys": [self._key.as_dict(private=False)]}

    def discovery(self) -> dict:
        """The OIDC discovery document's fields a relying party such as API Gateway reads
        (no authorization or token endpoint: there is no sign-in flow locally)."""
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
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

    # ------------------------------------------------------------------ server

    def _handler_class(self):
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "avatarflow-local-issuer"

            def log_message(self, fmt, *args):  # noqa: A003 - stdlib name
                LOG.info("issuer %s", fmt % args)

            def do_GET(self):  # noqa: N802 - stdlib name
                prefix = f"/{issuer.pool_id}/.well-known/"
                documents = {f"{prefix}openid-configuration": issuer.discovery,
                             f"{prefix}jwks.json": issuer.jwks}
                make = documents.get(self.path.split("?", 1)[0])
                status, body = (200, make()) if make else (404, {"message": "Not Found"})
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
