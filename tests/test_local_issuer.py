"""The local issuer and the local HTTP API's JWT authorizer, rule by rule, as API Gateway's
HTTP API JWT authorizer applies them: one accepted token whose claims reach the Lambda event
as API Gateway renders them, and one refused token per rule, each answered the AWS way
(401 Unauthorized / 403 Forbidden with `www-authenticate`) without invoking the Lambda."""

import base64
import copy
import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request

import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from avatarflow_local.http_api import HttpApi, claim_text
from avatarflow_local.local_issuer import COGNITO_SIGNIN_SCOPE, LocalIssuer
from avatarflow_local.workflow_stack import HttpRoute, http_api_auth, http_route, load_template

GENERATE_SCOPE = "avatarflow/generate"
UNAUTHORIZED = {"message": "Unauthorized"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _fetch(url, token=None, method="GET", raw_authorization=None):
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if raw_authorization is not None:
        headers["Authorization"] = raw_authorization
    request = urllib.request.Request(url, headers=headers, method=method,
                                     data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


@pytest.fixture(scope="module")
def issuer():
    issuer = LocalIssuer().start()
    yield issuer
    issuer.stop()


@pytest.fixture
def api(issuer):
    """The template's authorizer (resolved with the local issuer as JwtIssuer/JwtAudience)
    on three routes: the template's kind, one with AuthorizationScopes, one without auth."""
    auth = http_api_auth(parameters={"JwtIssuer": issuer.issuer, "JwtAudience": issuer.client_id})
    events = []

    def invoke(function, event):
        events.append(event)
        return {"statusCode": 200, "body": json.dumps({"ok": True})}, None

    routes = [HttpRoute("GET", "/users/{user_id}/models", "UserJwt"),
              HttpRoute("POST", "/users/{user_id}/generations", "UserJwt", (GENERATE_SCOPE, "admin")),
              HttpRoute("GET", "/health")]
    server = HttpApi(routes, invoke, auth.authorizers).start()
    server.events = events
    yield server
    server.stop()


def _claims(issuer, **overrides):
    now = int(time.time())
    claims = {"sub": "ada", "iss": issuer.issuer, "client_id": issuer.client_id, "token_use": "access",
              "scope": COGNITO_SIGNIN_SCOPE, "iat": now, "exp": now + 600, "jti": "j1"}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _refused(api, token, description=None, raw_authorization=None):
    status, body, headers = _fetch(f"{api.url}/users/ada/models", token, raw_authorization=raw_authorization)
    assert (status, body) == (401, UNAUTHORIZED)
    challenge = headers["www-authenticate"]
    assert challenge.startswith('Bearer scope="" error="invalid_token" error_description="'), challenge
    if description is not None:
        assert f'error_description="{description}"' in challenge
    assert api.events == []  # API Gateway refused it: the Lambda never ran


# ------------------------------------------------------------------ what is accepted
def test_valid_access_token_reaches_the_lambda_with_claims_as_api_gateway_puts_them(api, issuer):
    token = issuer.access_token("ada", groups=["admin", "editors"], nbf=int(time.time()) - 5)
    status, body, _ = _fetch(f"{api.url}/users/ada/models", token)
    assert (status, body) == (200, {"ok": True})
    (event,) = api.events
    decoded = jwt.decode(token, RSAKey.import_key(issuer.jwks()["keys"][0])).claims
    assert event["requestContext"]["authorizer"] == {"jwt": {
        "claims": {k: claim_text(v) for k, v in decoded.items()}, "scopes": None}}
    claims = event["requestContext"]["authorizer"]["jwt"]["claims"]
    assert all(isinstance(v, str) for v in claims.values())  # payload 2.0: every claim a string
    assert claims["sub"] == "ada" and claims["token_use"] == "access"
    assert claims["client_id"] == issuer.client_id and "aud" not in claims  # Cognito access token
    assert claims["exp"] == str(decoded["exp"]) and claims["groups"] == "[admin editors]"
    assert claims["scope"] == COGNITO_SIGNIN_SCOPE
    assert event["routeKey"] == "GET /users/{user_id}/models"


def test_id_token_passes_on_aud_and_bare_token_without_bearer_passes(api, issuer):
    token = issuer.id_token("ada", email="ada@example.com")
    assert _fetch(f"{api.url}/users/ada/models", token)[0] == 200
    claims = api.events[0]["requestContext"]["authorizer"]["jwt"]["claims"]
    assert claims["aud"] == issuer.client_id and claims["email"] == "ada@example.com"
    assert claims["token_use"] == "id" and claims["email_verified"] == "true"
    # API Gateway: the identity source may hold the token alone, without "Bearer ".
    assert _fetch(f"{api.url}/users/ada/models", raw_authorization=issuer.access_token("ada"))[0] == 200


def test_claim_rendering():
    assert claim_text("x") == "x"
    assert claim_text(1787996002) == "1787996002"
    assert claim_text(True) == "true"
    assert claim_text(["a", "b", 3]) == "[a b 3]"
    assert claim_text(None) is None


def test_route_without_authorizer_gets_no_authorizer_context(api):
    assert _fetch(f"{api.url}/health")[0] == 200
    assert "authorizer" not in api.events[0]["requestContext"]


# ------------------------------------------------------------------ what is refused (401)
def test_no_token_is_401(api):
    _refused(api, None, "the token is missing")
    _refused(api, None, raw_authorization="Bearer ")


def test_garbage_is_401(api):
    _refused(api, "not-a-jwt", "the token could not be decoded")


def test_unknown_kid_is_401(api, issuer):
    unknown = "the token's kid is not a key of the issuer"
    _refused(api, issuer.sign(_claims(issuer), {"kid": "another-key"}), unknown)
    header = {"alg": "RS256"}  # no kid at all
    token = f"{_b64(json.dumps(header).encode())}.{issuer.sign(_claims(issuer)).split('.', 1)[1]}"
    _refused(api, token, unknown)


def test_hs256_signed_with_the_public_key_is_401(api, issuer):
    """The classic algorithm confusion: HMAC keyed with the issuer's public PEM."""
    pem = RSAKey.import_key(issuer.jwks()["keys"][0]).as_pem(private=False)
    signing_input = (_b64(json.dumps({"alg": "HS256", "kid": issuer.kid, "typ": "JWT"}).encode()) + "."
                     + _b64(json.dumps(_claims(issuer)).encode()))
    signature = _b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())
    _refused(api, f"{signing_input}.{signature}", "signing method HS256 is invalid")


def test_alg_none_is_401(api, issuer):
    for alg in ("none", "None", "RS384"):
        unsigned = (_b64(json.dumps({"alg": alg, "kid": issuer.kid}).encode()) + "."
                    + _b64(json.dumps(_claims(issuer)).encode()) + ".")
        _refused(api, unsigned, f"signing method {alg} is invalid")


def test_bad_signature_is_401(api, issuer):
    impostor = RSAKey.generate_key(2048)
    forged = jwt.encode({"alg": "RS256", "kid": issuer.kid}, _claims(issuer), impostor)
    _refused(api, forged, "the token's signature is invalid")
    # A real token with its payload swapped (sub: eve) keeps a signature that no longer matches.
    head, _, sig = issuer.access_token("ada").split(".")
    tampered = f"{head}.{_b64(json.dumps(_claims(issuer, sub='eve')).encode())}.{sig}"
    _refused(api, tampered, "the token's signature is invalid")


def test_wrong_issuer_is_401(api, issuer):
    invalid = "the token does not have a valid issuer"
    _refused(api, issuer.access_token("ada", iss=issuer.issuer + "/"), invalid)  # exact match only
    _refused(api, issuer.access_token("ada", iss=None), invalid)


def test_wrong_audience_is_401_with_the_header_aws_documents(api, issuer):
    aws_header = ('Bearer scope="" error="invalid_token" '
                  'error_description="the token does not have a valid audience"')
    for token in (issuer.access_token("ada", client_id="someone-else"),
                  issuer.access_token("ada", client_id=None),
                  issuer.id_token("ada", aud="someone-else"),
                  # aud is evaluated when present, even if client_id would match
                  issuer.access_token("ada", aud="someone-else")):
        _refused(api, token)
        assert _fetch(f"{api.url}/users/ada/models", token)[2]["www-authenticate"] == aws_header


def test_expired_or_not_yet_valid_is_401(api, issuer):
    now = int(time.time())
    _refused(api, issuer.access_token("ada", exp=now - 1), "the token has expired")
    not_a_date = "the token's exp claim is not a NumericDate"
    _refused(api, issuer.access_token("ada", exp=None), not_a_date)
    _refused(api, issuer.access_token("ada", exp=str(now + 600)), not_a_date)
    _refused(api, issuer.access_token("ada", nbf=now + 120), "the token is not valid yet")
    _refused(api, issuer.access_token("ada", iat=now + 120), "the token was issued in the future")


# ------------------------------------------------------------------ scopes (403)
def test_route_scopes_need_one_of_them_else_403(api, issuer):
    url = f"{api.url}/users/ada/generations"
    status, body, headers = _fetch(url, issuer.access_token("ada"), method="POST")
    assert (status, body) == (403, {"message": "Forbidden"})
    assert headers["www-authenticate"].startswith(
        f'Bearer scope="{GENERATE_SCOPE} admin" error="insufficient_scope"')
    assert _fetch(url, issuer.id_token("ada"), method="POST")[0] == 403  # id tokens carry no scope
    assert api.events == []
    token = issuer.access_token("ada", scopes=("openid", GENERATE_SCOPE))
    status, body, _ = _fetch(url, token, method="POST")
    assert (status, body) == (200, {"ok": True})
    # scp (a list, other providers' form) counts too; the Lambda gets the token's scopes.
    assert _fetch(url, issuer.access_token("ada", scope=None, scp=["admin"]), method="POST")[0] == 200
    assert [e["requestContext"]["authorizer"]["jwt"]["scopes"] for e in api.events] == [
        ["openid", GENERATE_SCOPE], ["admin"]]


# ------------------------------------------------------------------ the issuer itself
def test_issuer_serves_discovery_and_a_public_jwks(issuer):
    with urllib.request.urlopen(f"{issuer.issuer}/.well-known/openid-configuration", timeout=10) as r:
        discovery = json.loads(r.read())
    assert discovery["issuer"] == issuer.issuer and discovery["jwks_uri"] == issuer.jwks_uri
    assert discovery["id_token_signing_alg_values_supported"] == ["RS256"]
    with urllib.request.urlopen(discovery["jwks_uri"], timeout=10) as r:
        (key,) = json.loads(r.read())["keys"]
    assert {k: key[k] for k in ("kty", "kid", "alg", "use")} == {"kty": "RSA", "kid": issuer.kid,
                                                                 "alg": "RS256", "use": "sig"}
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(key)  # never the private half
    assert "PRIVATE" not in repr(issuer) and key["n"] not in repr(issuer)
    assert issuer.issuer.startswith("http://127.0.0.1:") and issuer.pool_id.startswith("us-east-1_")
    header = json.loads(base64.urlsafe_b64decode(issuer.access_token("ada").split(".")[0] + "=="))
    assert header["alg"] == "RS256" and header["kid"] == issuer.kid


def test_token_lifetimes_come_from_the_template_app_client(issuer):
    props = load_template()["Resources"]["UserPoolClient"]["Properties"]
    unit_s = {"minutes": 60, "hours": 3600}
    access_s = props["AccessTokenValidity"] * unit_s[props["TokenValidityUnits"]["AccessToken"]]
    id_s = props["IdTokenValidity"] * unit_s[props["TokenValidityUnits"]["IdToken"]]
    public = RSAKey.import_key(issuer.jwks()["keys"][0])
    access = jwt.decode(issuer.access_token("ada"), public).claims
    ident = jwt.decode(issuer.id_token("ada"), public).claims
    assert (access["exp"] - access["iat"], ident["exp"] - ident["iat"]) == (access_s, id_s)


def test_each_run_has_its_own_key(issuer):
    other = LocalIssuer()
    try:
        assert other.jwks()["keys"][0]["n"] != issuer.jwks()["keys"][0]["n"]
        assert other.client_id != issuer.client_id
    finally:
        other.server.server_close()


# ------------------------------------------------------------------ configuration from template.yaml
def test_authorizer_comes_from_the_template_on_both_branches_of_create_user_pool():
    template = load_template()
    props = template["Resources"]["GenerationApi"]["Properties"]["Auth"]
    (name,) = props["Authorizers"]
    assert props["DefaultAuthorizer"] == name
    given = http_api_auth(parameters={"JwtIssuer": "http://127.0.0.1:1/pool", "JwtAudience": "client1"})
    assert given.default == name
    assert (given.authorizers[name].issuer, given.authorizers[name].audience) == \
        ("http://127.0.0.1:1/pool", ("client1",))
    # With a backend client (client credentials, JwtBackendAudience) its id is a second audience.
    both = http_api_auth(parameters={"JwtIssuer": "http://127.0.0.1:1/pool", "JwtAudience": "client1",
                                     "JwtBackendAudience": "backend1"})
    assert both.authorizers[name].audience == ("client1", "backend1")
    cognito = http_api_auth(physical={"UserPool": {"Ref": "us-east-1_abc"}, "UserPoolClient": {"Ref": "c2"},
                                      "BackendClient": {"Ref": "c3"}})
    assert cognito.authorizers[name].issuer == "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_abc"
    assert cognito.authorizers[name].audience == ("c2", "c3")  # the user pool's two app clients
    # Every route of the template is behind that authorizer (none opts out with NONE).
    for spec in template["Resources"].values():
        for event in spec.get("Properties", {}).get("Events", {}).values():
            if event["Type"] == "HttpApi":
                assert http_route(event["Properties"], given).authorizer == name


def test_sam_route_rules_for_scopes_and_none():
    """SAM: a route's AuthorizationScopes override the authorizer's; `Authorizer: NONE`
    leaves a route without an authorizer."""
    template = copy.deepcopy(load_template())
    auth = template["Resources"]["GenerationApi"]["Properties"]["Auth"]
    auth["Authorizers"]["UserJwt"]["AuthorizationScopes"] = ["default/scope"]
    resolved = http_api_auth(template, {"JwtIssuer": "http://i", "JwtAudience": "a"})
    plain = {"Method": "get", "Path": "/p"}
    assert http_route(plain, resolved) == HttpRoute("GET", "/p", "UserJwt", ("default/scope",))
    assert http_route({**plain, "Auth": {"AuthorizationScopes": ["x"]}}, resolved).scopes == ("x",)
    assert http_route({**plain, "Auth": {"Authorizer": "NONE"}}, resolved) == HttpRoute("GET", "/p")
    with pytest.raises(KeyError):
        http_route({**plain, "Auth": {"Authorizer": "Missing"}}, resolved)


# ------------------------------------------------------------------ sign-in: code + PKCE (the web app's flow)
APP = "http://127.0.0.1:9/"  # a callback URL (nothing listens: the redirect is only read)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _post_form(url, fields, origin=None):
    from urllib.parse import urlencode

    request = urllib.request.Request(url, data=urlencode(fields).encode(), method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded",
                                              **({"Origin": origin} if origin else {})})
    try:
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def _authorize_params(issuer, verifier, **overrides):
    challenge = _b64(hashlib.sha256(verifier.encode()).digest())
    params = {"response_type": "code", "client_id": issuer.client_id, "redirect_uri": APP, "state": "s1",
              "scope": "openid email", "code_challenge": challenge, "code_challenge_method": "S256"}
    params.update(overrides)
    return {k: v for k, v in params.items() if v is not None}


