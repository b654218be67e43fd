"""Faults in the training workflow: the real ASL in moto, the real handlers, the local
training stand-in (tests/workflow_harness.py, shared with tests/test_workflow.py).

tests/test_workflow.py already covers a Failed training job, transient Lambda errors
(retried) and redelivered/duplicate S3 events. Here: a job stopped at its stopping
condition, SNS throttling on the final notice, and two batches of one user at once. Each
scenario ends with the user told (the SNS message) and nothing half-written: no model
files without a READY row, no READY row without both model files."""

import json

import boto3
import botocore.awsrequest
import pytest
from workflow_harness import (
    USER,
    call,
    deliver,
    executions,
    failure_of,
    history,
    keys_under,
    messages,
    run_batch,
    s3_event,
    upload,
    wait_done,
    wait_generation,
)

from avatarflow import keys
from avatarflow.sample_photos import one_person_batch
from avatarflow.workflow import execution_name
from avatarflow_local import training_job
from avatarflow_local.runtime import LocalRuntime, Settings
from avatarflow_local.workflow_stack import render_definition

pytestmark = pytest.mark.e2e


def assert_nothing_half_written(aws):
    """Every READY row has both model files; every models/ folder belongs to a READY row."""
    rows = aws["table"].scan()["Items"]
    ready = {r["version"] for r in rows if r["status"] == "READY"}
    folders = {k.split("/")[2] for k in keys_under(aws, keys.MODELS)}
    assert folders <= ready, f"model files without a READY row: {sorted(folders - ready)}"
    for version in ready:
        assert keys_under(aws, keys.model_prefix(USER, version)) == [
            f"{keys.model_prefix(USER, version)}{keys.ADAPTER_CONFIG}",
            f"{keys.model_prefix(USER, version)}{keys.ADAPTER_WEIGHTS}",
        ]
    return {r["version"]: r for r in rows}


def test_training_job_stopped_at_max_runtime(aws, monkeypatch):
    """MaxRuntimeInSeconds reached: the stand-in kills the entrypoint (exit code None), as
    SageMaker stops the job; the run fails cleanly and the user hears why."""
    monkeypatch.setattr(training_job, "_run_entrypoint", lambda name, env, timeout: (None, ""))
    arn, desc = run_batch(aws, "s1", one_person_batch(8))
    assert desc["status"] == "FAILED" and desc["error"] == "AvatarModelFailed", failure_of(aws, arn)
    (job,) = aws["jobs"]()
    assert job["status"] == "Failed"
    rows = assert_nothing_half_written(aws)
    assert rows["s1"]["status"] == "FAILED" and "stopping condition" in rows["s1"]["failure_cause"]
    assert keys_under(aws, keys.MODELS) == []
    (msg,) = messages(aws)
    assert msg["event"] == "MODEL_FAILED" and msg["user_id"] == USER and "s1" in msg["body"]


class SnsThrottle:
    """Answers the next `times` SNS Publish calls with a Throttled error (what the ASL sees as
    SNS.ThrottledException), on the session moto's ASL interpreter makes its clients from."""

    def __init__(self, session, times: int):
        self.left, self.seen, self.session = times, 0, session
        session.events.register("before-call.sns.Publish", self)

    def __call__(self, **_kwargs):
        self.seen += 1
        if self.left <= 0:
            return None
        self.left -= 1
        error = {"Error": {"Code": "Throttled", "Message": "Rate exceeded", "Type": "Sender"},
                 "ResponseMetadata": {"HTTPStatusCode": 400, "RequestId": "throttle"}}
        return botocore.awsrequest.AWSResponse("https://sns", 400, {}, None), error

    def remove(self):
        self.session.events.unregister("before-call.sns.Publish", self)


def test_sns_throttling_on_the_ready_notice_is_retried(aws):
    throttle = SnsThrottle(boto3.DEFAULT_SESSION, times=2)
    try:
        arn, desc = run_batch(aws, "s2", one_person_batch(8))
    finally:
        throttle.remove()
    assert desc["status"] == "SUCCEEDED", failure_of(aws, arn)
    failed = [e["taskFailedEventDetails"]["error"] for e in history(aws, arn) if e["type"] == "TaskFailed"]
    assert failed == ["SNS.ThrottledException"] * 2, failed
    assert throttle.seen == 3
    rows = assert_nothing_half_written(aws)
    assert rows["s2"]["status"] == "READY"
    assert [m["event"] for m in messages(aws)] == ["MODEL_READY"]  # told once, not three times


