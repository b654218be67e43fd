"""The DreamBooth-LoRA training container, run on a tiny random model under the SageMaker
directory contract (AVATARFLOW_OPT_ML points the /opt/ml root at a temp folder)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import train_dreambooth_lora as tdl
from PIL import Image
from safetensors.torch import load_file

from avatarflow.tiny_model import build_tiny_pipeline

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "containers" / "training" / "train"
REFERENCE = [round(0.01 * i, 2) for i in range(128)]
# Square boxes around the faces in the shipped photos (left, top, right, bottom).
FACE_BOXES = {
    "astronaut": (150, 20, 310, 180),
    "grace_hopper": (150, 60, 370, 280),
    "camera": (190, 30, 320, 160),
}


@pytest.fixture(scope="module")
def base_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    return {v: build_tiny_pipeline(root / v, variant=v) for v in ("sd", "sdxl")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A dataset as build_dataset writes it: face crops (real photos) + manifest.json."""
    from avatarflow.sample_photos import photo

    folder = tmp_path_factory.mktemp("dataset")
    (folder / "images").mkdir()
    crops = [
        photo(name).crop(box).resize((64, 64), Image.Resampling.LANCZOS) for name, box in FACE_BOXES.items()
    ]
    for i, crop in enumerate(crops):
        crop.save(folder / "images" / f"{i:03d}.png")
    photos = [
        {"name": f"{n}.jpg", "verdict": "ok", "crop": f"images/{i:03d}.png"} for i, n in enumerate(FACE_BOXES)
    ]
    manifest = {"photos": photos, "reference_embedding": REFERENCE}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def make_job(root: Path, base: Path, dataset: Path, **hyperparameters) -> dict:
    """Lay out /opt/ml for one job and return the env that points the container at it."""
    (root / "input" / "config").mkdir(parents=True)
    values = {
        "max_train_steps": "4",
        "resolution": "64",
        "mixed_precision": "no",
        "learning_rate": "0.001",
        "rank": "4",
        "alpha": "8",
        "seed": "3",
        "checkpointing_steps": "2",
        "base_model_id": "tiny-sd",
    }
    values.update({k: str(v) for k, v in hyperparameters.items()})  # SageMaker sends strings
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps(values))
    data = root / "input" / "data"
    data.mkdir(parents=True)
    if dataset is not None:
        (data / "training").symlink_to(dataset)
    if base is not None:
        (data / "base_model").symlink_to(base)
    return {"AVATARFLOW_OPT_ML": str(root)}


def run_main(env: dict) -> int:
    return tdl.main(env=env)


def run_subprocess(env: dict, extra: dict | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SM_")} | env | (extra or {})
    return subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT)], env=full, capture_output=True, text=True, timeout=300
    )


def adapter(root: Path):
    model = root / "model"
    return load_file(model / "pytorch_lora_weights.safetensors"), json.loads(
        (model / "adapter.json").read_text()
    )


def generate(pipe):
    return pipe(
        "a photo of sks person",
        num_inference_steps=4,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]


@pytest.mark.e2e
def test_trained_adapter_loads_and_changes_the_image_and_is_deterministic(tmp_path, base_models, dataset):
    from diffusers import StableDiffusionPipeline

    env_a = make_job(tmp_path / "a", base_models["sd"], dataset)
    env_b = make_job(tmp_path / "b", base_models["sd"], dataset)
    assert run_main(env_a) == 0
    assert run_main(env_b) == 0
    weights_a, info = adapter(tmp_path / "a")
    weights_b, _ = adapter(tmp_path / "b")
    assert weights_a.keys() == weights_b.keys() and len(weights_a) > 0
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)  # same seed, same adapter
    assert any(".lora.up." in k or "lora_B" in k for k in weights_a)

    assert info["steps"] == 4 and info["rank"] == 4 and info["alpha"] == 8
    assert info["token"] == "sks" and info["instance_prompt"] == "a photo of sks person"
    assert info["base_model_id"] == "tiny-sd" and info["base_model_fingerprint"].startswith("sha256:")
    assert info["reference_embedding"] == REFERENCE
    assert set(info["loss"]) == {"first", "last", "mean"} and all(np.isfinite(list(info["loss"].values())))

    pipe = StableDiffusionPipeline.from_pretrained(base_models["sd"])
    pipe.set_progress_bar_config(disable=True)
    before = generate(pipe)
    pipe.load_lora_weights(tmp_path / "a" / "model", adapter_name="user")
    # alpha comes back from the safetensors metadata (scale alpha/rank = 2, not 1)
    assert pipe.unet.peft_config["user"].lora_alpha == 8
    after = generate(pipe)
    assert np.abs(after - before).mean() > 1e-3


