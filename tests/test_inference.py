"""Inference container on the tiny random SD model (CPU): the SageMaker contract, per-user
adapters hot-swapped on one resident pipeline, validation, S3 outputs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import inference_engine
import numpy as np
import pytest
import torch
from adapter_cache import AdapterCache
from inference_engine import Engine, SafetyChecker, load_base_pipeline
from inference_server import create_app
from moto import mock_aws
from PIL import Image

from avatarflow import keys
from avatarflow.tiny_model import build_tiny_pipeline

# Most tests here run a diffusion model (tiny, random weights) or train one: the module is in
# the e2e tier, out of make test-fast's quick loop.
pytestmark = pytest.mark.e2e

BUCKET = "avatarflow-test"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
REPO = Path(__file__).resolve().parents[1]
SMALL = {"steps": 2, "guidance_scale": 5.0, "width": 64, "height": 64}


def make_adapter(
    base: Path, out: Path, *, seed: int, rank: int, alpha: float, text_encoder: bool = False
) -> Path:
    """A per-user DreamBooth-LoRA adapter as the training container saves it: peft LoRA on the
    UNet attention projections with distinct random (non-zero B) weights, written with the
    pipeline's save_lora_weights (+ alpha metadata)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
    unet.add_adapter(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    kwargs = {
        "unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        "unet_lora_adapter_metadata": config.to_dict(),
    }
    if text_encoder:
        te = CLIPTextModel.from_pretrained(base / "text_encoder")
        te_config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
        te.add_adapter(te_config)
        with torch.no_grad():
            for name, param in te.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        kwargs["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(te))
        kwargs["text_encoder_lora_adapter_metadata"] = te_config.to_dict()
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(out, **kwargs)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base model, adapters for users alice (r=4), bob (r=8) and carol (text encoder
    LoRA too) published in moto S3, and one engine with the real server app."""
    root = tmp_path_factory.mktemp("inference")
    base = build_tiny_pipeline(root / "base", "sd", seed=0)
    users = {
        "alice": dict(seed=1, rank=4, alpha=8.0),
        "bob": dict(seed=2, rank=8, alpha=8.0),
        "carol": dict(seed=3, rank=4, alpha=4.0, text_encoder=True),
    }
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        folders = {}
        for i, (user, spec) in enumerate(users.items()):
            folder = make_adapter(base, root / "adapters" / user, **spec)
            folders[user] = folder
            prefix = keys.model_prefix(user, "v1")
            s3.upload_file(str(folder / keys.ADAPTER_WEIGHTS), BUCKET, prefix + keys.ADAPTER_WEIGHTS)
            adapter_json = {
                "base_model": "tiny-sd",
                "rank": spec["rank"],
                "token": "sks" if i else "zwx",
                "subject_class": "person",
                "reference_embedding": [1.0, 0.0, 0.5],
            }
            s3.put_object(Bucket=BUCKET, Key=prefix + keys.ADAPTER_CONFIG, Body=json.dumps(adapter_json))
        pipe = load_base_pipeline(base, "cpu")
        cache = AdapterCache(s3, BUCKET, root / "cache", max_memory_count=2, max_disk_count=3)
        engine = Engine(pipe, cache, s3, BUCKET, max_rank=16)
        yield {
            "root": root,
            "base": base,
            "s3": s3,
            "engine": engine,
            "client": create_app(engine).test_client(),
            "folders": folders,
        }


def request(gen_id: str, user: str = "alice", **extra) -> dict:
    body = {
        "generation_id": gen_id,
        "user_id": user,
        "model_version": "v1",
        "prompt": "portrait of sks person",
        # Short: the tiny tokenizer spells most words byte by byte, so the default negative
        # prompt is past one CLIP window there (tests/test_prompts.py covers that path).
        "negative_prompt": "blurry, watermark",
        "num_images": 2,
        "seed": 7,
        **SMALL,
    }
    body.update(extra)
    return body


def read_png(s3, key: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())))


def images_of(s3, result: dict) -> np.ndarray:
    return np.stack([read_png(s3, img["key"]) for img in result["images"]])


def fresh_engine(world, name: str) -> Engine:
    pipe = load_base_pipeline(world["base"], "cpu")
    cache = AdapterCache(world["s3"], BUCKET, world["root"] / f"cache-{name}")
    return Engine(pipe, cache, world["s3"], BUCKET, max_rank=16)


def test_ping(world):
    resp = world["client"].get("/ping")
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "healthy", "busy": False}


def test_ping_never_waits_for_the_pipeline_and_reports_a_stuck_generation(world):
    """/ping while another thread holds the pipeline: answered at once, healthy and busy; once
    that generation has run longer than stuck_after_s, 503 so SageMaker replaces the instance."""
    engine = world["engine"]
    answers: list = []

    def ping(app) -> None:
        resp = app.test_client().get("/ping")
        answers.append((resp.status_code, resp.get_json()))

    with engine._lock:  # a generation in progress, as Engine.run holds it
        engine.busy_since = time.monotonic()
        try:
            for stuck_after, sleep in ((60.0, 0.0), (0.05, 0.1)):
                time.sleep(sleep)
                thread = threading.Thread(target=ping, args=(create_app(engine, stuck_after_s=stuck_after),))
                thread.start()
                thread.join(timeout=2)
                assert not thread.is_alive(), "/ping waited for the pipeline lock"
        finally:
            engine.busy_since = None
    assert answers[0] == (200, {"status": "healthy", "busy": True})
    assert answers[1][0] == 503
    assert answers[1][1]["status"] == "unhealthy"
    assert world["client"].get("/ping").get_json() == {"status": "healthy", "busy": False}


def test_alternating_users_match_each_adapter_alone(world):
    s3, engine, client = world["s3"], world["engine"], world["client"]
    pipe_id, unet_id, loads = id(engine.pipe), id(engine.pipe.unet), inference_engine.BASE_LOADS
    base_weight = engine.pipe.unet.conv_in.weight.detach().clone()

    results = []
    for i, user in enumerate(["alice", "bob", "alice", "bob"]):
        resp = client.post("/invocations", data=json.dumps(request(f"alt{i}", user)))
        assert resp.status_code == 200, resp.get_json()
        results.append(resp.get_json())
    got = [images_of(s3, r) for r in results]

    # The base pipeline was never reloaded, replaced or modified by the switches.
    assert loads == inference_engine.BASE_LOADS
    assert (id(engine.pipe), id(engine.pipe.unet)) == (pipe_id, unet_id)
    assert torch.equal(engine.pipe.unet.conv_in.weight, base_weight)
    assert [r["adapter"]["switch"] for r in results] == ["load", "hotswap", "replay", "replay"]

    # Each user alone, in a fresh pipeline: exactly the same pixels (no adapter bleed).
    for user, mine in (("alice", [got[0], got[2]]), ("bob", [got[1], got[3]])):
        alone = fresh_engine(world, user).run(
            inference_engine.GenerationRequest(**request(f"alone-{user}", user))
        )
        expected = images_of(s3, alone)
        for arr in mine:
            np.testing.assert_array_equal(arr, expected)
    assert not np.array_equal(got[0], got[1])  # the adapters really differ

    # And the hot-swapped slot computes what plain diffusers load_lora_weights computes, with
    # the default sampler (DPM-Solver++ 2M from the folder's scheduler config).
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    assert {r["scheduler"] for r in results} == {"dpmpp_2m"}
    for user, arr, res in (("alice", got[0], results[0]), ("bob", got[1], results[1])):
        plain = StableDiffusionPipeline.from_pretrained(world["base"], safety_checker=None)
        plain.set_progress_bar_config(disable=True)
        plain.scheduler = DPMSolverMultistepScheduler.from_config(
            plain.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
        )
        plain.load_lora_weights(world["folders"][user])
        out = plain(
            prompt=res["prompt"],
            negative_prompt=res["negative_prompt"],
            num_inference_steps=2,
            guidance_scale=5.0,
            width=64,
            height=64,
            num_images_per_prompt=2,
            generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
            output_type="np",
        ).images
        reference = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
        assert np.abs(reference.astype(int) - arr.astype(int)).max() <= 1


def test_result_json_images_seeds_timings(world):
    s3, client = world["s3"], world["client"]
    resp = client.post(
        "/invocations", data=json.dumps(request("res1", "bob", prompt="an astronaut", seed=100, num_images=3))
    )
    assert resp.status_code == 200
    result = resp.get_json()
    stored = json.loads(s3.get_object(Bucket=BUCKET, Key=keys.result_key("bob", "res1"))["Body"].read())
    assert stored == result
    assert result["prompt"] == "photo of sks person, an astronaut"  # token added when missing
    assert [img["key"] for img in result["images"]] == [f"generations/bob/res1/{i:03d}.png" for i in range(3)]
    assert [img["seed"] for img in result["images"]] == [100, 101, 102]
    # Random tiny-model pixels hold no face: SFace similarity is null, but it was checked.
    assert result["identity_check"] == "checked"
    assert [img["identity_similarity"] for img in result["images"]] == [None, None, None]
    # No Rekognition, and the tiny model ships no safety checker: said plainly, nothing withheld.
    assert result["output_moderation"] == "not_moderated" and result["withheld"] == 0
    assert all(img["withheld"] is False and img["moderation_labels"] == [] for img in result["images"])
    timings = result["timings"]
    for name in ("adapter_fetch_ms", "adapter_load_ms", "generate_ms", "upload_ms", "total_ms"):
        assert timings[name] >= 0
    assert timings["total_ms"] >= timings["generate_ms"] > 0
    for img in result["images"]:
        assert read_png(s3, img["key"]).shape == (64, 64, 3)
    # The user's own token (alice: "zwx") is the one added.
    alice = client.post(
        "/invocations",
        data=json.dumps(request("res2", "alice", prompt="in the style of a painting", num_images=1)),
    ).get_json()
    assert alice["prompt"] == "photo of zwx person, in the style of a painting"


def test_identity_similarity_uses_reference_embedding(world):
    engine, client = world["engine"], world["client"]
    real = engine.identity
    # Stand-in embedder (the real one finds no face in random pixels); cosine is the intake one.
    from avatarflow.faces import cosine_similarity

    engine.identity = (
        lambda image: [1.0, 0.0, 0.5] if image.getpixel((0, 0)) != (0, 0, 0) else None,
        cosine_similarity,
    )
    try:
        result = client.post("/invocations", data=json.dumps(request("ident", "bob"))).get_json()
    finally:
        engine.identity = real
    assert [img["identity_similarity"] for img in result["images"]] == [pytest.approx(1.0)] * 2


def _generation_files(s3, user, generation_id):
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=keys.generation_prefix(user, generation_id))
    return sorted(o["Key"].rsplit("/", 1)[-1] for o in listed.get("Contents", []))


def test_safety_checker_withholds_flagged_images(world):
    """The base model's own checker (no Rekognition): a flagged image is never written, has no
    key, and is counted; the result says which check ran."""
    engine, client, s3 = world["engine"], world["client"], world["s3"]
    real = engine.moderation
    engine.moderation = inference_engine.CheckerModeration(
        SafetyChecker(lambda images: [i == 1 for i in range(len(images))])
    )
    try:
        result = client.post("/invocations", data=json.dumps(request("safe1", "alice"))).get_json()
    finally:
        engine.moderation = real
    assert result["output_moderation"] == "safety_checker" and result["withheld"] == 1
    kept, flagged = result["images"]
    assert kept["withheld"] is False and kept["key"].endswith("000.png")
    assert flagged["withheld"] is True and "key" not in flagged
    assert flagged["moderation_labels"][0]["source"] == "safety_checker"
    assert _generation_files(s3, "alice", "safe1") == ["000.png", "result.json"]


# DetectModerationLabels' documented response (Rekognition API reference, taxonomy v7: a level-2
# label with its level-1 parent), as botocore's Stubber checks it against the service model.
EXPLICIT_RESPONSE = {
    "ModerationLabels": [
        {"Confidence": 97.2, "Name": "Explicit Nudity", "ParentName": "Explicit", "TaxonomyLevel": 2},
        {"Confidence": 97.2, "Name": "Explicit", "ParentName": "", "TaxonomyLevel": 1},
    ],
    "ModerationModelVersion": "7.0",
}
SWIMWEAR_RESPONSE = {
    "ModerationLabels": [
        {"Confidence": 88.0, "Name": "Swimwear or Underwear", "ParentName": "", "TaxonomyLevel": 1},
    ],
    "ModerationModelVersion": "7.0",
}


def test_rekognition_output_moderation_withholds_by_policy(world):
    """Every image goes to DetectModerationLabels (PNG bytes, the policy's MinConfidence); a label
    under a withholding category withholds the image, others are recorded and delivered."""
    from botocore.stub import ANY, Stubber

    from avatarflow.moderation import ImagePolicy

    engine, client, s3 = world["engine"], world["client"], world["s3"]
    rekognition = boto3.client("rekognition", region_name="us-east-1")
    stub = Stubber(rekognition)
    expected = {"Image": {"Bytes": ANY}, "MinConfidence": 60.0}
    stub.add_response("detect_moderation_labels", SWIMWEAR_RESPONSE, expected)
    stub.add_response("detect_moderation_labels", EXPLICIT_RESPONSE, expected)
    real = engine.moderation
    engine.moderation = inference_engine.RekognitionModeration(rekognition, ImagePolicy(min_confidence=60.0))
    try:
        with stub:
            result = client.post("/invocations", data=json.dumps(request("rek1", "alice"))).get_json()
            stub.assert_no_pending_responses()
    finally:
        engine.moderation = real
    assert result["output_moderation"] == "rekognition" and result["withheld"] == 1
    swim, explicit = result["images"]
    assert swim["withheld"] is False and swim["moderation_labels"][0]["name"] == "Swimwear or Underwear"
    assert explicit["withheld"] is True and "key" not in explicit
    assert {lb["name"] for lb in explicit["moderation_labels"]} == {"Explicit Nudity", "Explicit"}
    assert _generation_files(s3, "alice", "rek1") == ["000.png", "result.json"]


def test_container_refuses_a_blocked_combination(world):
    """The container's last gate: whatever wrote the request, a blocked term never reaches the
    pipeline (400 naming the field), and nothing is written."""
    client, s3 = world["client"], world["s3"]
    body = request("blk1", "alice", prompt="a nud\u0435 portrait")  # Cyrillic e
    resp = client.post("/invocations", data=json.dumps(body))
    assert resp.status_code == 400 and "prompt" in json.dumps(resp.get_json())
    assert _generation_files(s3, "alice", "blk1") == []


def test_diffusers_safety_checker_from_folder(tmp_path):
    """The configured-model path: diffusers' StableDiffusionSafetyChecker loaded from a folder
    (tiny random CLIP here), with concept thresholds forced so every image is flagged."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    cfg = CLIPConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=768,
    )
    checker = StableDiffusionSafetyChecker(cfg)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-10.0)  # every cosine beats the threshold
    checker.save_pretrained(tmp_path / "safety_checker")
    CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32}).save_pretrained(
        tmp_path / "feature_extractor"
    )
    check = inference_engine.diffusers_safety_check(tmp_path)
    images = [Image.new("RGB", (64, 64), (200, 10, 10)), Image.new("RGB", (64, 64), (0, 90, 200))]
    assert SafetyChecker(check)(images).flags == [True, True]
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(10.0)  # nothing reaches the threshold
    checker.save_pretrained(tmp_path / "safety_checker")
    assert SafetyChecker(inference_engine.diffusers_safety_check(tmp_path))(images).flags == [False, False]


