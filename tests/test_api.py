"""functions/api: every route, run as Lambda runs it against the template's resources and as
its own role; InvokeEndpointAsync answered by a botocore Stubber after the IAM check."""

import base64
import functools
import json
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import boto3
import pytest
import unit_stack
from apitools import CheckedStubber, body_of, http_event, put_model, sns_event
from unit_stack import UnitStack

from avatarflow import keys

REPO = Path(__file__).resolve().parents[1]
module_stack, stack = unit_stack.module_stack, unit_stack.stack  # one stack per module, emptied per test
GOOD_BODY = {"prompt": "portrait of sks person as an astronaut, studio light", "num_images": 2, "seed": 7}
ROLE = "avatarflow-local-ApiFunctionRole"  # the role SAM generates, in the local stack


@pytest.fixture
def api(stack, monkeypatch):
    module = stack.module("api")
    stubber = CheckedStubber(module.aws().runtime)
    stubber.activate()
    ids = iter(f"gen{i:04d}" for i in range(1000))
    monkeypatch.setattr(module, "new_id", lambda: next(ids))
    resources = stack.resources

    class Api:
        mod = module
        stub = stubber
        bucket = resources.bucket
        endpoint = resources.endpoint_name
        models_table = resources.models_table
        enforcer = stack.enforcer
        generations_table = resources.generations_table
        put_model = functools.partial(put_model, resources)

        def __call__(self, method, path, **kwargs):
            return stack.call("api", http_event(method, path, **kwargs))

        def call_event(self, event):
            return stack.call("api", event)

        def notify(self, message):
            topic = resources.inference_success_topic if message.get("invocationStatus") == "Completed" \
                else resources.inference_error_topic
            return stack.call("on_generation_done", sns_event(message, topic))

        def generation_row(self, generation_id):
            table = boto3.resource("dynamodb").Table(resources.generations_table)
            return table.get_item(Key={"generation_id": generation_id}).get("Item")

    yield Api()
    stubber.deactivate()


def expect_invoke(api, generation_id, output="async-output/abc.out"):
    api.stub.add_response(
        "invoke_endpoint_async",
        {
            "InferenceId": generation_id,
            "OutputLocation": f"s3://{api.bucket}/{output}",
            "FailureLocation": f"s3://{api.bucket}/async-failures/abc-error.out",
        },
        expected_params={
            "EndpointName": api.endpoint,
            "InputLocation": f"s3://{api.bucket}/requests/{generation_id}.json",
            "InferenceId": generation_id,
            "ContentType": "application/json",
        },
    )


def fields_of(response):
    return {e["field"]: e["reason"] for e in body_of(response)["errors"]}


# ---------------------------------------------------------------- auth, common to all routes