@pytest.mark.e2e
def test_killed_run_resumes_from_its_checkpoint_and_finishes(tmp_path, base_models, dataset):
    env = make_job(tmp_path / "job", base_models["sd"], dataset, max_train_steps=6)
    killed = run_subprocess(env, {tdl.KILL_AFTER_STEP_ENV: "2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "job" / "checkpoints" / "checkpoint-2" / "state.pt").is_file()
    assert not (tmp_path / "job" / "model" / "adapter.json").exists()

    resumed = run_subprocess(env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from checkpoint-2 at step 2" in resumed.stdout
    steps = [
        int(line.split()[0].split("=")[1]) for line in resumed.stdout.splitlines() if line.startswith("step=")
    ]
    assert steps == [3, 4, 5, 6]
    weights, info = adapter(tmp_path / "job")
    assert info["steps"] == 6 and info["resumed_from_step"] == 2

    # The same job uninterrupted gives the same adapter: resuming loses nothing.
    straight = make_job(tmp_path / "straight", base_models["sd"], dataset, max_train_steps=6)
    assert run_main(straight) == 0
    reference, _ = adapter(tmp_path / "straight")
    assert all(torch.allclose(weights[k], reference[k], atol=1e-6) for k in reference)


@pytest.mark.e2e
def test_sdxl_with_text_encoder_lora(tmp_path, base_models, dataset):
    from diffusers import StableDiffusionXLPipeline

    env = make_job(
        tmp_path / "xl", base_models["sdxl"], dataset, max_train_steps=2, train_text_encoder="true"
    )
    assert run_main(env) == 0
    weights, info = adapter(tmp_path / "xl")
    assert info["base_model_type"] == "sdxl" and info["train_text_encoder"] is True
    assert {k.split(".")[0] for k in weights} == {"unet", "text_encoder", "text_encoder_2"}
    pipe = StableDiffusionXLPipeline.from_pretrained(base_models["sdxl"])
    pipe.set_progress_bar_config(disable=True)
    before = generate(pipe)
    pipe.load_lora_weights(tmp_path / "xl" / "model")
    assert np.abs(generate(pipe) - before).mean() > 1e-4


@pytest.mark.e2e
def test_prior_preservation_generates_class_images(tmp_path, base_models, dataset, capsys):
    env = make_job(
        tmp_path / "pp",
        base_models["sd"],
        dataset,
        max_train_steps=2,
        prior_preservation="true",
        num_class_images=2,
        class_inference_steps=2,
    )
    assert run_main(env) == 0
    _, info = adapter(tmp_path / "pp")
    assert info["prior_preservation"] is True
    generated = sorted((tmp_path / "pp" / "checkpoints" / "class_images").glob("*.png"))
    assert len(generated) == 2 and Image.open(generated[0]).size == (64, 64)
    assert "generating 2 class images" in capsys.readouterr().out


def test_v_prediction_and_bf16(tmp_path, dataset):
    base = build_tiny_pipeline(tmp_path / "v", prediction_type="v_prediction")
    env = make_job(
        tmp_path / "job",
        base,
        dataset,
        max_train_steps=1,
        mixed_precision="bf16",
        gradient_checkpointing="true",
    )
    assert run_main(env) == 0
    _, info = adapter(tmp_path / "job")
    assert info["prediction_type"] == "v_prediction" and info["mixed_precision"] == "bf16"


def test_metric_lines_match_the_documented_regexes(tmp_path, base_models, dataset, capsys):
    import re

    env = make_job(tmp_path / "m", base_models["sd"], dataset, max_train_steps=2)
    assert run_main(env) == 0
    out = capsys.readouterr().out
    losses = re.findall(r"step=\d+ loss=([0-9.eE+-]+)", out)
    times = re.findall(r"step_time=([0-9.]+)", out)
    assert len(losses) == 2 and len(times) == 2 and all(float(x) > 0 for x in losses)


def _failure(root: Path) -> str:
    return (root / "output" / "failure").read_text().strip()


def test_missing_channel_fails_clearly(tmp_path, base_models, dataset):
    env = make_job(tmp_path / "nobase", None, dataset)
    result = run_subprocess(env)
    assert result.returncode != 0
    assert "missing input channel 'base_model'" in _failure(tmp_path / "nobase")

    env = make_job(tmp_path / "nodata", base_models["sd"], None)
    assert run_main(env) != 0
    assert "missing input channel 'training'" in _failure(tmp_path / "nodata")


def test_empty_dataset_fails_clearly(tmp_path, base_models):
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "manifest.json").write_text(json.dumps({"photos": [], "reference_embedding": REFERENCE}))
    env = make_job(tmp_path / "job", base_models["sd"], empty)
    assert run_main(env) == 1
    assert _failure(tmp_path / "job") == "training channel has no images (expected images/*.png)"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("max_train_steps", "ten", "max_train_steps must be an integer"),
        ("learning_rate", "-1", "learning_rate must be in (0, 1)"),
        ("train_text_encoder", "maybe", "train_text_encoder must be true or false"),
        ("mixed_precision", "fp8", "mixed_precision must be no, fp16 or bf16"),
        ("resolution", "100", "resolution must be a multiple of 8"),
        ("max_train_step", "10", "unknown hyperparameter(s) max_train_step"),
        ("instance_prompt", "a photo of a person", "must contain the token 'sks'"),
    ],
)
def test_bad_hyperparameter_fails_clearly(tmp_path, base_models, dataset, name, value, message):
    env = make_job(tmp_path / "job", base_models["sd"], dataset, **{name: value})
    assert run_main(env) == 1
    failure = _failure(tmp_path / "job")
    assert message in failure and "\n" not in failure


def test_hyperparameters_arrive_as_strings():
    hp = tdl.parse_hyperparameters(
        {
            "max_train_steps": "12",
            "learning_rate": "5e-5",
            "train_text_encoder": "True",
            "prior_preservation": "0",
            "rank": '"8"',
            "token": "ohwx",
            "sagemaker_region": '"us-east-1"',
        }
    )
    assert (hp.max_train_steps, hp.learning_rate, hp.train_text_encoder, hp.prior_preservation) == (
        12,
        5e-5,
        True,
        False,
    )
    assert hp.rank == 8 and hp.lora_alpha == 8.0 and hp.prompt == "a photo of ohwx person"
    assert tdl.parse_hyperparameters({}) == tdl.Hyperparameters()


def test_sm_channel_env_vars_override_the_default_paths(tmp_path):
    paths = tdl.Paths.from_env(
        {"AVATARFLOW_OPT_ML": str(tmp_path), "SM_CHANNEL_TRAINING": "/data/x", "SM_MODEL_DIR": "/out/model"}
    )
    assert paths.training == Path("/data/x") and paths.model == Path("/out/model")
    assert paths.base_model == tmp_path / "input" / "data" / "base_model"
    assert paths.failure == tmp_path / "output" / "failure"
