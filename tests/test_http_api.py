"""The local HTTP API adapter's route throttling: the template's DefaultRouteSettings rate
and burst, and RouteSettings per route key, enforced as API Gateway does (one token bucket per
route; over it, 429 before the Lambda; only requests the authorizer accepted are metered)."""

import json
import urllib.error
import urllib.request

import pytest

from avatarflow_local.http_api import HttpApi, TokenBucket
from avatarflow_local.local_issuer import LocalIssuer
from avatarflow_local.workflow_stack import (
    HttpRoute,
    Throttle,
    http_api_auth,
    http_api_throttle,
    load_template,
)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_bucket_allows_the_burst_then_refuses_then_refills():
    clock = FakeClock()
    bucket = TokenBucket(rate=2, burst=5, clock=clock)
    assert [bucket.take() for _ in range(6)] == [True] * 5 + [False]
    clock.now += 0.25  # half a token at 2/s: still refused
    assert bucket.take() is False
    clock.now += 0.25  # one token
    assert [bucket.take(), bucket.take()] == [True, False]
    clock.now += 60  # a long pause refills to the burst, never beyond it
    assert sum(bucket.take() for _ in range(10)) == 5


GENERATE = "POST /users/{user_id}/generations"


def test_throttle_comes_from_the_template_parameters():
    params = load_template()["Parameters"]
    throttle = http_api_throttle()
    generate = Throttle(float(params["ApiGenerationThrottleRateLimit"]["Default"]),
                        int(params["ApiGenerationThrottleBurstLimit"]["Default"]))
    assert throttle == Throttle(float(params["ApiThrottleRateLimit"]["Default"]),
                                int(params["ApiThrottleBurstLimit"]["Default"]), {GENERATE: generate})
    assert (generate.rate, generate.burst) < (throttle.rate, throttle.burst)  # the GPU route is tighter
    given = {"ApiThrottleRateLimit": "3", "ApiThrottleBurstLimit": "7",
             "ApiGenerationThrottleRateLimit": "1", "ApiGenerationThrottleBurstLimit": "2"}
    assert http_api_throttle(parameters=given) == Throttle(3.0, 7, {GENERATE: Throttle(1.0, 2)})
    models = http_api_throttle(parameters=given).for_route("GET /users/{user_id}/models")
    assert (models.rate, models.burst) == (3.0, 7)  # a route without RouteSettings: the stage default


def test_route_settings_must_name_a_route_of_the_api():
    """CloudFormation fails the stage on a RouteSettings key no route has; so does the adapter."""
    with pytest.raises(KeyError, match="GET /nowhere"):
        HttpApi([HttpRoute("GET", "/users/{user_id}/models")], lambda f, e: ({}, None), {},
                throttle=Throttle(1, 1, {"GET /nowhere": Throttle(1, 1)}))


@pytest.fixture
def api():
    issuer = LocalIssuer().start()
    auth = http_api_auth(parameters={"JwtIssuer": issuer.issuer, "JwtAudience": issuer.client_id})
    calls = []

    def invoke(function, event):
        calls.append(event["routeKey"])
        return {"statusCode": 200, "body": json.dumps({"ok": True})}, None

    clock = FakeClock()
    routes = [HttpRoute("GET", "/users/{user_id}/models", "UserJwt"),
              HttpRoute("POST", "/users/{user_id}/generations", "UserJwt")]
    server = HttpApi(routes, invoke, auth.authorizers, clock=clock,
                     throttle=Throttle(rate=1, burst=3, routes={GENERATE: Throttle(rate=1, burst=1)})).start()
    server.issuer = issuer
    server.clock = clock
    server.calls = calls
    yield server
    server.stop()
    issuer.stop()


def get(api, token, method="GET", path="/users/ada/models"):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{api.url}{path}", headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_adapter_answers_429_over_the_limit_and_recovers(api):
    token = api.issuer.access_token("ada")
    answers = [get(api, token) for _ in range(5)]
    assert answers == [(200, {"ok": True})] * 3 + [(429, {"message": "Too Many Requests"})] * 2
    assert len(api.calls) == 3  # refused requests never reach the Lambda
    # Over the limit, a bad or missing token is still refused by the authorizer first.
    assert get(api, "bad.token.here") == (401, {"message": "Unauthorized"})
    api.clock.now += 2  # two tokens at 1/s
    assert [get(api, token)[0] for _ in range(3)] == [200, 200, 429]
    assert len(api.calls) == 5


def test_requests_the_authorizer_refuses_never_spend_the_bucket(api):
    """API Gateway meters (and bills) only what passes the authorizer: a tokenless flood is
    401 throughout and leaves the signed-in user's burst whole."""
    flood = [get(api, token)[0] for token in [None, "bad.token.here", "a.b.c"] * 20]
    assert flood == [401] * 60
    assert [get(api, api.issuer.access_token("ada"))[0] for _ in range(4)] == [200, 200, 200, 429]


def test_each_route_has_its_own_bucket(api):
    """The generation route's RouteSettings limit (burst 1 here) is its own: spending it
    leaves the stage default of the other routes untouched, and the other way round."""
    token = api.issuer.access_token("ada")
    assert [get(api, token, "POST", "/users/ada/generations")[0] for _ in range(2)] == [200, 429]
    assert [get(api, token)[0] for _ in range(4)] == [200, 200, 200, 429]
    assert get(api, token, "POST", "/users/ada/generations")[0] == 429
    api.clock.now += 1
    assert get(api, token, "POST", "/users/ada/generations")[0] == 200