ROUTES = [
    ("POST", "/users/{u}/uploads", {"files": [{"name": "a.jpg", "content_type": "image/jpeg"}]}),
    ("GET", "/users/{u}/models", None),
    ("POST", "/users/{u}/generations", GOOD_BODY),
    ("GET", "/users/{u}/generations/gen0000", None),
    ("DELETE", "/users/{u}", None),
    ("GET", "/users/{u}/usage", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_no_token_is_401(api, method, path, body):
    response = api(method, path.format(u="alice"), sub=None, body=body)
    assert response["statusCode"] == 401


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_other_users_id_is_403(api, method, path, body):
    response = api(method, path.format(u="bob"), sub="alice", body=body)
    assert response["statusCode"] == 403


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_malformed_user_id_is_400(api, method, path, body):
    response = api(method, path.format(u="al.ice"), sub="al.ice", body=body)
    assert response["statusCode"] == 400
    assert "path.user_id" in fields_of(response)


def test_401_wins_over_a_bad_body(api):
    response = api("POST", "/users/alice/generations", sub=None, body={"prompt": ""})
    assert response["statusCode"] == 401
    response = api("POST", "/users/bob/generations", sub="alice", body={"prompt": ""})
    assert response["statusCode"] == 403


def test_claims_without_sub_is_401(api):
    response = api("GET", "/users/alice/models", claims={"email": "a@example.com"})
    assert response["statusCode"] == 401


def test_unknown_route_is_404(api):
    assert api("GET", "/users/alice/nothing-here")["statusCode"] == 404


# ---------------------------------------------------------------- uploads


def test_uploads_issue_one_scoped_form_per_file(api):
    body = {
        "files": [
            {"name": "IMG_0001.jpg", "content_type": "image/jpeg"},
            {"name": "b.png", "content_type": "image/png"},
        ],
        "include_request_json": True,
    }
    response = api("POST", "/users/alice/uploads", body=body)
    assert response["statusCode"] == 200
    out = body_of(response)
    batch = out["batch_id"]
    assert out["prefix"] == f"uploads/alice/{batch}/"
    assert [u["key"] for u in out["uploads"]] == [
        f"uploads/alice/{batch}/IMG_0001.jpg",
        f"uploads/alice/{batch}/b.png",
        f"uploads/alice/{batch}/request.json",
    ]
    first = out["uploads"][0]
    assert first["fields"]["key"] == f"uploads/alice/{batch}/IMG_0001.jpg"
    assert first["fields"]["Content-Type"] == "image/jpeg"
    policy = json.loads(base64.b64decode(first["fields"]["policy"]))
    conditions = policy["conditions"]
    assert ["starts-with", "$key", f"uploads/alice/{batch}/"] in conditions
    assert {"Content-Type": "image/jpeg"} in conditions
    assert ["content-length-range", 1, 20 * 1024 * 1024] in conditions
    assert {"bucket": api.bucket} in conditions
    assert {"key": f"uploads/alice/{batch}/IMG_0001.jpg"} in conditions


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"files": []}, "body.files"),
        ({"files": [{"name": "../x.jpg", "content_type": "image/jpeg"}]}, "body.files.0.name"),
        ({"files": [{"name": "a.jpg", "content_type": "text/html"}]}, "body.files.0.content_type"),
        ({"files": [{"name": "a.jpg", "content_type": "image/jpeg"}] * 2}, "body.files"),
        ({"files": [{"name": "request.json", "content_type": "image/jpeg"}]}, "body.files"),
        ({"files": [{"name": f"{i}.jpg", "content_type": "image/jpeg"} for i in range(31)]}, "body.files"),
    ],
)
def test_uploads_bad_body_is_400_with_field(api, body, field):
    response = api("POST", "/users/alice/uploads", body=body)
    assert response["statusCode"] == 400
    assert field in fields_of(response)


# ---------------------------------------------------------------- models


def test_models_lists_versions_newest_first(api):
    api.put_model("alice", "v1", "READY", "2025-01-01T00:00:00.000000Z")
    api.put_model("alice", "v2", "FAILED", "2025-02-01T00:00:00.000000Z")
    api.put_model("bob", "v9", "READY")
    response = api("GET", "/users/alice/models")
    assert response["statusCode"] == 200
    out = body_of(response)
    assert [(m["version"], m["status"]) for m in out["models"]] == [("v2", "FAILED"), ("v1", "READY")]
    assert out["latest_ready"] == "v1"


def test_models_empty_for_new_user(api):
    out = body_of(api("GET", "/users/carol/models", sub="carol"))
    assert out == {"user_id": "carol", "latest_ready": None, "models": []}


# ---------------------------------------------------------------- create generation


