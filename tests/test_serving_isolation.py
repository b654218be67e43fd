"""Serving isolation: whatever order users arrive in, each image is the image that user's own
adapter gives alone in a fresh pipeline, and the result reports the adapter's true rank.

The engine keeps ONE UNet LoRA slot and switches users by copying into it (diffusers/peft
hotswap, then the engine's recorded replay). The first version read every adapter's rank as 0
(it looked for "lora_B" keys, which diffusers-format files do not have), so an adapter of a
rank above the slot went through peft's hotswap, which then `swap_tensors`-ed the slot with
the cached adapter's own tensors: the next time that user came back, the cache held the
previous user's weights. These tests run the real engine on the tiny SD and SDXL models.
"""

from __future__ import annotations

import gc
import os
import weakref
from functools import cache

import boto3
import numpy as np
import pytest
import serving_world
import torch
from adapter_cache import lora_rank
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inference_engine import UNET_SLOT, Engine
from moto import mock_aws
from serving_world import BUCKET, image, make_adapter, publish, request

from avatarflow.tiny_model import build_tiny_pipeline

# Most tests here run a diffusion model (tiny, random weights) or train one: the module is in
# the e2e tier, out of make test-fast's quick loop.
pytestmark = pytest.mark.e2e

SLOT_RANK = 8  # the engine's starting slot (AVATARFLOW_MAX_LORA_RANK)
# Per variant: user -> (rank, text-encoder LoRA). Ranks 16 and 24 are above the slot.
USERS = {
    "u4": (4, False),
    "u8te": (8, True),
    "u16": (16, False),
    "u24te": (24, True),
}
# Examples per property (FUZZ_EXAMPLES as in tests/test_fuzz.py: 150 by default -> 6 here,
# `make fuzz`'s 10,000 -> 400). Each example is a few real generations.
EXAMPLES = max(4, int(os.environ.get("FUZZ_EXAMPLES", "150")) // 25)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny SD and SDXL bases; every user of USERS published for both in moto S3."""
    root = tmp_path_factory.mktemp("isolation")
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        bases = {}
        for v, variant in enumerate(("sd", "sdxl")):
            bases[variant] = build_tiny_pipeline(root / variant, variant, seed=v)
            for i, (user, (rank, te)) in enumerate(USERS.items()):
                out = root / "adapters" / variant / user
                folder = make_adapter(bases[variant], out, variant, rank, te, i)
                publish(s3, folder, f"{variant}-{user}", {"rank": rank})
        yield {"root": root, "s3": s3, "bases": bases, "engines": 0}


def new_engine(world, variant: str) -> Engine:
    world["engines"] += 1
    cache_dir = world["root"] / "cache" / str(world["engines"])
    return serving_world.new_engine(world["s3"], world["bases"][variant], cache_dir, max_rank=SLOT_RANK)


def generate(world, engine: Engine, variant: str, user: str, gen_id: str) -> tuple[np.ndarray, dict]:
    result = engine.run(request(gen_id, f"{variant}-{user}", negative_prompt="blurry, watermark"))
    return image(world["s3"], result), result


_ALONE: dict[tuple[str, str], np.ndarray] = {}


def alone(world, variant: str, user: str) -> np.ndarray:
    """The user's image from a fresh pipeline that has only ever held this adapter."""
    key = (variant, user)
    if key not in _ALONE:
        engine = new_engine(world, variant)
        _ALONE[key], result = generate(world, engine, variant, user, f"alone-{variant}-{user}")
        assert result["adapter"]["switch"] == "load"
    return _ALONE[key]


def test_rank_is_read_from_the_weights_in_every_key_layout():
    down, up = torch.zeros(6, 32), torch.zeros(32, 6)
    layouts = (
        ("lora.down", "lora.up"),
        ("lora_A", "lora_B"),
        ("lora_linear_layer.down", "lora_linear_layer.up"),
    )
    for a, b in layouts:
        sd = {
            f"unet.x.to_q.{a}.weight": down,
            f"unet.x.to_q.{b}.weight": up,
            f"text_encoder.y.q_proj.{a}.weight": torch.zeros(2, 32),
        }
        assert lora_rank(sd) == 6 and lora_rank(sd, prefix="unet.") == 6
        assert lora_rank(sd, prefix="text_encoder.") == 2


def test_rank_above_the_slot_is_rebuilt_and_never_aliases_cached_adapters(world):
    """u4, u16 (above the slot), u4, u16: each image is the user's own, ranks are true."""
    engine = new_engine(world, "sd")
    seen = []
    for i, user in enumerate(["u4", "u16", "u4", "u16"]):
        image, result = generate(world, engine, "sd", user, f"seq{i}")
        assert result["adapter"]["rank"] == USERS[user][0]
        seen.append(result["adapter"]["switch"])
        np.testing.assert_array_equal(image, alone(world, "sd", user), err_msg=f"{user} at position {i}")
    assert seen == ["load", "rebuild", "hotswap", "replay"]
    assert not np.array_equal(alone(world, "sd", "u4"), alone(world, "sd", "u16"))


def test_a_slot_rebuild_leaves_nothing_holding_the_old_slot(world):
    """After a rebuild the old slot's tensors are freed (on a GPU: its memory). Plans recorded
    by cached adapters hold only weak references to the slot they were made for."""
    engine = new_engine(world, "sd")
    for i, user in enumerate(["u4", "u8te"]):  # load, then a hotswap that records a plan
        generate(world, engine, "sd", user, f"gc{i}")
    old = [weakref.ref(p) for name, p in engine.pipe.unet.named_parameters() if f".{UNET_SLOT}." in name]
    old_modules = [
        weakref.ref(m) for m in engine.pipe.unet.modules() if UNET_SLOT in getattr(m, "scaling", {})
    ]
    assert old and old_modules
    generate(world, engine, "sd", "u16", "gc-rebuild")
    assert engine.switches["rebuild"] == 1
    gc.collect()
    alive = [r for r in old if r() is not None]
    assert not alive, f"{len(alive)} of {len(old)} old slot tensors still referenced"
    assert all(r() is None for r in old_modules)
    # And the adapters recorded against the old slot still come back right.
    image, result = generate(world, engine, "sd", "u8te", "gc-after")
    np.testing.assert_array_equal(image, alone(world, "sd", "u8te"))
    assert result["adapter"]["switch"] == "hotswap"


@cache
def _sequences():
    return st.lists(st.sampled_from(sorted(USERS)), min_size=2, max_size=6)


@pytest.mark.parametrize("variant", ["sd", "sdxl"])
def test_any_order_of_users_gives_each_user_their_own_image(world, variant):
    """Property: for random sequences of users (ranks 4..24 against a slot of 8, text-encoder
    LoRA on and off), every image equals that user's image alone in a fresh pipeline."""

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(order=_sequences())
    def check(order: list[str]) -> None:
        engine = new_engine(world, variant)
        for i, user in enumerate(order):
            image, result = generate(world, engine, variant, user, f"p{world['engines']}-{i}")
            assert result["adapter"]["rank"] == USERS[user][0]
            np.testing.assert_array_equal(
                image, alone(world, variant, user), err_msg=f"{variant}: {user} at {i} of {order}"
            )

    check()
