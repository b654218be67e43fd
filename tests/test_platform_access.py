"""Platform access (issue 19): the API's one caller check with the admin scope, admin routes,
quotas (429 + Retry-After; atomic counters, raced), usage metering. Handlers run as Lambda
runs them against the template's resources, as their own roles (tests/unit_stack.py). The
same rules through the HTTP front door and the JWT authorizer: tests/test_local_stack.py."""

import threading
from datetime import UTC, datetime

import boto3
import pytest
import unit_stack
from apitools import answer_invoke_endpoint_async, body_of, http_event, put_model
from moto.dynamodb import models as moto_ddb
from moto.dynamodb import responses as moto_responses

from avatarflow import usage
from avatarflow_local import atomic_items

module_stack, stack = unit_stack.module_stack, unit_stack.stack
BACKEND = "3k2l5nq8v0bq4m6r1s9t7u2w4x"  # a Cognito app client id: a client-credentials token's sub
ADMIN = {"sub": BACKEND, "client_id": BACKEND, "token_use": "access", "scope": "avatarflow/admin"}
GEN = {"prompt": "portrait of sks person", "num_images": 2, "steps": 3, "seed": 1}


def call(stack, method, path, *, claims=None, sub="alice", body=None, query=""):
    event = http_event(method, path, sub=sub, claims=claims, body=body)
    event["rawQueryString"] = query
    if query:
        event["queryStringParameters"] = dict(p.split("=", 1) for p in query.split("&"))
    return stack.call("api", event)


def usage_table(stack):
    return boto3.resource("dynamodb").Table(stack.resources.physical["UsageTable"]["Ref"])


@pytest.fixture
def endpoint(stack):
    """Every InvokeEndpointAsync accepted, after the API role's IAM check."""
    answer_invoke_endpoint_async(stack.module("api").aws().runtime)


# ---------------------------------------------------------------- who may act as whom


@pytest.mark.parametrize(("path", "status"), [
    ("/users/bob/models", 200), ("/users/bob/usage", 200),
    ("/users/bob/deletion", 404),  # past the caller check: bob has no erasure
])
def test_admin_scope_acts_for_any_user(stack, path, status):
    put_model(stack.resources, "bob", "v1", "READY")
    response = call(stack, "GET", path, claims=ADMIN)
    assert response["statusCode"] == status, body_of(response)
    assert call(stack, "GET", path, sub="alice")["statusCode"] == 403  # the same route for a user token
    if path.endswith("/models"):
        assert body_of(response)["latest_ready"] == "v1"


def test_admin_scope_creates_a_generation_for_a_user(stack, endpoint):
    put_model(stack.resources, "bob", "v1", "READY")
    response = call(stack, "POST", "/users/bob/generations", claims=ADMIN, body=GEN)
    assert response["statusCode"] == 202, body_of(response)
    assert body_of(response)["model_version"] == "v1"


@pytest.mark.parametrize("claims", [
    {"sub": "alice", "token_use": "access", "scope": "aws.cognito.signin.user.admin"},  # a user's token
    {"sub": "alice", "token_use": "id", "scope": "avatarflow/admin"},  # not an access token
    {"sub": BACKEND, "token_use": "access", "scope": "avatarflow/other"},  # another scope
    {"sub": BACKEND, "token_use": "access", "scope": "xavatarflow/admin avatarflow/adminx"},  # near misses
])
def test_without_the_admin_scope(stack, claims):
    for path in ("/admin/users", "/admin/users/alice"):
        assert call(stack, "GET", path, claims=claims)["statusCode"] == 403
    assert call(stack, "GET", "/users/bob/models", claims=claims)["statusCode"] == 403


def test_user_token_acts_only_for_itself(stack):
    assert call(stack, "GET", "/users/alice/usage", sub="alice")["statusCode"] == 200
    assert call(stack, "GET", "/users/bob/usage", sub="alice")["statusCode"] == 403
    assert call(stack, "GET", "/admin/users", sub=None)["statusCode"] == 401


def test_admin_lists_users_with_a_usage_line_and_a_users_batches_and_models(stack):
    client = boto3.client("dynamodb")
    table = stack.resources.physical["UsageTable"]["Ref"]
    usage.record_training(client, table, "alice", "avatar-alice-b1", 300, "ml.g5.2xlarge")
    usage.record_generation(client, table, "bob", "g1", 12.5, 4, "ml.g5.xlarge")
    usage.take_images(usage_table(stack), "bob", 4, 100)  # a day row: not a user line of its own
    put_model(stack.resources, "alice", "b1", "READY")
    listing = body_of(call(stack, "GET", "/admin/users", claims=ADMIN))
    lines = {u["user_id"]: u["usage"] for u in listing["users"]}
    assert set(lines) == {"alice", "bob"} and listing["next"] is None
    assert lines["alice"]["training_seconds"] == 300 and lines["alice"]["trainings"] == 1
    assert lines["alice"]["cost_usd"] == pytest.approx(300 / 3600 * 1.52, abs=1e-6)
    assert lines["bob"] == {"training_seconds": 0, "inference_seconds": 12.5, "images": 4, "trainings": 0,
                            "generations": 1, "cost_usd": pytest.approx(12.5 / 3600 * 1.21, abs=1e-6)}
    one = body_of(call(stack, "GET", "/admin/users/alice", claims=ADMIN))
    assert [b["batch_id"] for b in one["batches"]] == ["batch1"] and one["models"][0]["version"] == "b1"
    assert one["total"]["training_seconds"] == 300