def test_text_encoder_adapter_is_loaded_and_removed(world):
    """carol's adapter carries text-encoder LoRA (not hot-swappable in diffusers): it is loaded
    for her and removed for the next user, whose images stay exactly his own."""
    s3, client = world["s3"], world["client"]
    bob_before = images_of(s3, client.post("/invocations", data=json.dumps(request("te0", "bob"))).get_json())
    carol = client.post("/invocations", data=json.dumps(request("te1", "carol")))
    assert carol.status_code == 200, carol.get_json()
    assert "user_te" in world["engine"].pipe.text_encoder.peft_config
    bob_after = images_of(s3, client.post("/invocations", data=json.dumps(request("te2", "bob"))).get_json())
    np.testing.assert_array_equal(bob_before, bob_after)
    assert "user_te" not in getattr(world["engine"].pipe.text_encoder, "peft_config", {})
    alone = fresh_engine(world, "carol").run(
        inference_engine.GenerationRequest(**request("te-alone", "carol"))
    )
    np.testing.assert_array_equal(images_of(s3, carol.get_json()), images_of(s3, alone))


def test_unknown_user_or_version_is_a_clear_error_and_server_keeps_serving(world):
    client = world["client"]
    for user, version in (("nobody", "v1"), ("alice", "v9")):
        resp = client.post("/invocations", data=json.dumps(request("missing", user, model_version=version)))
        assert resp.status_code == 404
        body = resp.get_json()
        assert body["error"] == "model_not_found"
        assert (body["user_id"], body["model_version"]) == (user, version)
    assert world["s3"].list_objects_v2(Bucket=BUCKET, Prefix="generations/nobody/").get("KeyCount") == 0
    assert (
        client.post("/invocations", data=json.dumps(request("after", "alice", num_images=1))).status_code
        == 200
    )


