"""Avatar packs through the real state machine (statemachines/train_avatar.asl.json in moto's
interpreter), the real pack, api and on_generation_done handlers run as Lambda runs them (IAM
enforced), the task-token round trip and SNS deliveries as deployed.

Where the images are not the point, the endpoint is a fast stand-in: the local async endpoint
(src/avatarflow_local/async_inference.py: InvokeEndpointAsync, output object, SageMaker's
success/error notice on the two topics -> on_generation_done) whose container app answers in
milliseconds with flat-colour PNGs and scores each image with a stand-in embedder (the mean
colour as a vector; the real SFace finds no face in such pixels) against the user's reference
embedding, as the container reports identity_similarity. So a 10-style pack runs in seconds,
and the transition count (what Step Functions bills) is the real one: the state machine is the
deployed definition; only the endpoint's work is shortened.

The full workflow (upload -> MODEL_READY -> PACK_READY on the tiny model's real images) is
tests/test_local_stack.py."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import boto3
import cv2
import numpy as np
import pytest
from apitools import body_of, http_event, put_model
from moto import mock_aws

from avatarflow import erasure, keys, packs, styles
from avatarflow.faces import cosine_similarity
from avatarflow_local import iam
from avatarflow_local.async_inference import AsyncEndpoint
from avatarflow_local.event_sources import SnsToLambda
from avatarflow_local.functions import load_fresh_handler
from avatarflow_local.lambda_hook import LambdaHook
from avatarflow_local.workflow_stack import create_local_stack

pytestmark = pytest.mark.e2e

REFERENCE = [0.2, 0.5, 1.0]  # the stand-in embedding space: (B, G, R) mean colour
BLUE_SEED = styles.defaults()[2].seeds[0]  # oil-painting's first seed: drawn blue, far from REFERENCE
FAIL_STYLE = "watercolor"
WITHHELD_STYLE = "comic book"  # its first image of a round is withheld by output moderation


def stand_in_embed(image: np.ndarray) -> list[float]:
    return [float(v) for v in image.reshape(-1, 3).mean(axis=0)]


def png(seed: int) -> tuple[bytes, np.ndarray]:
    if BLUE_SEED <= seed < BLUE_SEED + packs.MAX_IMAGES_PER_STYLE:  # a whole round of oil-painting
        color = (255, 10, 0)
    else:
        color = tuple(int(v) for v in np.random.default_rng(seed).integers(20, 256, 3))
    image = np.full((16, 16, 3), color, np.uint8)
    return cv2.imencode(".png", image)[1].tobytes(), image


class _Answer:
    def __init__(self, status: int, body: dict):
        self.status_code, self._body = status, body

    def get_json(self, silent=True):
        return self._body


class StandInContainer:
    """POST /invocations of the inference container, in milliseconds (see the module docstring)."""

    def __init__(self, bucket: str):
        self.bucket = bucket
        self.s3 = boto3.client("s3")
        self.requests: list[dict] = []
        self.on_request = None

    def post(self, _path, data, content_type):
        doc = json.loads(data)
        self.requests.append(doc)
        if self.on_request:
            self.on_request(doc)
        if FAIL_STYLE in doc["prompt"]:
            return _Answer(500, {"error": "internal_error", "message": "CUDA out of memory"})
        images = []
        for i in range(doc["num_images"]):
            seed = doc["seed"] + i
            data_png, pixels = png(seed)
            if WITHHELD_STYLE in doc["prompt"] and i == 0:  # output moderation: never written, no key
                images.append(
                    {
                        "seed": seed,
                        "identity_similarity": None,
                        "nsfw": False,
                        "withheld": True,
                        "moderation_labels": ["Explicit"],
                    }
                )
                continue
            key = f"{keys.generation_prefix(doc['user_id'], doc['generation_id'])}{i:03d}.png"
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data_png, ContentType="image/png")
            score = round(float(cosine_similarity(stand_in_embed(pixels), REFERENCE)), 6)
            images.append(
                {
                    "key": key,
                    "seed": seed,
                    "identity_similarity": score,
                    "nsfw": False,
                    "withheld": False,
                    "moderation_labels": [],
                }
            )
        return _Answer(
            200,
            {
                "status": "COMPLETED",
                "generation_id": doc["generation_id"],
                "images": images,
                "output_moderation": "not_moderated",
                "withheld": 0,
            },
        )


@pytest.fixture
def world():
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        # The template's pack sizes are for the cloud (10 styles x 4 images); these are the test's.
        r = create_local_stack(ImagesPerStyle="3", KeepPerStyle="2")
        # Fresh handler modules per test: their cached clients carry this test's endpoint hook.
        hook = LambdaHook(r.function_specs, loader=load_fresh_handler).install()
        container = StandInContainer(r.bucket)
        endpoint = AsyncEndpoint(
            r.endpoint_name,
            r.bucket,
            r.inference_success_topic,
            r.inference_error_topic,
            base_model=".",
            cache_dir=".",
            role_arn=r.inference_role_arn,
        ).install()
        endpoint.app = container
        endpoint._ready.set()
        sqs = boto3.client("sqs")
        inbox = sqs.create_queue(QueueName="inbox")["QueueUrl"]
        inbox_arn = sqs.get_queue_attributes(QueueUrl=inbox, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        boto3.client("sns").subscribe(
            TopicArn=r.topic_arn,
            Protocol="sqs",
            Endpoint=inbox_arn,
            Attributes={"RawMessageDelivery": "true"},
        )
        pollers = [
            SnsToLambda(s, hook.invoke, f"t-{s.source_arn.rsplit(':', 1)[1]}", retry_after_s=1)
            for s in r.event_sources
            if s.kind == "SNS"
        ]
        with iam.enforcing(r.enforcer):
            endpoint.start()
            for p in pollers:
                p.start()
            try:
                yield SimpleNamespace(
                    r=r,
                    hook=hook,
                    container=container,
                    sqs=sqs,
                    inbox=inbox,
                    s3=boto3.client("s3"),
                    sfn=boto3.client("stepfunctions"),
                    packs=boto3.resource("dynamodb").Table(r.physical["PacksTable"]["Ref"]),
                    generations=boto3.resource("dynamodb").Table(r.generations_table),
                )
            finally:
                for p in pollers:
                    p.stop()
                endpoint.stop()
                hook.uninstall()


def ready_model(w, user: str) -> None:
    put_model(w.r, user, "v1", "READY")
    w.s3.put_object(
        Bucket=w.r.bucket,
        Key=f"models/{user}/v1/adapter.json",
        Body=json.dumps({"token": "zwx", "subject_class": "woman", "reference_embedding": REFERENCE}),
    )


def start_pack(w, user: str, body=None) -> dict:
    response = w.hook.call("api", http_event("POST", f"/users/{user}/packs", sub=user, body=body))
    assert response["statusCode"] == 202, response
    return body_of(response)


def finish(w, user: str, pack_id: str, timeout: float = 60) -> dict:
    from avatarflow.workflow import execution_name

    arn = f"{w.r.state_machine_arn.replace(':stateMachine:', ':execution:')}:{execution_name(user, pack_id)}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        desc = w.sfn.describe_execution(executionArn=arn)
        if desc["status"] != "RUNNING":
            events = w.sfn.get_execution_history(executionArn=arn, maxResults=1000)["events"]
            assert not [e for e in events if "States.Runtime" in json.dumps(e, default=str)]
            return {"desc": desc, "events": events}
        time.sleep(0.2)
    raise AssertionError("pack execution still running")


def mails(w) -> list[dict]:
    got = w.sqs.receive_message(
        QueueUrl=w.inbox, MaxNumberOfMessages=10, MessageAttributeNames=["All"], WaitTimeSeconds=1
    ).get("Messages", [])
    return [{"event": m["MessageAttributes"]["event"]["StringValue"], "body": m["Body"]} for m in got]


def entered(events: list[dict]) -> list[str]:
    """The states entered, in order: each is one billed state transition on AWS."""
    return [e["stateEnteredEventDetails"]["name"] for e in events if e["type"].endswith("StateEntered")]


def test_ten_style_pack_ranks_by_likeness_regenerates_and_delivers_with_a_failed_style(world):
    w = world
    ready_model(w, "alice")
    queued = start_pack(w, "alice")
    assert queued["styles_total"] == 10 and queued["status_url"].endswith(
        f"/users/alice/packs/{queued['pack_id']}"
    )
    run = finish(w, "alice", queued["pack_id"])
    assert run["desc"]["status"] == "SUCCEEDED"
    states = entered(run["events"])
    # 10 styles cost no more transitions than 1: the wait is one task-token state per round.
    # Round 1 (10 styles) + round 2 (oil-painting, below the likeness threshold):
    assert states == [
        "Route",
        "PlanPack",
        "PackWanted",
        "GenerateRound",
        "ReviewPack",
        "PackAgain",
        "GenerateRound",
        "ReviewPack",
        "PackAgain",
        "NotifyPack",
        "Done",
    ]
    assert len(states) <= 60
    print(f"\nstate transitions for a 10-style pack (one regeneration round): {len(states)}")

    # The prompts carry the model's token and class; every style of the catalogue was asked for once,
    # the one below the threshold twice (its next seed).
    first_round = [r for r in w.container.requests if r["seed"] in {s.seeds[0] for s in styles.defaults()}]
    assert len(first_round) == 10 and all("zwx woman" in r["prompt"] for r in w.container.requests)
    assert [r["seed"] for r in w.container.requests if r not in first_round] == [
        styles.defaults()[2].seeds[1]
    ]

    row = w.packs.get_item(Key={"user_id": "alice", "pack_id": queued["pack_id"]})["Item"]
    assert row["status"] == packs.PARTIAL and "task_token" not in row and "waiting" not in row
    result = {s["name"]: s for s in row["result"]}
    assert result[FAIL_STYLE]["status"] == "FAILED" and "500" in result[FAIL_STYLE]["error"]
    ok = [s for s in result.values() if s["status"] == "COMPLETED"]
    assert len(ok) == 9 and all(len(s["images"]) == 2 for s in ok)

    # Identity ranking, recomputed from the stored PNGs with the stand-in embedder: each style
    # keeps its two images most like the reference, across both rounds.
    for name, outcome in result.items():
        gens = [
            g for g in w.generations.scan()["Items"] if g.get("style") == name and g["status"] == "COMPLETED"
        ]
        scored = []
        for g in gens:
            for image in g["images"]:
                raw = w.s3.get_object(Bucket=w.r.bucket, Key=image["key"])["Body"].read()
                pixels = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
                scored.append((cosine_similarity(stand_in_embed(pixels), REFERENCE), image["key"]))
        best = [key for _, key in sorted(scored, reverse=True)[:2]]
        assert [i["key"] for i in outcome["images"]] == best, name
    comic = result["comic-book"]  # 3 generated, the withheld one never kept: the other 2
    assert [i["seed"] for i in comic["images"]] != [] and styles.defaults()[5].seeds[0] not in [
        i["seed"] for i in comic["images"]
    ]
    assert len(comic["images"]) == 2 and all("key" in i for i in comic["images"])
    oil = result["oil-painting"]
    assert all(
        float(i["identity_similarity"]) >= 0.36 for i in oil["images"]
    )  # round 2 replaced the blue ones

    # The email: the styles that arrived with their links, the failed one by name, the contact sheet.
    (mail,) = [m for m in mails(w) if m["event"] == "PACK_READY"]
    assert "9 of 10 styles" in mail["body"] and "Watercolor (watercolor)" in mail["body"]
    assert mail["body"].count("X-Amz-Expires=3600") == 9 * 2 + 1
    sheet = w.s3.get_object(Bucket=w.r.bucket, Key=keys.contact_sheet_key("alice", queued["pack_id"]))[
        "Body"
    ].read()
    image = cv2.imdecode(np.frombuffer(sheet, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape[0] > 10 * 160 and image.shape[1] > 2 * 160
    manifest = json.loads(
        w.s3.get_object(Bucket=w.r.bucket, Key=keys.pack_manifest_key("alice", queued["pack_id"]))[
            "Body"
        ].read()
    )
    assert manifest["status"] == "PARTIAL" and manifest["rounds"] == 2 and len(manifest["styles"]) == 10

    # The API's view: n of m, presigned images with scores, the contact sheet; and the list.
    view = body_of(
        w.hook.call("api", http_event("GET", f"/users/alice/packs/{queued['pack_id']}", sub="alice"))
    )
    assert view["status"] == "PARTIAL" and view["styles_done"] == 10 and view["styles_total"] == 10
    assert "contact_sheet_url" in view
    studio = next(s for s in view["styles"] if s["name"] == "studio-portrait")
    assert len(studio["images"]) == 2 and studio["images"][0]["url"].startswith("https://")
    assert studio["images"][0]["identity_similarity"] >= studio["images"][1]["identity_similarity"]
    listed = body_of(w.hook.call("api", http_event("GET", "/users/alice/packs", sub="alice")))
    assert [p["pack_id"] for p in listed["packs"]] == [queued["pack_id"]]
    other = w.hook.call("api", http_event("GET", f"/users/alice/packs/{queued['pack_id']}", sub="mallory"))
    assert other["statusCode"] == 403


def test_a_pack_for_a_user_erased_meanwhile_is_dropped(world):
    w = world
    ready_model(w, "bob")
    erasures = boto3.resource("dynamodb").Table(w.r.function_specs["api"].environment["ERASURES_TABLE"])

    def erase_now(_doc):  # DELETE /users/bob while the endpoint works on the pack
        with iam.acting_as(None):
            erasure.request(erasures, "bob", erasure.Timing())

    w.container.on_request = erase_now
    queued = start_pack(w, "bob", {"styles": ["studio-portrait", "comic-book"]})
    run = finish(w, "bob", queued["pack_id"])
    assert run["desc"]["status"] == "SUCCEEDED"
    assert entered(run["events"])[-1] == "UserErased"
    assert "NotifyPack" not in entered(run["events"])
    assert not [m for m in mails(w) if m["event"] == "PACK_READY"]
    listed = w.s3.list_objects_v2(Bucket=w.r.bucket, Prefix="packs/bob/")
    assert listed.get("KeyCount", 0) == 0
    row = w.packs.get_item(Key={"user_id": "bob", "pack_id": queued["pack_id"]})["Item"]
    assert row["status"] == packs.RUNNING and "result" not in row