def test_create_generation_writes_request_row_and_invokes(api):
    api.put_model("alice", "v1", "READY", "2025-01-01T00:00:00.000000Z")
    api.put_model("alice", "v2", "READY", "2025-03-01T00:00:00.000000Z")
    api.put_model("alice", "v3", "TRAINING", "2025-04-01T00:00:00.000000Z")
    expect_invoke(api, "gen0000")
    response = api("POST", "/users/alice/generations", body=GOOD_BODY)
    assert response["statusCode"] == 202, response
    out = body_of(response)
    assert out == {
        "generation_id": "gen0000",
        "status": "PENDING",
        "model_version": "v2",
        "status_url": "https://api.example.com/users/alice/generations/gen0000",
    }
    api.stub.assert_no_pending_responses()
    request = json.loads(
        boto3.client("s3").get_object(Bucket=api.bucket, Key="requests/gen0000.json")["Body"].read()
    )
    assert request == {
        "generation_id": "gen0000",
        "user_id": "alice",
        "model_version": "v2",
        "prompt": GOOD_BODY["prompt"],
        "negative_prompt": None,
        "num_images": 2,
        "steps": 30,
        "guidance_scale": 7.5,
        "width": 512,
        "height": 512,
        "seed": 7,
    }
    row = api.generation_row("gen0000")
    assert row["status"] == "PENDING"
    assert row["user_id"] == "alice"
    assert row["request_key"] == "requests/gen0000.json"
    assert row["output_location"] == f"s3://{api.bucket}/async-output/abc.out"
    assert row["ttl"] > 0
    # Each call was checked against the function's role, the stubbed endpoint call included.
    allowed = api.enforcer.allowed
    assert allowed[(ROLE, "sagemaker:InvokeEndpointAsync")] == 1 and allowed[(ROLE, "s3:PutObject")] == 1


def test_request_document_parses_in_the_inference_container(api):
    """The contract between the two sides: what the API writes, the container accepts."""
    inference_engine = pytest.importorskip("inference_engine")
    api.put_model("alice", "v1", "READY")
    for i, body in enumerate([GOOD_BODY, {"prompt": "sks person", "seed": 2**32 - 9, "negative_prompt": ""}]):
        expect_invoke(api, f"gen{i:04d}")
        assert api("POST", "/users/alice/generations", body=body)["statusCode"] == 202
        raw = boto3.client("s3").get_object(Bucket=api.bucket, Key=f"requests/gen{i:04d}.json")["Body"].read()
        parsed = inference_engine.parse_request(raw)
        assert (parsed.generation_id, parsed.user_id, parsed.model_version) == (f"gen{i:04d}", "alice", "v1")
        assert parsed.seed == body["seed"]


def test_create_generation_with_explicit_version(api):
    api.put_model("alice", "v1", "READY", "2025-01-01T00:00:00.000000Z")
    api.put_model("alice", "v2", "READY", "2025-03-01T00:00:00.000000Z")
    expect_invoke(api, "gen0000")
    response = api("POST", "/users/alice/generations", body={**GOOD_BODY, "model_version": "v1"})
    assert response["statusCode"] == 202
    assert body_of(response)["model_version"] == "v1"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"prompt": "x" * 501}, "body.prompt"),
        ({"prompt": "   "}, "body.prompt"),
        ({"prompt": "a NUDE photo of sks person"}, "body.prompt"),
        ({"num_images": 9}, "body.num_images"),
        ({"num_images": 0}, "body.num_images"),
        ({"num_images": "4"}, "body.num_images"),
        ({"steps": 81}, "body.steps"),
        ({"guidance_scale": 21}, "body.guidance_scale"),
        ({"width": 500}, "body.width"),
        ({"height": 64}, "body.height"),
        ({"width": 2048}, "body.width"),
        ({"seed": -1}, "body.seed"),
        ({"seed": 2**32 - 1}, "body.seed"),
        ({"model_version": "../v1"}, "body.model_version"),
        ({"colour": "blue"}, "body.colour"),
    ],
)
def test_create_generation_bad_body_is_400_with_field(api, patch, field):
    api.put_model("alice", "v1", "READY")
    response = api("POST", "/users/alice/generations", body={**GOOD_BODY, **patch})
    assert response["statusCode"] == 400
    reasons = fields_of(response)
    assert field in reasons, reasons
    assert reasons[field]


