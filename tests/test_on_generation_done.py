"""functions/on_generation_done: SageMaker async notices (via SNS) -> generation rows; the
handler runs as Lambda runs it, against the template's resources, as its own role."""

import json
from pathlib import Path

import boto3
import pytest
import unit_stack
from apitools import sns_event

from avatarflow import generations as gen
from avatarflow import keys, usage

REPO = Path(__file__).resolve().parents[1]
module_stack, stack = unit_stack.module_stack, unit_stack.stack  # one stack per module, emptied per test
GID = "gen0001"
PREFIX = keys.generation_prefix("alice", GID)
ROLE = "avatarflow-local-OnGenerationDoneFunctionRole"  # the role SAM generates, in the local stack


class Done:
    """on_generation_done on the stack, and the rows and objects it reads."""

    def __init__(self, stack):
        self.stack = stack
        self.bucket = stack.resources.bucket
        self.table = boto3.resource("dynamodb").Table(stack.resources.generations_table)

    def __call__(self, message, topic_arn=None):
        topic_arn = topic_arn or self.stack.resources.inference_success_topic
        return self.stack.call("on_generation_done", sns_event(message, topic_arn))["outcomes"]

    def row(self, generation_id=GID):
        return self.table.get_item(Key={"generation_id": generation_id})["Item"]

    def pending_row(self, generation_id=GID, user_id="alice"):
        self.table.put_item(
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

    def put_json(self, key, value):
        boto3.client("s3").put_object(Bucket=self.bucket, Key=key, Body=json.dumps(value).encode())

    def success(self, generation_id=GID, output="async-output/x1.out"):
        return success(generation_id, output, self.bucket)

    def failure(self, generation_id=GID):
        return failure(generation_id, bucket=self.bucket)


@pytest.fixture
def done(stack):
    return Done(stack)


RESULT = {
    "generation_id": GID,
    "images": [
        {"key": f"{PREFIX}000.png", "withheld": False, "seed": 11, "identity_similarity": 0.72},
        {"key": f"{PREFIX}001.png", "withheld": False, "seed": 12, "identity_similarity": None},
    ],
    "timings": {"adapter_load_ms": 400, "generate_ms": 6100, "total_ms": 6650},  # the container's shape
}


def success(generation_id=GID, output="async-output/x1.out", bucket="data-bucket"):
    return gen.async_notice(
        generation_id,
        endpoint_name="ep",
        input_location=f"s3://{bucket}/requests/{generation_id}.json",
        output_location=f"s3://{bucket}/{output}",
    )


def failure(generation_id=GID, reason="ClientError: Received server error (500) from primary.",
            bucket="data-bucket"):
    return gen.async_notice(
        generation_id,
        endpoint_name="ep",
        input_location=f"s3://{bucket}/requests/{generation_id}.json",
        failure_location=f"s3://{bucket}/async-failures/x1-error.out",
        failure_reason=reason,
    )


WITHHELD = {
    "moderation_labels": [{"name": "Explicit", "parent": None, "confidence": 97.2, "level": 1}],
    "withheld": True, "seed": 13, "identity_similarity": None,
}


def test_withheld_images_are_counted_never_stored_for_delivery(done):
    """result.json's contract (output moderation): an image with withheld true has no key and is
    not among the row's images; one without withheld false is not delivered either."""
    done.pending_row()
    unmarked = {"key": f"{PREFIX}003.png", "seed": 14, "identity_similarity": None}
    result = {**RESULT, "images": [RESULT["images"][0], WITHHELD, unmarked],
              "output_moderation": "rekognition", "withheld": 1}
    done.put_json("async-output/x1.out", result)
    assert done(done.success()) == ["COMPLETED"]
    row = done.row()
    assert [i["key"] for i in gen.from_dynamo(row["images"])] == [f"{PREFIX}000.png"]
    assert row["withheld"] == 1 and row["output_moderation"] == "rekognition"


def test_every_image_withheld_still_completes(done):
    """All withheld is a finished generation with nothing to deliver (and says so), not a failure."""
    done.pending_row()
    result = {**RESULT, "images": [WITHHELD], "output_moderation": "rekognition", "withheld": 1}
    done.put_json("async-output/x1.out", result)
    assert done(done.success()) == ["COMPLETED"]
    row = done.row()
    assert row["images"] == [] and row["withheld"] == 1


def test_success_notice_completes_with_images_from_the_output(done):
    done.pending_row()
    done.put_json("async-output/x1.out", RESULT)
    assert done(done.success()) == ["COMPLETED"]
    row = done.row()
    assert row["status"] == "COMPLETED"
    delivered = [{k: v for k, v in i.items() if k != "withheld"} for i in RESULT["images"]]
    assert gen.from_dynamo(row["images"]) == delivered
    assert gen.from_dynamo(row["timings"]) == RESULT["timings"]
    # A result without output_moderation (an older container) never reads as checked.
    assert row["withheld"] == 0 and row["output_moderation"] == "not_moderated"
    assert row["output_location"] == f"s3://{done.bucket}/async-output/x1.out"
    # Every call was checked against the function's role from template.yaml.
    allowed = done.stack.enforcer.allowed
    # UpdateItem: the row, then the usage month and total rows (one transaction).
    assert allowed[(ROLE, "s3:GetObject")] == 1 and allowed[(ROLE, "dynamodb:UpdateItem")] == 3
    # Metered from the container's own timings: seconds, images, once however often SNS delivers.
    done(done.success())
    table = boto3.resource("dynamodb").Table(done.stack.resources.physical["UsageTable"]["Ref"])
    total = usage.view(table.get_item(Key={"user_id": row["user_id"], "period": "total"})["Item"])
    assert total["inference_seconds"] == RESULT["timings"]["total_ms"] / 1000
    assert (total["images"], total["generations"]) == (len(RESULT["images"]), 1)


def test_falls_back_to_result_json_when_output_is_missing(done):
    done.pending_row()
    done.put_json(keys.result_key("alice", GID), RESULT)
    assert done(done.success(output="async-output/missing.out")) == ["COMPLETED"]
    assert len(done.row()["images"]) == 2
    # The role may not list the bucket, so S3 answered the missing output with 403, not 404.
    assert [key for _, key in done.stack.enforcer.masked] == ["async-output/missing.out"]


def test_completed_without_images_is_failed_not_pending_forever(done):
    done.pending_row()
    done.put_json("async-output/x1.out", {"images": []})
    assert done(done.success()) == ["FAILED"]
    assert done.row()["error"] == "the endpoint returned no images"


def test_failure_notice_marks_failed_with_reason(done):
    done.pending_row()
    assert done(done.failure(), done.stack.resources.inference_error_topic) == ["FAILED"]
    row = done.row()
    assert row["status"] == "FAILED"
    assert row["error"] == "ClientError: Received server error (500) from primary."
    assert row["failure_location"] == f"s3://{done.bucket}/async-failures/x1-error.out"


def test_duplicate_and_late_notices_change_nothing(done):
    done.pending_row()
    done.put_json("async-output/x1.out", RESULT)
    assert done(done.success()) == ["COMPLETED"]
    before = done.row()
    assert done(done.success()) == ["duplicate"]
    assert done(done.failure()) == ["duplicate"]
    assert done.row() == before


def test_unknown_ids_and_garbage_are_tolerated(done):
    assert done(done.success("neverissued")) == ["unknown"]
    assert done({"hello": "world"}) == ["ignored"]
    assert done("not json at all") == ["ignored"]
    assert done(done.success("../../etc")) == ["ignored"]
    assert done.table.scan()["Items"] == []


def test_images_outside_the_generation_folder_are_dropped(done):
    done.pending_row()
    done.put_json(
        "async-output/x1.out",
        {"images": [RESULT["images"][0],
                    {"key": "generations/bob/g9/000.png", "seed": 1, "withheld": False}]},
    )
    assert done(done.success()) == ["COMPLETED"]
    images = gen.from_dynamo(done.row()["images"])
    assert [i["key"] for i in images] == [RESULT["images"][0]["key"]]


def test_sample_events_parse():
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


def test_a_packs_round_is_resumed_once_by_its_last_generation(done, stack):
    """Generations of an avatar pack leave the pack's waiting set; the notice that empties it
    sends the round's task token once (a duplicate notice, even of the last one, sends nothing
    more)."""
    packs_table = boto3.resource("dynamodb").Table(stack.resources.physical["PacksTable"]["Ref"])
    packs_table.put_item(Item={"user_id": "alice", "pack_id": "p1", "task_token": "tok-1",
                               "waiting": {"gen0001", "gen0002"}})
    for generation_id in ("gen0001", "gen0002"):
        done.pending_row(generation_id)
        done.table.update_item(Key={"generation_id": generation_id}, UpdateExpression="SET pack_id = :p",
                               ExpressionAttributeValues={":p": "p1"})
    sent = []
    sfn = stack.module("on_generation_done").aws().sfn
    original = sfn.send_task_success
    sfn.send_task_success = lambda **kw: sent.append(kw) or original(**kw)
    try:
        assert done(done.failure("gen0001")) == ["FAILED"]
        row = packs_table.get_item(Key={"user_id": "alice", "pack_id": "p1"})["Item"]
        assert sent == [] and row["waiting"] == {"gen0002"}
        assert done(done.failure("gen0002")) == ["FAILED"]
        assert done(done.failure("gen0002")) == ["duplicate"]
    finally:
        sfn.send_task_success = original
    assert [kw["taskToken"] for kw in sent] == ["tok-1"]
    assert "waiting" not in packs_table.get_item(Key={"user_id": "alice", "pack_id": "p1"})["Item"]