def test_admin_listing_pages_and_refuses_forged_page_tokens(stack, monkeypatch):
    client = boto3.client("dynamodb")
    table = stack.resources.physical["UsageTable"]["Ref"]
    for i in range(5):
        usage.record_generation(client, table, f"user{i}", f"g{i}", 1, 1, None)
    monkeypatch.setattr(stack.module("api"), "ADMIN_PAGE_SIZE", 2)
    seen, query = [], ""
    for _ in range(10):
        page = body_of(call(stack, "GET", "/admin/users", claims=ADMIN, query=query))
        seen += [u["user_id"] for u in page["users"]]
        if not page["next"]:
            break
        query = f"next={page['next']}"
    assert sorted(seen) == [f"user{i}" for i in range(5)]
    forged = call(stack, "GET", "/admin/users", claims=ADMIN, query="next=eyJ1c2VyX2lkIjogIngifQ==")
    assert forged["statusCode"] == 400


# ---------------------------------------------------------------- quotas


def test_images_over_quota_is_429_with_retry_after(stack, endpoint):
    stack.with_environment("api", QUOTA_IMAGES_PER_DAY="3")
    put_model(stack.resources, "alice", "v1", "READY")
    assert call(stack, "POST", "/users/alice/generations", body=GEN)["statusCode"] == 202
    refused = call(stack, "POST", "/users/alice/generations", body=GEN)
    assert refused["statusCode"] == 429
    body = body_of(refused)
    assert body["quota"] == "images" and body["limit"] == 3 and body["used"] == 2
    assert "try again after" in body["message"]
    wait = int(refused["headers"]["Retry-After"])
    midnight = usage.next_day()
    assert 0 < wait <= (midnight - datetime.now(UTC)).total_seconds() + 2
    assert body["retry_at"] == midnight.isoformat(timespec="seconds")
    # One image is left: a request for exactly one still fits.
    assert call(stack, "POST", "/users/alice/generations", body={**GEN, "num_images": 1})["statusCode"] == 202
    today = body_of(call(stack, "GET", "/users/alice/usage"))["today"]
    assert today["images"] == {"used": 3, "limit": 3}


def test_a_pack_takes_its_images_from_the_days_quota(stack):
    """POST .../packs queues styles x ImagesPerStyle images: the same quota as generations."""
    stack.with_environment("api", QUOTA_IMAGES_PER_DAY="10", PACK_IMAGES_PER_STYLE="4")
    put_model(stack.resources, "alice", "v1", "READY")
    two_styles = {"styles": ["watercolor", "comic-book"]}
    assert call(stack, "POST", "/users/alice/packs", body=two_styles)["statusCode"] == 202
    assert usage.today(usage_table(stack), "alice")["images"] == 8
    refused = call(stack, "POST", "/users/alice/packs", body=two_styles)
    assert refused["statusCode"] == 429 and body_of(refused)["quota"] == "images"
    assert usage.today(usage_table(stack), "alice")["images"] == 8  # nothing taken by the refusal


def test_uploads_refused_once_the_days_batches_are_spent(stack):
    stack.with_environment("api", QUOTA_BATCHES_PER_DAY="1")
    files = {"files": [{"name": "a.jpg", "content_type": "image/jpeg"}]}
    assert call(stack, "POST", "/users/alice/uploads", body=files)["statusCode"] == 200
    usage.take_batch(usage_table(stack), "alice", "b1", 1)  # the workflow counted a batch
    refused = call(stack, "POST", "/users/alice/uploads", body=files)
    assert refused["statusCode"] == 429 and int(refused["headers"]["Retry-After"]) > 0
    assert body_of(refused)["quota"] == "batches"