def test_create_generation_missing_prompt_and_bad_json(api):
    response = api("POST", "/users/alice/generations", body={"num_images": 1})
    assert response["statusCode"] == 400
    assert "body.prompt" in fields_of(response)
    response = api("POST", "/users/alice/generations", body="{not json")
    assert response["statusCode"] == 400
    assert fields_of(response) == {"body": "JSON decode error"}


def test_negative_prompt_is_not_moderated(api):
    api.put_model("alice", "v1", "READY")
    expect_invoke(api, "gen0000")
    response = api("POST", "/users/alice/generations", body={**GOOD_BODY, "negative_prompt": "nsfw, nude"})
    assert response["statusCode"] == 202


def test_create_generation_without_ready_model_is_409(api):
    assert api("POST", "/users/alice/generations", body=GOOD_BODY)["statusCode"] == 409
    api.put_model("alice", "v1", "TRAINING")
    assert api("POST", "/users/alice/generations", body=GOOD_BODY)["statusCode"] == 409
    api.put_model("alice", "v0", "FAILED")
    response = api("POST", "/users/alice/generations", body={**GOOD_BODY, "model_version": "v0"})
    assert response["statusCode"] == 409
    # Nothing was queued or written.
    assert "Contents" not in boto3.client("s3").list_objects_v2(Bucket=api.bucket, Prefix="requests/")


def test_create_generation_unknown_version_is_404(api):
    api.put_model("alice", "v1", "READY")
    response = api("POST", "/users/alice/generations", body={**GOOD_BODY, "model_version": "v7"})
    assert response["statusCode"] == 404


def test_another_users_model_is_not_usable(api):
    api.put_model("bob", "v1", "READY")
    response = api("POST", "/users/alice/generations", body={**GOOD_BODY, "model_version": "v1"})
    assert response["statusCode"] == 404


def test_endpoint_refusal_is_503_and_marks_failed(api):
    api.put_model("alice", "v1", "READY")
    api.stub.add_client_error("invoke_endpoint_async", "ValidationError", "Endpoint not found", 400)
    response = api("POST", "/users/alice/generations", body=GOOD_BODY)
    assert response["statusCode"] == 503
    assert api.generation_row("gen0000")["status"] == "FAILED"


# ---------------------------------------------------------------- get generation, lifecycle


def queue(api, user="alice"):
    api.put_model(user, "v1", "READY")
    expect_invoke(api, "gen0000")
    assert api("POST", f"/users/{user}/generations", body=GOOD_BODY, sub=user)["statusCode"] == 202
    return "gen0000"


def write_output(api, images, key="async-output/abc.out", extra=None):
    result = {"generation_id": "gen0000", "images": images, "timings": {"total_s": 4.2}, **(extra or {})}
    boto3.client("s3").put_object(Bucket=api.bucket, Key=key, Body=json.dumps(result).encode())
    for image in (i for i in images if "key" in i):
        boto3.client("s3").put_object(Bucket=api.bucket, Key=image["key"], Body=b"\x89PNG fake")


def success_notice(api, generation_id, output="async-output/abc.out"):
    return {
        "awsRegion": "us-east-1",
        "eventTime": "2025-01-01T00:01:00.000Z",
        "receivedTime": "2025-01-01T00:00:00.000Z",
        "invocationStatus": "Completed",
        "requestParameters": {
            "contentType": "application/json",
            "endpointName": api.endpoint,
            "inputLocation": f"s3://{api.bucket}/requests/{generation_id}.json",
        },
        "responseParameters": {
            "contentType": "application/json",
            "outputLocation": f"s3://{api.bucket}/{output}",
        },
        "inferenceId": generation_id,
        "eventVersion": "1.0",
        "eventSource": "aws:sagemaker",
        "eventName": "InferenceResult",
    }


