"""Serving defaults: DPM-Solver++ (2M) at 25 steps, the base model folder's own scheduler
selectable per request ("folder") or per endpoint (AVATARFLOW_SCHEDULER); latents decoded one
image at a time and tiled past the VAE's native size."""

from __future__ import annotations

import json

import boto3
import inference_engine
import numpy as np
import pytest
import torch
from inference_server import create_app
from moto import mock_aws
from serving_world import BUCKET, image, make_adapter, new_engine, publish, request

from avatarflow.tiny_model import build_tiny_pipeline

# Most tests here run a diffusion model (tiny, random weights) or train one: the module is in
# the e2e tier, out of make test-fast's quick loop.
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("defaults")
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        base = build_tiny_pipeline(root / "sd", "sd")
        folder = make_adapter(base, root / "adapter", "sd", 4, False, seed=5)
        publish(s3, folder, "dana", {"token": "sks"})
        yield {"s3": s3, "base": base, "folder": folder, "engine": new_engine(s3, base, root / "cache")}


def plain_images(world, scheduler: str, steps: int) -> np.ndarray:
    """What plain diffusers draws with this adapter and sampler."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(world["base"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if scheduler == "dpmpp_2m":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
        )
    pipe.load_lora_weights(world["folder"])
    out = pipe(
        prompt="portrait of sks person",
        negative_prompt="blurry",
        num_inference_steps=steps,
        guidance_scale=5.0,
        width=64,
        height=64,
        generator=[torch.Generator().manual_seed(11)],
        output_type="np",
    ).images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)[0]


def test_the_default_sampler_is_dpm_solver_at_25_steps(world):
    body = {"generation_id": "g", "user_id": "dana", "model_version": "v1", "prompt": "sks"}
    req = inference_engine.parse_request(json.dumps(body))
    assert req.steps == 25 and req.scheduler is None
    engine = world["engine"]
    assert engine.default_scheduler == "dpmpp_2m"
    assert type(engine.schedulers["dpmpp_2m"]).__name__ == "DPMSolverMultistepScheduler"
    assert (
        engine.schedulers["dpmpp_2m"].config.prediction_type
        == engine.schedulers["folder"].config.prediction_type
    )
    result = engine.run(request("dpm", "dana", steps=4))
    assert result["scheduler"] == "dpmpp_2m"
    got = image(world["s3"], result)
    assert np.abs(got.astype(int) - plain_images(world, "dpmpp_2m", 4).astype(int)).max() <= 1


def test_the_folders_own_scheduler_is_selectable(world):
    engine, s3 = world["engine"], world["s3"]
    folder = engine.run(request("ddim", "dana", steps=4, scheduler="folder"))
    assert folder["scheduler"] == "folder"
    got = image(s3, folder)
    assert np.abs(got.astype(int) - plain_images(world, "folder", 4).astype(int)).max() <= 1
    dpm = image(s3, engine.run(request("dpm-again", "dana", steps=4)))
    assert not np.array_equal(got, dpm)
    # The endpoint's default can be the folder's scheduler too.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AVATARFLOW_SCHEDULER", "folder")
        assert inference_engine.Engine(engine.pipe, engine.cache, s3, BUCKET).default_scheduler == "folder"
        mp.setenv("AVATARFLOW_SCHEDULER", "euler")
        with pytest.raises(ValueError, match="scheduler must be one of"):
            inference_engine.Engine(engine.pipe, engine.cache, s3, BUCKET)


def test_an_unknown_scheduler_is_a_400(world):
    client = create_app(world["engine"]).test_client()
    body = request("bad", "dana").model_dump() | {"scheduler": "euler_a"}
    resp = client.post("/invocations", data=json.dumps(body))
    assert resp.status_code == 400 and list(resp.get_json()["fields"]) == ["scheduler"]


def test_latents_are_decoded_one_image_at_a_time_and_tiled_past_the_native_size(world):
    vae = world["engine"].pipe.vae
    assert vae.use_slicing and vae.use_tiling
    # Slicing changes nothing in an image: a batch of two gives each image as alone (<= 1 level).
    engine, s3 = world["engine"], world["s3"]
    pair = engine.run(request("pair", "dana", num_images=2, steps=2))
    alone = engine.run(request("alone", "dana", num_images=1, steps=2))
    assert np.abs(image(s3, pair, 0).astype(int) - image(s3, alone).astype(int)).max() <= 1