def test_broken_adapter_is_a_clear_error(world):
    s3, client = world["s3"], world["client"]
    prefix = keys.model_prefix("mallory", "v1")
    s3.put_object(Bucket=BUCKET, Key=prefix + keys.ADAPTER_WEIGHTS, Body=b"not safetensors")
    s3.put_object(Bucket=BUCKET, Key=prefix + keys.ADAPTER_CONFIG, Body=b"{}")
    resp = client.post("/invocations", data=json.dumps(request("broken", "mallory")))
    assert resp.status_code == 422
    assert resp.get_json()["error"] == "model_invalid"
    assert "cannot be read" in resp.get_json()["message"]
    assert (
        client.post("/invocations", data=json.dumps(request("after2", "bob", num_images=1))).status_code
        == 200
    )


def test_an_erased_user_gets_nothing_generated_or_written(world):
    """The erasure check (avatarflow.erasure, the engine's `erased`): refused before the
    pipeline runs, and again right before the first write when the DELETE came during the
    generation. 410 user_erased, no ids in the body (SageMaker keeps it as the failure
    object), nothing under generations/."""
    engine, client, s3 = world["engine"], world["client"], world["s3"]
    checks = []

    def erased_from_the_second_check(user_id):
        checks.append(user_id)
        return len(checks) > 1

    for erased, expected_checks in ((lambda user_id: checks.append(user_id) or True, 1),
                                    (erased_from_the_second_check, 2)):
        checks.clear()
        engine.erased = erased
        try:
            resp = client.post("/invocations", data=json.dumps(request(f"erased{expected_checks}", "bob")))
        finally:
            engine.erased = None
        assert resp.status_code == 410
        assert resp.get_json() == {"error": "user_erased", "message": resp.get_json()["message"]}
        assert checks == ["bob"] * expected_checks
        prefix = keys.generation_prefix("bob", f"erased{expected_checks}")
        assert s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("KeyCount") == 0
    kept = client.post("/invocations", data=json.dumps(request("kept", "bob", num_images=1)))
    assert kept.status_code == 200


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"num_images": 9}, "num_images"),
        ({"num_images": 0}, "num_images"),
        ({"steps": 81}, "steps"),
        ({"guidance_scale": 20.5}, "guidance_scale"),
        ({"width": 1032}, "width"),
        ({"height": 60}, "height"),
        ({"width": 100}, "width"),
        ({"prompt": "x" * 501}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"seed": -1}, "seed"),
        ({"steps": "5"}, "steps"),
        ({"user_id": "../etc"}, "user_id"),
        ({"generation_id": "a/b"}, "generation_id"),
    ],
)
def test_out_of_range_fields_are_400_with_reasons(world, patch, field):
    resp = world["client"].post("/invocations", data=json.dumps(request("bad", **patch)))
    assert resp.status_code == 400
    body = resp.get_json()
    assert body["error"] == "invalid_request"
    assert list(body["fields"]) == [field]
    assert body["fields"][field]