def failure_notice(api, generation_id, reason="ClientError: Received server error (500) from model."):
    notice = success_notice(api, generation_id)
    notice["invocationStatus"] = "Failed"
    notice["failureReason"] = reason
    notice["responseParameters"] = {
        "contentType": "application/json",
        "failureLocation": f"s3://{api.bucket}/async-failures/abc-error.out",
    }
    return notice


def test_lifecycle_pending_to_completed_with_presigned_urls(api):
    generation_id = queue(api)
    pending = api("GET", f"/users/alice/generations/{generation_id}")
    assert pending["statusCode"] == 200
    assert body_of(pending)["status"] == "PENDING"
    assert "images" not in body_of(pending)

    prefix = keys.generation_prefix("alice", generation_id)
    images = [
        {"key": f"{prefix}000.png", "withheld": False, "seed": 7, "identity_similarity": 0.61},
        {"key": f"{prefix}001.png", "withheld": False, "seed": 8, "identity_similarity": None},
    ]
    write_output(api, images)
    assert api.notify(success_notice(api, generation_id)) == {"outcomes": ["COMPLETED"]}

    done = api("GET", f"/users/alice/generations/{generation_id}")
    out = body_of(done)
    assert out["status"] == "COMPLETED"
    assert out["expires_in"] == 900
    assert [(i["seed"], i["identity_similarity"]) for i in out["images"]] == [(7, 0.61), (8, None)]
    for image, expected in zip(out["images"], images, strict=True):
        url = urlparse(image["url"])
        assert url.path.endswith("/" + expected["key"])
        assert api.bucket in url.netloc + url.path
        query = parse_qs(url.query)
        assert query["X-Amz-Expires"] == ["900"]
        assert "X-Amz-Signature" in query
    # The URL really fetches the object (moto answers presigned GETs).
    import requests

    assert requests.get(out["images"][0]["url"], timeout=10).content == b"\x89PNG fake"


def test_lifecycle_pending_to_failed(api):
    generation_id = queue(api)
    assert api.notify(failure_notice(api, generation_id)) == {"outcomes": ["FAILED"]}
    out = body_of(api("GET", f"/users/alice/generations/{generation_id}"))
    assert out["status"] == "FAILED"
    assert out["error"].startswith("ClientError: Received server error (500)")
    assert "images" not in out


def test_another_users_generation_is_404_like_a_missing_one(api):
    generation_id = queue(api, user="bob")
    # alice asks for bob's generation under her own path: same answer as a missing id.
    theirs = api("GET", f"/users/alice/generations/{generation_id}")
    missing = api("GET", "/users/alice/generations/doesnotexist")
    assert theirs["statusCode"] == missing["statusCode"] == 404
    assert body_of(theirs) == body_of(missing)


def test_malformed_generation_id_is_400(api):
    response = api("GET", "/users/alice/generations/bad.id")
    assert response["statusCode"] == 400
    assert "path.generation_id" in fields_of(response)


def test_images_outside_the_generation_folder_are_never_signed(api):
    generation_id = queue(api)
    prefix = keys.generation_prefix("alice", generation_id)
    write_output(
        api,
        [
            {"key": f"{prefix}000.png", "withheld": False, "seed": 1, "identity_similarity": 0.5},
            {"key": "uploads/bob/b1/secret.jpg", "withheld": False, "seed": 2, "identity_similarity": 0.5},
        ]
    )
    api.notify(success_notice(api, generation_id))
    out = body_of(api("GET", f"/users/alice/generations/{generation_id}"))
    assert len(out["images"]) == 1
    assert "bob" not in out["images"][0]["url"]


# ---------------------------------------------------------------- delete user
# The erasure itself (the mark, the passes of erase_user, every writer's check) is tested in
# tests/test_erasure.py and, with work in flight, tests/test_erasure_e2e.py.


