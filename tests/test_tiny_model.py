"""The tiny random base model: a normal diffusers folder, deterministic, cached, fast."""

import hashlib

import pytest
import torch

from avatarflow.tiny_model import DEFAULT_TOKEN, READY_MARKER, build_tiny_pipeline, build_tokenizer


def _digest(folder):
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.safetensors")):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_tokenizer_keeps_the_rare_token_whole():
    tok = build_tokenizer()
    assert tok.tokenize("a photo of sks person") == ["a</w>", "photo</w>", "of</w>", "sks</w>", "person</w>"]
    ids = tok("a photo of sks person, Smiling 42!").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]  # any ASCII falls back to byte tokens
    assert DEFAULT_TOKEN == "sks"


@pytest.mark.parametrize("variant", ["sd", "sdxl"])
def test_folder_layout_and_generation(tmp_path, variant):
    from diffusers import DiffusionPipeline

    path = build_tiny_pipeline(tmp_path / variant, variant=variant)
    expected = {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    if variant == "sdxl":
        expected |= {"text_encoder_2", "tokenizer_2"}
    assert expected <= {p.name for p in path.iterdir()}
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 20_000_000

    pipe = DiffusionPipeline.from_pretrained(path)
    expected_class = "StableDiffusionXLPipeline" if variant == "sdxl" else "StableDiffusionPipeline"
    assert type(pipe).__name__ == expected_class
    run = lambda: pipe(  # noqa: E731
        "a photo of sks person", num_inference_steps=2, height=64, width=64,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images
    a, b = run(), run()
    assert a.shape == (1, 64, 64, 3)
    assert a.std() > 0.01  # not a blank image
    assert (a == b).all()


def test_deterministic_idempotent_and_seeded(tmp_path):
    a = build_tiny_pipeline(tmp_path / "a", seed=0)
    b = build_tiny_pipeline(tmp_path / "b", seed=0)
    c = build_tiny_pipeline(tmp_path / "c", seed=1)
    assert _digest(a) == _digest(b) != _digest(c)

    mtime = (a / READY_MARKER).stat().st_mtime_ns
    assert build_tiny_pipeline(a, seed=0) == a  # cached: not rebuilt
    assert (a / READY_MARKER).stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError):
        build_tiny_pipeline(a, seed=0, variant="sdxl")
    with pytest.raises(ValueError, match="variant"):
        build_tiny_pipeline(tmp_path / "x", variant="sd3")


def test_v_prediction_scheduler(tmp_path):
    import json

    path = build_tiny_pipeline(tmp_path / "v", prediction_type="v_prediction")
    cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["prediction_type"] == "v_prediction"
