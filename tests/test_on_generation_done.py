"""functions/on_generation_done: SageMaker async notices (via SNS) -> generation rows."""

import json
from pathlib import Path

import boto3
import pytest
from apitools import BUCKET, ENV, GENERATIONS_TABLE, create_resources, empty_resources, sns_event
from moto import mock_aws

from avatarflow import generations as gen
from avatarflow import keys
from avatarflow_local.functions import load_function_module

REPO = Path(__file__).resolve().parents[1]
GID = "gen0001"
PREFIX = keys.generation_prefix("alice", GID)


@pytest.fixture(scope="module")
def aws_env():
    with pytest.MonkeyPatch.context() as mp:
        for name, value in ENV.items():
            mp.setenv(name, value)
        with mock_aws():
            create_resources()
            load_function_module("on_generation_done").aws.cache_clear()
            yield


@pytest.fixture
def done(aws_env, lambda_context):
    module = load_function_module("on_generation_done")

    def call(message):
        return module.handler(sns_event(message), lambda_context)["outcomes"]

    yield call
    empty_resources()


def table():
    return boto3.resource("dynamodb").Table(GENERATIONS_TABLE)


def pending_row(generation_id=GID, user_id="alice"):
    table().put_item(
        Item={
            "generation_id": generation_id,
            "user_id": user_id,
            "model_version": "v1",
            "status": "PENDING",
            "request_key": f"requests/{generation_id}.json",
            "created_at": "2025-01-01T00:00:00.000000Z",
            "updated_at": "2025-01-01T00:00:00.000000Z",
        }
    )


def put_json(key, value):
    boto3.client("s3").put_object(Bucket=BUCKET, Key=key, Body=json.dumps(value).encode())


RESULT = {
    "generation_id": GID,
    "images": [
        {"key": f"{PREFIX}000.png", "seed": 11, "identity_similarity": 0.72},
        {"key": f"{PREFIX}001.png", "seed": 12, "identity_similarity": None},
    ],
    "timings": {"load_adapter_s": 0.4, "generate_s": 6.1},
}


def success(generation_id=GID, output="async-output/x1.out"):
    return gen.async_notice(
        generation_id,
        endpoint_name="ep",
        input_location=f"s3://{BUCKET}/requests/{generation_id}.json",
        output_location=f"s3://{BUCKET}/{output}",
    )


def failure(generation_id=GID, reason="ClientError: Received server error (500) from primary."):
    return gen.async_notice(
        generation_id,
        endpoint_name="ep",
        input_location=f"s3://{BUCKET}/requests/{generation_id}.json",
        failure_location=f"s3://{BUCKET}/async-failures/x1-error.out",
        failure_reason=reason,
    )


def test_success_notice_completes_with_images_from_the_output(done):
    pending_row()
    put_json("async-output/x1.out", RESULT)
    assert done(success()) == ["COMPLETED"]
    row = table().get_item(Key={"generation_id": GID})["Item"]
    assert row["status"] == "COMPLETED"
    assert gen.from_dynamo(row["images"]) == RESULT["images"]
    assert gen.from_dynamo(row["timings"]) == RESULT["timings"]
    assert row["output_location"] == f"s3://{BUCKET}/async-output/x1.out"


def test_falls_back_to_result_json_when_output_is_missing(done):
    pending_row()
    put_json(keys.result_key("alice", GID), RESULT)
    assert done(success(output="async-output/missing.out")) == ["COMPLETED"]
    assert len(table().get_item(Key={"generation_id": GID})["Item"]["images"]) == 2


def test_completed_without_images_is_failed_not_pending_forever(done):
    pending_row()
    put_json("async-output/x1.out", {"images": []})
    assert done(success()) == ["FAILED"]
    assert table().get_item(Key={"generation_id": GID})["Item"]["error"] == "the endpoint returned no images"


def test_failure_notice_marks_failed_with_reason(done):
    pending_row()
    assert done(failure()) == ["FAILED"]
    row = table().get_item(Key={"generation_id": GID})["Item"]
    assert row["status"] == "FAILED"
    assert row["error"] == "ClientError: Received server error (500) from primary."
    assert row["failure_location"] == f"s3://{BUCKET}/async-failures/x1-error.out"


def test_duplicate_and_late_notices_change_nothing(done):
    pending_row()
    put_json("async-output/x1.out", RESULT)
    assert done(success()) == ["COMPLETED"]
    before = table().get_item(Key={"generation_id": GID})["Item"]
    assert done(success()) == ["duplicate"]
    assert done(failure()) == ["duplicate"]
    assert table().get_item(Key={"generation_id": GID})["Item"] == before


def test_unknown_ids_and_garbage_are_tolerated(done):
    assert done(success("neverissued")) == ["unknown"]
    assert done({"hello": "world"}) == ["ignored"]
    assert done("not json at all") == ["ignored"]
    assert done(success("../../etc")) == ["ignored"]
    assert table().scan()["Items"] == []


def test_images_outside_the_generation_folder_are_dropped(done):
    pending_row()
    put_json(
        "async-output/x1.out",
        {"images": [RESULT["images"][0], {"key": "generations/bob/g9/000.png", "seed": 1}]},
    )
    assert done(success()) == ["COMPLETED"]
    images = gen.from_dynamo(table().get_item(Key={"generation_id": GID})["Item"]["images"])
    assert [i["key"] for i in images] == [RESULT["images"][0]["key"]]


def test_sample_events_parse(done):
    for path in sorted((REPO / "events").glob("on_generation_done*.json")):
        event = json.loads(path.read_text())
        message = json.loads(event["Records"][0]["Sns"]["Message"])
        notice = gen.parse_async_notice(message)
        assert notice.inference_id
        assert notice.completed == ("failure" not in path.name)


def test_parse_notice_matches_the_sagemaker_shape():
    notice = gen.parse_async_notice(failure())
    assert (notice.completed, notice.output_location) == (False, None)
    assert notice.failure_location.endswith("x1-error.out")
    notice = gen.parse_async_notice(success())
    assert (notice.completed, notice.failure_reason) == (True, None)
    with pytest.raises(ValueError):
        gen.parse_async_notice({"inferenceId": "x", "invocationStatus": "Maybe"})