def test_delete_user_marks_and_queues_the_erasure_and_deletes_nothing_itself(api):
    # Not alice: the mark outlives this test in the module's stack (unit_stack.reset empties
    # the registry and generations tables only) and would refuse alice's writes later on.
    s3 = boto3.client("s3")
    s3.put_object(Bucket=api.bucket, Key="models/erin/v1/adapter.json", Body=b"{}")
    response = api("DELETE", "/users/erin", sub="erin")
    assert response["statusCode"] == 202
    assert body_of(response)["status_url"].endswith("/users/erin/deletion")
    assert body_of(api("GET", "/users/erin/deletion", sub="erin"))["status"] == "PENDING"
    # The erase_user function deletes (its first pass is queued): the API's role may not.
    assert s3.list_objects_v2(Bucket=api.bucket, Prefix="models/erin/")["KeyCount"] == 1


# ---------------------------------------------------------------- configuration, OpenAPI


def test_image_bounds_come_from_the_function_environment(stack):
    """The local tiny model runs at 64 px: the local runtime gives the API MIN_IMAGE_SIZE and
    DEFAULT_IMAGE_SIZE through its function spec. The template sets neither (SD's 256..1024
    bounds hold in the cloud), so a handler with the template's environment refuses 128."""
    event = http_event("POST", "/users/alice/generations", body={"prompt": "sks person", "width": 128})
    refused = stack.call("api", event)
    assert refused["statusCode"] == 400 and "body.width" in fields_of(refused)
    small = UnitStack(stack.resources, {})  # app.py reads the bounds at import: a fresh module
    small.with_environment("api", MIN_IMAGE_SIZE="64", DEFAULT_IMAGE_SIZE="64")
    assert small.call("api", event)["statusCode"] == 409  # valid now; alice has no READY model
    body = small.module("api").GenerationBody(prompt="sks person")
    assert (body.width, body.height) == (64, 64)


def test_openapi_document_is_up_to_date(api):
    current = json.loads(api.mod.openapi_json())
    committed = json.loads((REPO / "docs/openapi.json").read_text())
    assert committed == current, "run: .venv/bin/python functions/api/app.py > docs/openapi.json"
    assert set(current["paths"]) == {
        "/users/{user_id}/uploads",
        "/users/{user_id}/models",
        "/users/{user_id}/generations",
        "/users/{user_id}/generations/{generation_id}",
        "/users/{user_id}",
        "/users/{user_id}/deletion",
        "/users/{user_id}/batches",
        "/users/{user_id}/batches/{batch_id}",
        "/users/{user_id}/packs",
        "/users/{user_id}/packs/{pack_id}",
        "/users/{user_id}/usage",
        "/admin/users",
        "/admin/users/{user_id}",
    }


def test_sample_events_run(api):
    expected = {
        "api_create_upload.json": 200,
        "api_list_models.json": 200,
        "api_create_generation.json": 409,  # alice has no READY model in an empty table
        "api_get_generation.json": 404,
        "api_delete_user.json": 202,
    }
    for name, status in expected.items():
        event = json.loads((REPO / "events" / name).read_text())
        assert api.call_event(event)["statusCode"] == status, name


# ---------------------------------------------------------------- template agrees with the code


def load_template():
    import yaml

    class CfnLoader(yaml.SafeLoader):
        pass

    def tag(loader, suffix, node):
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        return {suffix: value}

    CfnLoader.add_multi_constructor("!", tag)
    return yaml.load((REPO / "template.yaml").read_text(), Loader=CfnLoader)  # noqa: S506 - SafeLoader subclass