def _code(issuer, verifier, user="ada"):
    from urllib.parse import parse_qs, urlsplit

    fields = {**_authorize_params(issuer, verifier), "username": user}
    status, _, headers = _post_form(issuer.authorize_url, fields)
    assert status == 302
    location = urlsplit(headers["Location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == APP
    query = parse_qs(location.query)
    assert query["state"] == ["s1"]
    return query["code"][0]


def test_code_with_pkce_signs_in_and_the_api_accepts_the_token(api, issuer):
    from urllib.parse import urlencode

    issuer.allow_callback(APP)
    assert issuer.discovery()["authorization_endpoint"] == issuer.authorize_url
    verifier = "v" * 50
    page = urllib.request.urlopen(f"{issuer.authorize_url}?{urlencode(_authorize_params(issuer, verifier))}",
                                  timeout=10)
    text = page.read().decode()
    assert page.status == 200 and '<label for="username">User id</label>' in text
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    code = _code(issuer, verifier, "grace")
    status, body, headers = _post_form(issuer.token_url, {
        "grant_type": "authorization_code", "client_id": issuer.client_id, "code": code,
        "redirect_uri": APP, "code_verifier": verifier}, origin="http://127.0.0.1:9")
    assert status == 200, body
    assert headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:9"
    tokens = json.loads(body)
    assert tokens["token_type"] == "Bearer" and tokens["expires_in"] == issuer.access_ttl_s
    status, answer, _ = _fetch(f"{api.url}/users/grace/models", tokens["access_token"])
    assert (status, answer) == (200, {"ok": True})
    claims = api.events[-1]["requestContext"]["authorizer"]["jwt"]["claims"]
    assert claims["sub"] == "grace" and claims["scope"] == "openid email"
    # The code was single use.
    again = _post_form(issuer.token_url, {"grant_type": "authorization_code", "client_id": issuer.client_id,
                                          "code": code, "redirect_uri": APP, "code_verifier": verifier})
    assert (again[0], json.loads(again[1])) == (400, {"error": "invalid_grant"})


@pytest.mark.parametrize("change, error", [
    ({"code_verifier": "w" * 50}, "invalid_grant"),  # not the verifier of the challenge
    ({"redirect_uri": "http://127.0.0.1:9/other"}, "invalid_grant"),
    ({"client_id": "someoneelse"}, "invalid_client"),
    ({"grant_type": "password"}, "unsupported_grant_type"),
])
def test_token_request_that_does_not_match_its_code_is_refused(issuer, change, error):
    issuer.allow_callback(APP)
    verifier = "v" * 50
    form = {"grant_type": "authorization_code", "client_id": issuer.client_id,
            "code": _code(issuer, verifier), "redirect_uri": APP, "code_verifier": verifier, **change}
    status, body, headers = _post_form(issuer.token_url, form, origin="http://evil.example")
    assert (status, json.loads(body)) == (400, {"error": error})
    assert "Access-Control-Allow-Origin" not in headers  # only a callback's origin may read answers


@pytest.mark.parametrize("change", [
    {"redirect_uri": "http://evil.example/"},  # never redirect to an unregistered URL
    {"client_id": "someoneelse"},
    {"code_challenge": None},  # PKCE is required
    {"code_challenge_method": "plain"},
    {"response_type": "token"},
])
def test_authorize_request_that_breaks_a_rule_gets_an_error_page_not_a_redirect(issuer, change):
    issuer.allow_callback(APP)
    fields = {**_authorize_params(issuer, "v" * 50, **change), "username": "ada"}
    status, body, headers = _post_form(issuer.authorize_url, fields)
    assert status == 400 and "Location" not in headers
    assert b"Sign-in error" in body


def test_authorize_refuses_a_user_id_the_api_would_refuse(issuer):
    issuer.allow_callback(APP)
    fields = {**_authorize_params(issuer, "v" * 50), "username": "../admin"}
    status, body, headers = _post_form(issuer.authorize_url, fields)
    assert status == 400 and "Location" not in headers and b"not a valid user id" in body
