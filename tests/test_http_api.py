"""The local HTTP API adapter's stage throttling: the template's DefaultRouteSettings rate
and burst, enforced as API Gateway does (token bucket; over it, 429 before the Lambda)."""

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


def test_throttle_comes_from_the_template_parameters():
    params = load_template()["Parameters"]
    throttle = http_api_throttle()
    assert throttle == Throttle(float(params["ApiThrottleRateLimit"]["Default"]),
                                int(params["ApiThrottleBurstLimit"]["Default"]))
    assert http_api_throttle(parameters={"ApiThrottleRateLimit": "3", "ApiThrottleBurstLimit": "7"}) == \
        Throttle(3.0, 7)


@pytest.fixture
def api():
    issuer = LocalIssuer().start()
    auth = http_api_auth(parameters={"JwtIssuer": issuer.issuer, "JwtAudience": issuer.client_id})
    calls = []

    def invoke(function, event):
        calls.append(event["routeKey"])
        return {"statusCode": 200, "body": json.dumps({"ok": True})}, None

    server = HttpApi([HttpRoute("GET", "/users/{user_id}/models", "UserJwt")], invoke, auth.authorizers,
                     throttle=Throttle(rate=1, burst=3)).start()
    server.issuer = issuer
    server.clock = FakeClock()
    server.bucket = TokenBucket(1, 3, clock=server.clock)
    server.calls = calls
    yield server
    server.stop()
    issuer.stop()


def get(api, token):
    headers = {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(f"{api.url}/users/ada/models", headers=headers)
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
    # Bad tokens count against the limit too, and are refused before the verifier.
    assert get(api, "bad.token.here") == (429, {"message": "Too Many Requests"})
    api.clock.now += 2  # two tokens at 1/s
    assert [get(api, token)[0] for _ in range(3)] == [200, 200, 429]
    assert len(api.calls) == 5