@pytest.fixture
def slow_conditions(monkeypatch):
    """Widens the window between moto reading an item and writing it: every condition
    expression takes 50 ms to parse, after the item was read."""
    real = moto_ddb.create_condition_expression_parser

    def slow(*args, **kwargs):
        threading.Event().wait(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(moto_ddb, "create_condition_expression_parser", slow)


def race(n, action):
    barrier, results = threading.Barrier(n), [None] * n

    def one(i):
        barrier.wait()
        results[i] = action(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_two_requests_for_the_last_unit_one_wins(stack, endpoint, slow_conditions):
    stack.with_environment("api", QUOTA_IMAGES_PER_DAY="3")
    put_model(stack.resources, "alice", "v1", "READY")
    usage.take_images(usage_table(stack), "alice", 1, 3)  # 2 left; each request asks for 2
    statuses = race(2, lambda _i: call(stack, "POST", "/users/alice/generations", body=GEN)["statusCode"])
    assert sorted(statuses) == [202, 429]
    assert usage.today(usage_table(stack), "alice")["images"] == 3


def test_moto_alone_lets_both_through(stack, slow_conditions, monkeypatch):
    """Why src/avatarflow_local/atomic_items.py exists: without its lock, moto passes both
    racing conditional writes for the last unit (DynamoDB passes one)."""
    for name in atomic_items.WRITES:
        method = getattr(moto_ddb.DynamoDBBackend, name)
        monkeypatch.setattr(moto_ddb.DynamoDBBackend, name, getattr(method, "__wrapped__", method))
    # moto_strict (issue 18) serialises whole DynamoDB requests too: without both, moto is racy.
    handler = moto_responses.DynamoHandler.call_action
    monkeypatch.setattr(moto_responses.DynamoHandler, "call_action", getattr(handler, "__wrapped__", handler))
    table = usage_table(stack)

    def take(_i):
        try:
            return usage.take_images(table, "alice", 1, 1)
        except usage.QuotaExceeded:
            return "refused"

    assert "refused" not in race(2, take)


def test_concurrent_batches_for_the_last_unit(stack, slow_conditions):
    table = usage_table(stack)
    usage.take_batch(table, "alice", "b0", 2)

    def take(i):
        try:
            return usage.take_batch(table, "alice", f"b{i + 1}", 2)
        except usage.QuotaExceeded:
            return "refused"

    assert sorted(map(str, race(2, take))) == ["2", "refused"]
    assert usage.take_batch(table, "alice", "b0", 2) == 2  # a batch counted once, however often it asks


def test_refused_generation_gives_its_images_back(stack):
    """The endpoint refuses (no stubbed answer: InvokeEndpointAsync fails): 503, and the images
    taken for the request are returned to the day's quota."""
    put_model(stack.resources, "alice", "v1", "READY")
    api = stack.module("api")
    from botocore.stub import Stubber

    with Stubber(api.aws().runtime) as stub:
        stub.add_client_error("invoke_endpoint_async", "ServiceUnavailable", http_status_code=503)
        assert call(stack, "POST", "/users/alice/generations", body=GEN)["statusCode"] == 503
    assert usage.today(usage_table(stack), "alice")["images"] == 0


# ---------------------------------------------------------------- metering


def test_metering_counts_each_job_and_generation_once(stack):
    client, table = boto3.client("dynamodb"), stack.resources.physical["UsageTable"]["Ref"]
    assert usage.record_training(client, table, "alice", "job1", 120, "ml.m5.large") is True
    assert usage.record_training(client, table, "alice", "job1", 120, "ml.m5.large") is False
    assert usage.record_generation(client, table, "alice", "g1", 2.5, 2, None) is True
    assert usage.record_generation(client, table, "alice", "g1", 2.5, 2, None) is False
    view = body_of(call(stack, "GET", "/users/alice/usage"))
    assert view["total"] == view["this_month"] == {
        "training_seconds": 120, "inference_seconds": 2.5, "images": 2, "trainings": 1, "generations": 1,
        "cost_usd": 0}  # ml.m5.large and an unknown type have no price in prices.json
    assert view["cost_basis"]["retrieved"] == usage.prices()["retrieved"]


def test_prices_are_dated_data_with_a_source():
    data = usage.prices()
    assert data["source"].startswith("https://") and datetime.fromisoformat(data["retrieved"])
    assert all(isinstance(v, int | float) and v > 0 for v in data["usd_per_hour"].values())
    hourly = data["usd_per_hour"]["ml.g5.xlarge"]
    assert float(usage.estimated_cost("ml.g5.xlarge", 3600)) == pytest.approx(hourly)
    assert usage.estimated_cost("ml.unknown", 3600) is None


def test_only_the_backend_client_can_obtain_the_admin_scope(stack):
    """The template: the resource server defines avatarflow/admin; only BackendClient (client
    credentials, a secret Cognito generates) may request it; the users' client has no OAuth
    scopes at all, so no user token carries it; the admin routes require it at API Gateway."""
    from avatarflow_local.workflow_stack import load_template

    resources = load_template()["Resources"]
    server = resources["ApiResourceServer"]["Properties"]
    scope = f"{server['Identifier']}/{server['Scopes'][0]['ScopeName']}"
    assert scope == stack.module("api").ADMIN_SCOPE  # what the caller check looks for
    clients = {n: r["Properties"] for n, r in resources.items()
               if r["Type"] == "AWS::Cognito::UserPoolClient"}
    holders = {n for n, p in clients.items() if scope in p.get("AllowedOAuthScopes", [])}
    assert holders == {"BackendClient"}
    backend = clients["BackendClient"]
    assert backend["AllowedOAuthFlows"] == ["client_credentials"] and backend["GenerateSecret"] is True
    assert "AllowedOAuthScopes" not in clients["UserPoolClient"]
    for event in resources["ApiFunction"]["Properties"]["Events"].values():
        if event["Properties"]["Path"].startswith("/admin/"):
            assert event["Properties"]["Auth"]["AuthorizationScopes"] == [scope]