def test_two_batches_of_one_user_at_once(aws):
    """Two batches uploaded together, their events in one SQS delivery: two executions, two
    jobs, two versions, two notices; neither run touches the other's files."""
    first, second = one_person_batch(8), one_person_batch(9)
    upload(aws, "s3a", first)
    upload(aws, "s3b", second)
    deliver(aws,
            s3_event(aws, "s3a", [n for n, _ in first]), s3_event(aws, "s3b", [n for n, _ in second]))
    runs = {e["name"]: e["executionArn"] for e in executions(aws)}
    assert set(runs) == {execution_name(USER, "s3a"), execution_name(USER, "s3b")}
    for batch in ("s3a", "s3b"):
        arn = runs[execution_name(USER, batch)]
        assert wait_done(aws, arn)["status"] == "SUCCEEDED", failure_of(aws, arn)
    assert len(aws["jobs"]()) == 2 and {j["status"] for j in aws["jobs"]()} == {"Completed"}
    rows = assert_nothing_half_written(aws)
    assert {v: r["status"] for v, r in rows.items()} == {"s3a": "READY", "s3b": "READY"}
    assert rows["s3a"]["training_job"] != rows["s3b"]["training_job"]
    for batch, photos in (("s3a", first), ("s3b", second)):
        manifest = json.loads(aws["s3"].get_object(Bucket=aws["stack"].bucket,
                                                   Key=keys.manifest_key(USER, batch))["Body"].read())
        assert len(json.dumps(manifest)) > 0
        listed = {k.rsplit("/", 1)[-1] for k in keys_under(aws, keys.upload_prefix(USER, batch))}
        assert listed == {n for n, _ in photos}
    got = messages(aws) + messages(aws)
    assert sorted(m["event"] for m in got) == ["MODEL_READY", "MODEL_READY"]
    assert all(m["user_id"] == USER for m in got)


def test_spot_reclaim_resumes_from_the_checkpoint_in_one_job(aws, monkeypatch):
    """Managed spot on (the template's UseSpotTraining=true with its Spot stopping condition),
    a checkpoint every step; the instance is reclaimed (SIGKILL) right after step 2's
    checkpoint of 4; the stand-in starts the job again with the same checkpoints, as
    SageMaker restores CheckpointConfig.S3Uri: one job, MODEL_READY, and the adapter says it
    resumed from step 2 and trained all 4 steps."""
    subs = {**aws["stack"].substitutions, "UseSpotTraining": "true", "TrainingSteps": "4",
            "CheckpointSteps": "1",
            "MaxRuntimeSeconds": "600", "MaxWaitSeconds": "1200"}
    aws["sfn"].update_state_machine(stateMachineArn=aws["stack"].state_machine_arn,
                                    definition=render_definition(subs))
    monkeypatch.setenv(training_job.SPOT_RECLAIM_ENV, "2")
    arn, desc = run_batch(aws, "s4", one_person_batch(8))
    assert desc["status"] == "SUCCEEDED", failure_of(aws, arn)
    (job,) = aws["jobs"]()  # one job, not two
    assert job["status"] == "Completed" and job["spot_interruptions"] == 1
    assert job["managed_spot"] is True  # the request as the ASL rendered it
    assert job["hyperparameters"]["checkpointing_steps"] == "1"
    rows = assert_nothing_half_written(aws)
    assert rows["s4"]["status"] == "READY"
    key = keys.model_prefix(USER, "s4") + keys.ADAPTER_CONFIG
    adapter = json.loads(aws["s3"].get_object(Bucket=aws["stack"].bucket, Key=key)["Body"].read())
    assert adapter["resumed_from_step"] == 2 and adapter["steps"] == 4
    assert [m["event"] for m in messages(aws)] == ["MODEL_READY"]


def test_async_inference_error_notice_marks_the_generation_failed(tmp_path):
    """The registry says READY but the adapter object is gone (deleted after registration):
    the local async endpoint runs the inference container, which answers 404
    model_not_found; the error notice goes to the error topic, on_generation_done marks the
    generation FAILED, and GET shows why. No image is written under generations/."""
    with LocalRuntime(Settings(out_dir=tmp_path / "out")) as rt:
        version = "gone1"
        prefix = keys.model_prefix(USER, version)
        now = "2025-01-01T00:00:00+00:00"
        # The row register_model writes; the adapter files it names are not in S3.
        rt.client("dynamodb").put_item(TableName=rt.resources.models_table, Item={
            "user_id": {"S": USER}, "version": {"S": version}, "status": {"S": "READY"},
            "batch_id": {"S": version}, "model_prefix": {"S": prefix},
            "adapter_key": {"S": prefix + keys.ADAPTER_WEIGHTS},
            "adapter_config_key": {"S": prefix + keys.ADAPTER_CONFIG},
            "created_at": {"S": now}, "updated_at": {"S": now}})
        token = rt.token(USER)
        status, queued = call("POST", f"{rt.api_url}/users/{USER}/generations", token,
                              {"prompt": "a portrait of sks person", "num_images": 1, "steps": 1,
                               "width": 64, "height": 64})
        assert status == 202, queued
        done = wait_generation(rt.api_url, USER, token, queued["generation_id"], timeout=60)
        assert done["status"] == "FAILED", done
        assert "model_not_found" in done["error"] and "(404)" in done["error"], done
        assert "images" not in done
        assert [status for _, status in rt.endpoint.done] == [404]
        s3 = rt.client("s3")
        images = keys.generation_prefix(USER, queued["generation_id"])
        assert s3.list_objects_v2(Bucket=rt.bucket, Prefix=images).get("KeyCount", 0) == 0
        failures = s3.list_objects_v2(Bucket=rt.bucket, Prefix=keys.ASYNC_FAILURES).get("Contents", [])
        assert len(failures) == 1  # the endpoint's failure body, where FailureLocation says
