"""functions/api on hostile bodies, run as Lambda runs it on the template's stack (one per
module, tests/unit_stack.py): the caller is checked before the body is read, the body is
bounded (size, JSON depth, UTF-8) before pydantic sees it, validation errors are capped, and
every number is strict. Each case used to end in a 500 (RecursionError, UnicodeDecodeError),
a 13 MB error list, or a coerced value."""

import base64
import json

import pytest
import unit_stack
from apitools import body_of, http_event

module_stack, stack = unit_stack.module_stack, unit_stack.stack  # one stack per module, emptied per test

MAX_DEPTH = 32
MAX_BODY = 64 * 1024
GOOD = {"prompt": "portrait of sks person, studio light", "num_images": 1, "seed": 7}
UPLOAD = {"files": [{"name": "a.jpg", "content_type": "image/jpeg"}]}


def nested(depth: int) -> str:
    """A generation body whose JSON nests `depth` levels in all (the object is level 1)."""
    return '{"prompt": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


def raw_event(path: str, raw: bytes, *, sub: str | None = "alice", content_type="application/json") -> dict:
    """A POST whose body is these bytes, base64-encoded as API Gateway sends non-text bodies."""
    event = http_event("POST", path, sub=sub)
    event["headers"]["content-type"] = content_type
    event["body"] = base64.b64encode(raw).decode()
    event["isBase64Encoded"] = True
    return event


def errors_of(response: dict) -> dict[str, str]:
    return {e["field"]: e["reason"] for e in body_of(response)["errors"]}


HOSTILE_BODIES = {
    "nested 1,500 deep": nested(1500).encode(),
    "nested 100,000 deep": nested(100_000).encode(),
    "not UTF-8": b'{"prompt": "\xff\xfe"}',
    "not base64 of anything": None,  # set below: an invalid base64 string
    "over the size bound": json.dumps({"prompt": "x" * (MAX_BODY + 1)}).encode(),
    "not JSON": b"{not json",
    "200k unknown keys": json.dumps({f"k{i}": 0 for i in range(200_000)}).encode(),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_BODIES))
def test_the_caller_is_checked_before_the_body_is_read(stack, case):
    """Another user's route answers 403 and a tokenless request 401, whatever the body: the
    body is never decoded, measured or parsed for them."""
    for sub, status in (("alice", 403), (None, 401)):
        for content_type in ("application/json", "application/x-www-form-urlencoded", "multipart/form-data"):
            event = raw_event("/users/bob/generations", HOSTILE_BODIES[case] or b"", sub=sub,
                              content_type=content_type)
            if HOSTILE_BODIES[case] is None:
                event["body"] = "%%% not base64 %%%"
            response = stack.call("api", event)
            assert response["statusCode"] == status, (case, sub, content_type, response)


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1500, 30_000])
def test_json_deeper_than_the_bound_is_400_before_validation(stack, depth):
    response = stack.call("api", raw_event("/users/alice/generations", nested(depth).encode()))
    assert response["statusCode"] == 400, response
    assert errors_of(response) == {"body": f"JSON nests deeper than {MAX_DEPTH} levels"}


def test_json_at_the_depth_bound_reaches_validation(stack):
    response = stack.call("api", raw_event("/users/alice/generations", nested(MAX_DEPTH).encode()))
    assert response["statusCode"] == 400
    assert "body.prompt" in errors_of(response)  # pydantic's answer: a list is not a prompt


def test_brackets_inside_strings_do_not_count_as_depth(stack):
    body = json.dumps({"prompt": "[" * 200 + "{" * 200, "negative_prompt": '\\"[[[' * 50})
    response = stack.call("api", raw_event("/users/alice/generations", body.encode()))
    assert response["statusCode"] == 409, response  # the body is valid; alice has no READY model


def test_body_over_the_size_bound_is_413(stack):
    for raw in (json.dumps({"prompt": "x" * MAX_BODY}).encode(), b" " * (MAX_BODY + 1)):
        response = stack.call("api", raw_event("/users/alice/generations", raw))
        assert response["statusCode"] == 413, response
        message = f"request body is larger than {MAX_BODY} bytes"
        assert body_of(response) == {"statusCode": 413, "message": message}
    text = http_event("POST", "/users/alice/generations", body=json.dumps({"prompt": "é" * (MAX_BODY // 2)}))
    assert stack.call("api", text)["statusCode"] == 413  # bytes, not characters


@pytest.mark.parametrize("raw", [b'{"prompt": "\xff"}', b"\xef\xbb\xbf\x80"])
def test_body_that_is_not_utf8_is_400(stack, raw):
    response = stack.call("api", raw_event("/users/alice/generations", raw))
    assert response["statusCode"] == 400, response
    assert errors_of(response) == {"body": "the body is not UTF-8 text"}
    event = raw_event("/users/alice/generations", b"")
    event["body"] = "%%% not base64 %%%"
    response = stack.call("api", event)
    assert response["statusCode"] == 400, response
    assert errors_of(response) == {"body": "the body is not valid base64"}


def test_validation_errors_are_capped(stack):
    """A body of thousands of unknown keys (under the size bound) answers with the first ten
    errors, each field and reason bounded, and says how many there were."""
    body = {**GOOD, "k" * 5000: 1, **{f"k{i}": 0 for i in range(4000)}}
    raw = json.dumps(body).encode()
    assert len(raw) < MAX_BODY
    response = stack.call("api", raw_event("/users/alice/generations", raw))
    assert response["statusCode"] == 400
    answer = body_of(response)
    assert len(answer["errors"]) == 10
    assert answer["message"] == "invalid request: 4001 errors, the first 10 shown"
    assert all(len(e["field"]) <= 200 and len(e["reason"]) <= 200 for e in answer["errors"])
    assert len(response["body"]) < 5000


def test_few_errors_are_all_listed(stack):
    response = stack.call("api", http_event("POST", "/users/alice/generations", body={"num_images": 0}))
    assert response["statusCode"] == 400
    answer = body_of(response)
    assert answer["message"] == "invalid request"
    assert set(errors_of(response)) == {"body.prompt", "body.num_images"}


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"guidance_scale": "7.5"}, "body.guidance_scale"),
        ({"guidance_scale": True}, "body.guidance_scale"),
        ({"guidance_scale": [7.5]}, "body.guidance_scale"),
        ({"num_images": 2.0}, "body.num_images"),
        ({"num_images": True}, "body.num_images"),
        ({"steps": "30"}, "body.steps"),
        ({"seed": "7"}, "body.seed"),
        ({"width": 64.0}, "body.width"),
        ({"prompt": 7}, "body.prompt"),
    ],
)
def test_numbers_are_strict(stack, patch, field):
    response = stack.call("api", http_event("POST", "/users/alice/generations", body={**GOOD, **patch}))
    assert response["statusCode"] == 400, response
    assert field in errors_of(response)


def test_an_integer_is_a_valid_float(stack):
    """JSON has one number type: 7 is a float as much as 7.0 (what strict mode allows)."""
    response = stack.call("api", http_event("POST", "/users/alice/generations",
                                            body={**GOOD, "guidance_scale": 7}))
    assert response["statusCode"] == 409, response  # validated; alice has no READY model


@pytest.mark.parametrize("flag", ["true", 1, "yes"])
def test_booleans_are_strict(stack, flag):
    response = stack.call("api", http_event("POST", "/users/alice/uploads",
                                            body={**UPLOAD, "include_request_json": flag}))
    assert response["statusCode"] == 400, response
    assert "body.include_request_json" in errors_of(response)
