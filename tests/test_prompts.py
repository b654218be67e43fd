"""Prompts in the inference container: the user's token is found whatever punctuation follows
it, prompts past CLIP's 77 tokens are encoded whole (in windows of 75) up to 225 tokens and
refused past that with a 400 that states the limit, and no prompt text reaches the logs at
WARNING (diffusers' truncation warning used to echo the cut-off part of the prompt)."""

from __future__ import annotations

import json
import logging

import boto3
import numpy as np
import pytest
import torch
from inference_engine import MAX_PROMPT_TOKENS, encode_long_prompts, prompt_token_count, prompt_with_token
from inference_server import create_app
from moto import mock_aws
from serving_world import BUCKET, image, make_adapter, new_engine, publish, request

from avatarflow.tiny_model import build_tiny_pipeline

# The tiny tokenizer has a whole-word token for "a": each " a" is one CLIP token.
HEAD = "portrait of sks person" + " a" * 71  # 75 tokens: exactly one CLIP window
TAIL = " smiling with the background"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        bases, engines = {}, {}
        for i, variant in enumerate(("sd", "sdxl")):
            bases[variant] = build_tiny_pipeline(root / variant, variant, seed=i)
            folder = make_adapter(bases[variant], root / "adapters" / variant, variant, 4, True, seed=i)
            publish(s3, folder, variant, {"token": "sks"})
            engines[variant] = new_engine(s3, bases[variant], root / "cache" / variant)
        yield {"s3": s3, "bases": bases, "engines": engines}


@pytest.mark.parametrize(
    ("prompt", "kept"),
    [
        ("sks. on a beach", True),
        ("a portrait of sks, smiling", True),
        ("(SKS) in the rain", True),
        ("sks's birthday; photo of sks!", True),
        ("sksy person on a beach", False),
        ("a photo of asks person", False),
        ("a person on a beach", False),
    ],
)
def test_the_token_is_found_whatever_punctuation_follows_it(prompt, kept):
    out = prompt_with_token(prompt, "sks", "person")
    assert (out == prompt) is kept
    if not kept:
        assert out == f"photo of sks person, {prompt}"


@pytest.mark.parametrize("variant", ["sd", "sdxl"])
def test_one_window_encodes_exactly_as_the_pipeline_does(world, variant):
    """The windowed encoder's first window is the pipeline's own encoding (so a long prompt's
    first 75 tokens mean what they mean in a short one)."""
    pipe = world["engines"][variant].pipe
    prompt, negative = "portrait of sks person smiling", "blurry"
    ours = encode_long_prompts(pipe, prompt, negative, "cpu")
    with torch.no_grad():
        theirs = pipe.encode_prompt(
            prompt,
            device="cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative,
        )
    names = ["prompt_embeds", "negative_prompt_embeds"]
    if variant == "sdxl":
        names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    for name, expected in zip(names, theirs, strict=True):
        torch.testing.assert_close(ours[name], expected, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", ["sd", "sdxl"])
def test_a_prompt_past_77_tokens_is_encoded_whole(world, variant):
    """On the first version the tail past CLIP's 77 tokens was cut off silently: the long
    prompt gave the image of its first 75 tokens."""
    engine, s3 = world["engines"][variant], world["s3"]
    assert prompt_token_count(engine.pipe.tokenizer, HEAD) == 75
    long_prompt = HEAD + TAIL
    whole = engine.run(request(f"long-{variant}", variant, prompt=long_prompt))
    cut = engine.run(request(f"cut-{variant}", variant, prompt=HEAD))
    assert whole["prompt"] == long_prompt and whole["prompt_tokens"] == 75 + 4
    assert cut["prompt_tokens"] == 75
    assert not np.array_equal(image(s3, whole), image(s3, cut)), "the words past 77 tokens were dropped"
    # The tail is really read: another tail, another image.
    other = engine.run(request(f"other-{variant}", variant, prompt=HEAD + " with a painting"))
    assert not np.array_equal(image(s3, whole), image(s3, other))


def test_a_prompt_over_the_limit_is_a_400_stating_the_limit_in_tokens(world):
    engine, s3 = world["engines"]["sd"], world["s3"]
    client = create_app(engine).test_client()
    body = request("too-long", "sd", prompt="sks" + " a" * MAX_PROMPT_TOKENS).model_dump()
    resp = client.post("/invocations", data=json.dumps(body))
    assert resp.status_code == 400, resp.get_json()
    answer = resp.get_json()
    assert answer["error"] == "invalid_request"
    assert answer["fields"] == {"prompt": f"{MAX_PROMPT_TOKENS + 1} CLIP tokens; the limit is 225 tokens"}
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="generations/sd/too-long/").get("KeyCount") == 0
    at_limit = request("at-limit", "sd", prompt="sks" + " a" * (MAX_PROMPT_TOKENS - 1)).model_dump()
    assert client.post("/invocations", data=json.dumps(at_limit)).status_code == 200


def test_prompt_text_never_reaches_the_logs_at_warning(world, capfd, caplog):
    """Generations with long prompts (and the pipeline itself fed a prompt past 77 tokens, whose
    truncation warning quotes the cut-off words) leave no prompt text in any log line at
    WARNING or above, on stderr/stdout or through logging."""
    engine = world["engines"]["sd"]
    marker = " zebracorn hidden words"
    caplog.set_level(logging.WARNING)
    engine.run(request("secret", "sd", prompt=HEAD + marker))
    with torch.no_grad():
        engine.pipe(prompt=HEAD + marker, num_inference_steps=1, width=64, height=64, output_type="np")
    out, err = capfd.readouterr()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    for text in (out, err, *warnings):
        assert "zebracorn" not in text
