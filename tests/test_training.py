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

# Most tests here run a diffusion model (tiny, random weights) or train one: the module is in
# the e2e tier, out of make test-fast's quick loop.
pytestmark = pytest.mark.e2e

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
        "validation_images": "0",  # the quality loop has its own tests (tests/test_quality_loop.py)
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


# --------------------------------------------------------------------------- defaults for faces
def test_defaults_for_faces():
    """No mirrored faces, bf16, a text-encoder rate of its own, min-SNR and offset noise off
    unless asked, gradient checkpointing left to the memory plan."""
    hp = tdl.Hyperparameters()
    assert hp.random_flip is False
    assert hp.mixed_precision == "bf16"
    assert hp.text_encoder_lr == 5e-6 and hp.learning_rate == 1e-4
    assert (hp.snr_gamma, hp.noise_offset) == (0.0, 0.0)
    assert hp.gradient_checkpointing == "auto"
    parsed = tdl.parse_hyperparameters(
        {
            "gradient_checkpointing": "True",
            "snr_gamma": "5",
            "noise_offset": "0.05",
            "text_encoder_lr": "1e-5",
        },
    )
    assert (parsed.gradient_checkpointing, parsed.snr_gamma, parsed.noise_offset) == ("true", 5.0, 0.05)
    assert tdl.parse_hyperparameters({"gradient_checkpointing": False}).gradient_checkpointing == "false"
    with pytest.raises(tdl.TrainingError, match="gradient_checkpointing must be auto, true or false"):
        tdl.parse_hyperparameters({"gradient_checkpointing": "sometimes"})


@pytest.mark.parametrize(
    ("requested", "device", "bf16", "expected"),
    [
        ("bf16", "cuda", True, "bf16"),  # A10G, A100, H100, L4
        ("bf16", "cuda", False, "fp16"),  # T4, V100: fp16 with a GradScaler
        ("fp16", "cuda", True, "fp16"),
        ("no", "cuda", True, "no"),
        ("bf16", "cpu", False, "bf16"),
        ("no", "cpu", False, "no"),
    ],
)
def test_bf16_where_the_gpu_has_it_fp16_only_where_it_does_not(requested, device, bf16, expected):
    assert tdl.resolve_precision(requested, device, bf16) == expected


def test_fp16_on_a_cpu_is_refused():
    with pytest.raises(tdl.TrainingError, match="fp16 needs a GPU"):
        tdl.resolve_precision("fp16", "cpu", False)


def test_the_templates_mixed_precision_default_agrees():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    text = (Path(__file__).resolve().parents[1] / "template.yaml").read_text()
    template = yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader that ignores CloudFormation tags
    parameter = template["Parameters"]["MixedPrecision"]
    assert parameter["Default"] == tdl.Hyperparameters().mixed_precision == "bf16"


def test_the_text_encoders_learn_at_their_own_rate():
    models = [torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]
    hp = tdl.Hyperparameters(learning_rate=1e-4, text_encoder_lr=2e-6)
    groups = tdl.make_optimizer(models, hp).param_groups
    assert [g["lr"] for g in groups] == [1e-4, 2e-6, 2e-6]
    assert [g["params"][0] is m.weight for g, m in zip(groups, models, strict=True)] == [True] * 3


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_the_papers(prediction_type):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )
    t = torch.tensor([0, 10, 300, 999])
    alphas = sched.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    expected = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if prediction_type == "v_prediction" else snr)
    torch.testing.assert_close(tdl.sample_weights(sched, t, 5.0), expected)
    assert torch.equal(tdl.sample_weights(sched, t, 0.0), torch.ones(4))


def test_no_mirrored_faces_unless_asked(tmp_path, base_models, dataset, monkeypatch):
    encoded = []
    real = tdl.BaseModel.encode_images

    def spy(self, images):
        encoded.append(len(images))
        return real(self, images)

    monkeypatch.setattr(tdl.BaseModel, "encode_images", spy)
    assert run_main(make_job(tmp_path / "default", base_models["sd"], dataset, max_train_steps=1)) == 0
    flip = make_job(tmp_path / "flip", base_models["sd"], dataset, max_train_steps=1, random_flip="true")
    assert run_main(flip) == 0
    assert encoded == [3, 6]  # 3 crops; mirrored copies only with random_flip
    assert adapter(tmp_path / "default")[1]["random_flip"] is False


def test_min_snr_and_offset_noise_change_the_training(tmp_path, base_models, dataset):
    runs = {}
    for name, extra in {"plain": {}, "snr": {"snr_gamma": 0.5}, "offset": {"noise_offset": 0.1}}.items():
        env = make_job(tmp_path / name, base_models["sd"], dataset, max_train_steps=2, **extra)
        assert run_main(env) == 0
        runs[name] = adapter(tmp_path / name)
    assert runs["snr"][1]["snr_gamma"] == 0.5 and runs["offset"][1]["noise_offset"] == 0.1
    assert runs["plain"][1]["snr_gamma"] is None and runs["plain"][1]["noise_offset"] is None
    losses = {name: info["loss"]["mean"] for name, (_, info) in runs.items()}
    assert len(set(losses.values())) == 3, losses