def test_malformed_json_and_missing_fields_are_400(world):
    client = world["client"]
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        resp = client.post("/invocations", data=raw)
        assert resp.status_code == 400
        assert resp.get_json()["error"] == "invalid_request"
        assert "body" in resp.get_json()["fields"]
    resp = client.post("/invocations", data=json.dumps({"prompt": "hi"}))
    assert resp.status_code == 400
    assert set(resp.get_json()["fields"]) == {"generation_id", "user_id", "model_version"}


def test_defaults_fill_negative_prompt_steps_guidance_and_random_seed(world):
    body = {
        "generation_id": "defaults",
        "user_id": "bob",
        "model_version": "v1",
        "prompt": "sks person smiling",
        "width": 64,
        "height": 64,
        "steps": 1,
    }
    result = world["client"].post("/invocations", data=json.dumps(body)).get_json()
    assert result["negative_prompt"] == inference_engine.DEFAULT_NEGATIVE_PROMPT
    assert result["guidance_scale"] == inference_engine.DEFAULT_GUIDANCE
    assert result["num_images"] == 1
    assert result["prompt"] == "sks person smiling"  # token already present
    assert isinstance(result["seed"], int) and result["images"][0]["seed"] == result["seed"]
    req = inference_engine.parse_request(json.dumps({k: v for k, v in body.items() if k != "steps"}))
    assert req.steps == inference_engine.DEFAULT_STEPS


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _serving(world, tmp_path, argv: list[str], env_extra: dict[str, str] | None = None):
    """Start `argv` (the production server, from containers/inference) against a moto S3 server
    holding alice's adapter; yield (base URL, S3 client) once GET /ping answers; stop both."""
    from moto.server import ThreadedMotoServer

    moto_port, port = _free_port(), _free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port)
    moto.start()
    proc = None
    try:
        endpoint = f"http://127.0.0.1:{moto_port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        prefix = keys.model_prefix("alice", "v1")
        s3.upload_file(
            str(world["folders"]["alice"] / keys.ADAPTER_WEIGHTS), BUCKET, prefix + keys.ADAPTER_WEIGHTS
        )
        s3.put_object(Bucket=BUCKET, Key=prefix + keys.ADAPTER_CONFIG, Body=b'{"token": "sks"}')
        env = {
            **os.environ,
            "BUCKET_NAME": BUCKET,
            "AWS_ENDPOINT_URL": endpoint,
            "AVATARFLOW_BASE_MODEL": str(world["base"]),
            "SAGEMAKER_BIND_TO_PORT": str(port),
            "AVATARFLOW_ADAPTER_CACHE_DIR": str(tmp_path / "cache"),
            "AVATARFLOW_LOG_LEVEL": "warning",
            "PYTHONPATH": str(REPO / "src"),
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            **(env_extra or {}),
        }
        proc = subprocess.Popen(
            argv, cwd=REPO / "containers/inference", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/ping", timeout=2) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
                assert time.time() < deadline, "server did not start"
                time.sleep(0.3)
        yield base, s3
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        moto.stop()


def _post(base: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(
        base + "/invocations", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _get_json(url: str, timeout: float = 5) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


STEP_DELAY_S = 0.12  # tests/inference_probe.py: each UNet forward sleeps this long first


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    """The production server as SageMaker starts it (`serve`: gunicorn with
    inference_gunicorn_conf.py), serving the real app and engine through tests/inference_probe.py,
    which slows each denoising step to STEP_DELAY_S and counts concurrency. One boot (~10 s)
    for the tests below; only started when an e2e test asks for it."""
    argv = [str(REPO / "containers/inference/serve"), "inference_probe:create_probe_app()"]
    env = {"PYTHONPATH": f"{REPO / 'src'}:{REPO / 'tests'}", "AVATARFLOW_PROBE_STEP_S": str(STEP_DELAY_S)}
    with _serving(world, tmp_path_factory.mktemp("server"), argv, env) as served:
        yield served


def test_real_gunicorn_server_serves_ping_and_errors(server):
    """Over HTTP, on a free port, against a moto S3 server: /ping, a 400, a 404 and a real
    generation."""
    base, s3 = server
    assert _get_json(base + "/ping") == (200, {"status": "healthy", "busy": False})
    assert _post(base, b"{oops")[0] == 400
    assert _post(base, json.dumps(request("srv0", "ghost")).encode())[0] == 404
    status, result = _post(base, json.dumps(request("srv1", "alice", num_images=1)).encode())
    assert status == 200, result
    assert s3.head_object(Bucket=BUCKET, Key="generations/alice/srv1/000.png")["ContentLength"] > 0


def test_ping_answers_within_2s_while_generations_run_one_at_a_time(server):
    """SageMaker's health check gives up on GET /ping after 2 s. Two invocations of ~2 s each
    (16 slowed steps) are sent at once and /ping is polled while they run: every ping answers
    200 "healthy" (busy) within 2 s; both invocations are inside the worker together, yet never
    inside the UNet together (the pipeline is not thread-safe)."""
    base, _s3 = server
    steps = 16  # one UNet forward per step (guidance is batched)
    before = _get_json(base + "/probe")[1]
    results: dict[str, tuple[int, dict]] = {}

    def invoke(gen_id: str) -> None:
        body = request(gen_id, "alice", num_images=1, steps=steps)
        results[gen_id] = _post(base, json.dumps(body).encode())

    workers = [threading.Thread(target=invoke, args=(f"busy{i}",)) for i in range(2)]
    for worker in workers:
        worker.start()
    pings: list[tuple[float, int, dict]] = []
    while any(worker.is_alive() for worker in workers):
        start = time.perf_counter()
        try:
            status, body = _get_json(base + "/ping", timeout=10)
        except OSError as err:  # a ping that never came back counts as a failed check
            status, body = 0, {"error": repr(err)}
        pings.append((time.perf_counter() - start, status, body))
        time.sleep(0.2)
    for worker in workers:
        worker.join()
    probe = _get_json(base + "/probe")[1]

    assert [results[g][0] for g in ("busy0", "busy1")] == [200, 200], results
    slow = [p for p in pings if p[0] >= 2.0 or p[1] != 200 or p[2].get("status") != "healthy"]
    assert not slow, f"/ping failed SageMaker's 2 s health check while busy: {slow}"
    busy = [p for p in pings if p[2].get("busy")]
    assert len(busy) >= 3, f"too few pings landed while a generation ran: {pings}"
    # Both requests were in the worker at the same time (the server did not serialize them),
    # and the engine's lock still let only one of them into the model at a time.
    assert probe["max_requests"] == 2, probe
    assert probe["max_in_model"] == 1, probe
    assert probe["model_calls"] - before["model_calls"] == 2 * steps, probe
