"""Lambda as Lambda runs it (src/avatarflow_local/lambda_hook.py): each invocation sees only
its own environment, gets its Timeout and MemorySize, and a timed-out sandbox is frozen."""

import os
import threading
import time

import boto3
import pytest
import unit_stack

from avatarflow_local.lambda_hook import FunctionSpec, LambdaTimeout, run_as_lambda
from avatarflow_local.workflow_stack import function_variables, load_template

# One template-built stack per module, emptied after each test (tests/unit_stack.py).
module_stack, stack = unit_stack.module_stack, unit_stack.stack


def spec(**overrides):
    values = {"name": "probe", "environment": {"OWN": "mine"}, "timeout_s": 2.0, "memory_mb": 512}
    return FunctionSpec(**{**values, **overrides})


def test_an_invocation_sees_only_its_own_environment(monkeypatch):
    monkeypatch.setenv("OTHER_FUNCTIONS_VARIABLE", "theirs")
    monkeypatch.setenv("OWN", "process value")
    monkeypatch.setenv("MIN_IMAGES", "3")  # a stray variable of a developer's shell
    seen = {}

    def handler(event, context):
        seen.update(os.environ)
        seen["getenv"] = os.getenv("OWN")
        return {"memory": context.memory_limit_in_mb, "left_ms": context.get_remaining_time_in_millis()}

    payload, error = run_as_lambda(
        spec(), lambda: handler, {}, hidden=frozenset({"OTHER_FUNCTIONS_VARIABLE"})
    )
    assert error is None
    assert seen["OWN"] == "mine" and seen["getenv"] == "mine"
    assert "OTHER_FUNCTIONS_VARIABLE" not in seen and "MIN_IMAGES" not in seen
    assert seen["AWS_LAMBDA_FUNCTION_NAME"] == "probe" and seen["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "512"
    assert payload["memory"] == 512 and 0 < payload["left_ms"] <= 2000
    # The process environment is untouched, before and after.
    assert os.environ["OWN"] == "process value" and os.environ["OTHER_FUNCTIONS_VARIABLE"] == "theirs"


def test_concurrent_invocations_do_not_see_each_others_environment():
    barrier = threading.Barrier(2)
    seen = {}

    def handler(event, context):
        barrier.wait(timeout=5)  # both invocations are inside their handlers at once
        seen[event["name"]] = os.environ.get("OWN")
        return None

    threads = [
        threading.Thread(
            target=run_as_lambda, args=(spec(name=n, environment={"OWN": n}), lambda: handler, {"name": n})
        )
        for n in ("a", "b")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"a": "a", "b": "b"}


def test_a_handler_past_its_timeout_fails_as_lambda_fails_it(stack):
    bucket = stack.resources.bucket
    finished = threading.Event()
    outcome = {}

    def slow(event, context):
        time.sleep(1.0)
        try:  # Lambda froze this sandbox at the timeout: nothing more reaches AWS
            boto3.client("s3").put_object(Bucket=bucket, Key="uploads/late", Body=b"x")
        except Exception as err:  # noqa: BLE001 - what the abandoned handler ran into
            outcome["error"] = str(err)
        finished.set()
        return "too late"

    payload, error = run_as_lambda(spec(timeout_s=0.3), lambda: slow, {})
    assert error == "Unhandled"
    assert payload["errorType"] == "Sandbox.Timedout"
    assert "Task timed out after 0.30 seconds" in payload["errorMessage"]
    assert finished.wait(5)
    assert "timed out" in outcome["error"]
    assert boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="uploads/late")["KeyCount"] == 0
    with pytest.raises(LambdaTimeout):
        run_as_lambda(spec(timeout_s=0.3), lambda: slow, {}, raise_errors=True)


def test_an_unhandled_error_is_the_invoke_api_answer():
    def broken(event, context):
        raise ValueError("bad event")

    payload, error = run_as_lambda(spec(), lambda: broken, {})
    assert error == "Unhandled"
    assert payload["errorType"] == "ValueError" and payload["errorMessage"] == "bad event"
    with pytest.raises(ValueError, match="bad event"):
        run_as_lambda(spec(), lambda: broken, {}, raise_errors=True)


def test_specs_come_from_the_template(stack):
    template = load_template()
    globals_ = template["Globals"]["Function"]
    specs = stack.hook.specs
    for lid, resource in template["Resources"].items():
        if resource["Type"] != "AWS::Serverless::Function":
            continue
        props = resource["Properties"]
        folder = next(name for name, s in specs.items() if s.role_arn.endswith(f"-{lid}Role"))
        assert specs[folder].timeout_s == float(props.get("Timeout", globals_.get("Timeout", 3)))
        assert specs[folder].memory_mb == int(props.get("MemorySize", globals_.get("MemorySize", 128)))
        assert set(specs[folder].environment) == set(function_variables(template, lid))
    # Another function's variables are not in this one's environment.
    assert "STATE_MACHINE_ARN" in specs["on_upload"].environment
    assert "TOPIC_ARN" not in specs["api"].environment


def test_an_unknown_function_is_resource_not_found(stack):
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as missing:
        stack.invoke("no_such_function", {})
    assert missing.value.response["Error"]["Code"] == "ResourceNotFoundException"
