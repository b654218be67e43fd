"""The local proof fails where AWS would: a role missing one statement, and a function that
outlives its Timeout, each make a real workflow run fail the way it would on AWS, with the
user told (the real ASL on moto, the real handlers, roles from template.yaml)."""

import dataclasses
import json
import time

import pytest
from workflow_harness import failure_of, history, messages, run_batch

from avatarflow.sample_photos import one_person_batch
from avatarflow_local.iam import Request, decide

pytestmark = pytest.mark.e2e


def test_a_role_missing_one_statement_fails_the_run_and_the_user_is_told(aws):
    """preprocess_image loses its s3:PutObject on datasets/*: every crop write is denied
    (403), the photos come back as errors, the run ends MODEL_FAILED and the user is told."""
    enforcer = aws["stack"].enforcer
    role = aws["hook"].specs["preprocess_image"].role_arn
    crop = Request("s3:PutObject", f"arn:aws:s3:::{aws['stack'].bucket}/datasets/u/b/images/0.jpg")
    assert decide(enforcer.roles[role], crop) == "Allow"
    enforcer.roles[role] = [s for s in enforcer.roles[role] if "s3:PutObject" not in json.dumps(s)]
    assert decide(enforcer.roles[role], crop) == "ImplicitDeny"

    arn, desc = run_batch(aws, "iam1", one_person_batch(8))

    assert desc["status"] == "FAILED", desc
    denied = {(r.rsplit("/", 1)[1], request.action) for r, request in enforcer.denied}
    assert denied == {("avatarflow-local-PreprocessImageFunctionRole", "s3:PutObject")}
    assert any("AccessDenied" in json.dumps(detail) for detail in failure_of(aws, arn))
    (msg,) = messages(aws)
    assert msg["event"] == "MODEL_FAILED" and "iam1" in msg["body"]
    row = aws["table"].get_item(Key={"user_id": "ada", "version": "iam1"}).get("Item")
    assert row is None or row["status"] == "FAILED"


def test_a_function_past_its_timeout_fails_the_task_as_lambda_does(aws):
    """build_dataset gets 0.2 s and takes at least 1 s (the real handler, after a pause):
    Lambda ends it with Sandbox.Timedout, the state machine's task fails with that error,
    and the user is told."""
    hook = aws["hook"]
    hook.specs["build_dataset"] = dataclasses.replace(hook.specs["build_dataset"], timeout_s=0.2)

    def slowed(handler):
        def slow(event, context):
            time.sleep(1.0)
            return handler(event, context)

        return slow

    hook.wrap("build_dataset", slowed)

    arn, desc = run_batch(aws, "slow1", one_person_batch(8))

    assert desc["status"] == "FAILED", desc
    errors = [
        (e.get("taskFailedEventDetails") or {}).get("error")
        for e in history(aws, arn)
        if e["type"] == "TaskFailed"
    ]
    assert "Sandbox.Timedout" in errors, errors
    (msg,) = messages(aws)
    assert msg["event"] == "MODEL_FAILED" and "slow1" in msg["body"]
    assert aws["jobs"]() == []  # no training job was started