def test_template_wires_what_the_functions_read():
    from avatarflow import generations as gen

    template = load_template()
    res = template["Resources"]
    api_fn = res["ApiFunction"]["Properties"]
    # Environment wiring (incl. Globals) is checked for every function in test_template.py.
    routes = {(e["Properties"]["Method"], e["Properties"]["Path"]) for e in api_fn["Events"].values()}
    openapi = json.loads((REPO / "docs/openapi.json").read_text())
    assert routes == {(m.upper(), p) for p, ops in openapi["paths"].items() for m in ops}
    done_fn = res["OnGenerationDoneFunction"]["Properties"]
    assert {e["Properties"]["Topic"]["Ref"] for e in done_fn["Events"].values()} == {
        "InferenceSuccessTopic",
        "InferenceErrorTopic",
    }
    table = res["GenerationsTable"]["Properties"]
    assert [i["IndexName"] for i in table["GlobalSecondaryIndexes"]] == [gen.USER_INDEX]
    assert table["TimeToLiveSpecification"] == {"AttributeName": "ttl", "Enabled": True}
    config = res["InferenceEndpointConfig"]["Properties"]["AsyncInferenceConfig"]
    assert config["ClientConfig"]["MaxConcurrentInvocationsPerInstance"] == 1
    assert config["OutputConfig"]["S3OutputPath"]["Sub"].endswith("/" + keys.ASYNC_OUTPUT)
    assert config["OutputConfig"]["S3FailurePath"]["Sub"].endswith("/" + keys.ASYNC_FAILURES)
    assert res["InferenceScalableTarget"]["Properties"]["MinCapacity"] == 0
    # Least privilege: no wildcard actions; the endpoint call is scoped to our endpoint.
    for name in ("ApiFunction", "OnGenerationDoneFunction"):
        for statement in res[name]["Properties"]["Policies"][0]["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            assert all("*" not in a for a in actions), (name, actions)
            # Resource "*" only where AWS has no resource-level permissions (test_iam_policy's list):
            # Comprehend, and task-token callbacks (a pack's round).
            star_only = actions in (["comprehend:DetectToxicContent"], ["states:SendTaskSuccess"])
            assert statement["Resource"] != "*" or star_only, (name, actions)
            if "sagemaker:InvokeEndpointAsync" in actions:
                assert statement["Resource"] == {"Ref": "InferenceEndpoint"}


# ---------------------------------------------------------------- content moderation (issue 16)

# Each was accepted by main's word-boundary regex (BLOCKED_TERMS): plurals and related forms,
# look-alikes (Cyrillic, Greek, full-width, leetspeak), zero-width characters and separators.
EVASIONS = [
    "portrait of sks person, nudes",
    "sks person undressing",
    "sks person with children",
    "sks person, n\u0430ked",  # Cyrillic a
    "sks person, n\u03c5de",  # Greek upsilon
    "sks person, \uff4e\uff55\uff44\uff45",  # full-width
    "sks person, p0rn",
    "sks person, nu\u200bde",  # zero-width space
    "sks person, n.u.d.e",
    "sks person, s e x y",
    "sks person, g\u00f6re",  # combining diaeresis once decomposed
]


@pytest.mark.parametrize("prompt", EVASIONS)
def test_prompt_evasions_are_refused(api, prompt):
    response = api("POST", "/users/alice/generations", body={**GOOD_BODY, "prompt": prompt})
    assert response["statusCode"] == 400
    assert "not allowed" in fields_of(response)["body.prompt"]


def test_ordinary_prompts_that_contain_blocked_letters_pass(api):
    """No substring matching: Sussex, kidding and 'the minority report' stay allowed."""
    api.put_model("alice", "v1", "READY")
    prompts = ["sks person in Sussex, just kidding", "sks person reading the minority report"]
    for i, prompt in enumerate(prompts):
        expect_invoke(api, f"gen{i:04d}")
        response = api("POST", "/users/alice/generations", body={**GOOD_BODY, "prompt": prompt})
        assert response["statusCode"] == 202, body_of(response)


def test_negative_prompt_may_not_steer_away_from_clothing(api):
    body = {**GOOD_BODY, "negative_prompt": "clothes, shirt"}
    response = api("POST", "/users/alice/generations", body=body)
    assert response["statusCode"] == 400
    assert "negative_prompt" in " ".join(fields_of(response))


def test_model_ready_email_suggestion_passes_the_api(api):
    """The prompt the MODEL_READY email suggests is accepted by this API for every subject class
    (on main the class list held "child", which the API refused)."""
    from avatarflow import notifications, workflow

    api.put_model("alice", "v1", "READY")
    for i, subject_class in enumerate(workflow.SUBJECT_CLASSES):
        subject, issues = workflow.training_subject({"token": "zwx", "subject_class": subject_class})
        assert issues == []
        mail = notifications.ready("alice", "b1", "v1", None, {**subject, "accepted": 8})
        lines = mail["message"].splitlines()
        (suggested,) = [line.strip() for line in lines if line.startswith("  a portrait")]
        expect_invoke(api, f"gen{i:04d}")
        response = api("POST", "/users/alice/generations", body={**GOOD_BODY, "prompt": suggested})
        assert response["statusCode"] == 202, (subject_class, body_of(response))


def test_generation_view_delivers_only_images_not_withheld(api):
    generation_id = queue(api)
    prefix = keys.generation_prefix("alice", generation_id)
    images = [
        {"key": f"{prefix}000.png", "withheld": False, "seed": 7, "identity_similarity": 0.61,
         "moderation_labels": []},
        {"withheld": True, "seed": 8, "identity_similarity": None,
         "moderation_labels": [{"name": "Explicit", "parent": None, "confidence": 97.0, "level": 1}]},
    ]
    write_output(api, images, extra={"output_moderation": "rekognition", "withheld": 1})
    assert api.notify(success_notice(api, generation_id)) == {"outcomes": ["COMPLETED"]}
    out = body_of(api("GET", f"/users/alice/generations/{generation_id}"))
    assert [i["seed"] for i in out["images"]] == [7]
    assert out["withheld"] == 1 and out["output_moderation"] == "rekognition"


def _toxicity_on(api, stack):
    stack.with_environment("api", PROMPT_TOXICITY_CHECK="comprehend")
    api.put_model("alice", "v1", "READY")


def test_comprehend_toxicity_refuses_a_flagged_prompt(api, stack):
    """Layer 3 in the cloud: DetectToxicContent answered by the stand-in (documented shapes, the
    request checked against the service model and its limits), after the API role's IAM check."""
    from avatarflow_local.moderation_stand_in import ModerationStandIn

    _toxicity_on(api, stack)
    judge = ModerationStandIn(toxicity=lambda text: {"VIOLENCE_OR_THREAT": 0.91} if "hurt" in text else {})
    with judge:
        response = api("POST", "/users/alice/generations",
                       body={**GOOD_BODY, "prompt": "sks person who will hurt you"})
        assert response["statusCode"] == 400
        assert "VIOLENCE_OR_THREAT" in fields_of(response)["body.prompt"]
        expect_invoke(api, "gen0000")
        assert api("POST", "/users/alice/generations", body=GOOD_BODY)["statusCode"] == 202
    ((operation, params),) = [c for c in judge.calls if c[0] == "comprehend:DetectToxicContent"][:1]
    assert params["LanguageCode"] == "en"
    assert params["TextSegments"] == [{"Text": "sks person who will hurt you"}]
    assert api.enforcer.allowed[(ROLE, "comprehend:DetectToxicContent")] == 2


def test_comprehend_unavailable_fails_closed(api, stack):
    """Comprehend answering an error (InternalServerException): 503, nothing queued, never a pass."""
    from avatarflow_local.moderation_stand_in import ModerationStandIn

    _toxicity_on(api, stack)
    with ModerationStandIn(fail_with="InternalServerException"):
        response = api("POST", "/users/alice/generations", body=GOOD_BODY)
    assert response["statusCode"] == 503
    assert "Contents" not in boto3.client("s3").list_objects_v2(Bucket=api.bucket, Prefix="requests/")
