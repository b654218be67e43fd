"""Training speed of the DreamBooth-LoRA container (`make bench-train`).

CPU (default): the tiny random model at 64 px, a few configurations side by side, seconds per
step (median of the timed steps; the first steps are warm-up and not counted).

--gpu: Stable Diffusion 1.5's full-size architecture (UNet 860M, VAE, CLIP ViT-L text encoder)
with random weights built from config (no download), 512 px, batch 1, bf16, LoRA rank 4 and
16, with and without prior preservation; steps/s and peak GPU memory.

Every configuration runs the real entrypoint code (train_dreambooth_lora.train) under a temp
/opt/ml, so what is measured is what SageMaker runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "containers" / "training"))
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import train_dreambooth_lora as tdl  # noqa: E402

from avatarflow.tiny_model import build_tiny_pipeline, build_tokenizer, sd_scheduler  # noqa: E402

FACE_BOXES = {
    "astronaut": (150, 20, 310, 180),
    "grace_hopper": (150, 60, 370, 280),
    "camera": (190, 30, 320, 160),
}


def write_dataset(folder: Path, size: int, count: int) -> Path:
    """Face crops from the shipped sample photos (mirrored/rotated copies to reach `count`)."""
    from PIL import Image

    from avatarflow.sample_photos import photo

    (folder / "images").mkdir(parents=True)
    crops = [photo(n).crop(b).resize((size, size), Image.Resampling.LANCZOS) for n, b in FACE_BOXES.items()]
    for i in range(count):
        img = crops[i % len(crops)].rotate(3 * (i // len(crops)), resample=Image.Resampling.BICUBIC)
        img.save(folder / "images" / f"{i:03d}.png")
    (folder / "manifest.json").write_text(json.dumps({"photos": [], "reference_embedding": [0.0] * 128}))
    return folder


def build_sd15_random(path: Path) -> Path:
    """SD 1.5's architecture (configs as published in runwayml/stable-diffusion-v1-5) with
    random weights; the tokenizer is the tiny one (ids are ids: speed does not depend on it)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if (path / "model_index.json").is_file():
        return path
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = sd_scheduler()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(path)  # half the disk; training casts anyway
    return path


def run_one(base: Path, dataset: Path, warmup: int, **hyperparameters) -> dict:
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        (root / "input" / "config").mkdir(parents=True)
        (root / "input" / "config" / "hyperparameters.json").write_text(
            json.dumps({k: str(v) for k, v in hyperparameters.items()})
        )
        (root / "input" / "data").mkdir(parents=True)
        (root / "input" / "data" / "training").symlink_to(dataset)
        (root / "input" / "data" / "base_model").symlink_to(base)
        paths = tdl.Paths.from_env({"AVATARFLOW_OPT_ML": str(root)})
        hp = tdl.read_hyperparameters(paths)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        lines: list[str] = []
        start = time.perf_counter()
        # step lines go to stdout through tqdm.write; capture them to time the steady state
        import contextlib
        import io

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            tdl.train(paths, hp, log=lambda m: None)
        total = time.perf_counter() - start
        lines = [ln for ln in buffer.getvalue().splitlines() if ln.startswith("step=")]
        times = [float(ln.rsplit("step_time=", 1)[1]) for ln in lines][warmup:]
        times.sort()
        median = times[len(times) // 2]
        return {
            "s_per_step": median,
            "steps_per_s": 1.0 / median,
            "timed_steps": len(times),
            "job_s": total,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        }


def cpu(args) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_dataset(tmp / "data", 64, 6)
        bases = {v: build_tiny_pipeline(tmp / v, variant=v) for v in ("sd", "sdxl")}
        common = {
            "max_train_steps": args.steps,
            "resolution": 64,
            "mixed_precision": "no",
            "checkpointing_steps": 1000,
        }
        configs = [
            ("tiny SD, rank 4", "sd", {"rank": 4}),
            ("tiny SD, rank 16", "sd", {"rank": 16}),
            (
                "tiny SD, rank 4, prior preservation",
                "sd",
                {"rank": 4, "prior_preservation": "true", "num_class_images": 4, "class_inference_steps": 2},
            ),
            ("tiny SD, rank 4, text encoder LoRA", "sd", {"rank": 4, "train_text_encoder": "true"}),
            ("tiny SD, rank 4, gradient checkpointing", "sd", {"rank": 4, "gradient_checkpointing": "true"}),
            ("tiny SDXL, rank 4", "sdxl", {"rank": 4}),
        ]
        for name, variant, hps in configs:
            row = {"config": name} | run_one(bases[variant], data, warmup=2, **(common | hps))
            rows.append(row)
            print(
                f"{name:45s} {row['s_per_step'] * 1000:8.1f} ms/step  ({row['job_s']:.1f} s job)", flush=True
            )
    return rows


def gpu(args) -> list[dict]:
    if not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device")
    rows = []
    cache = Path(args.cache or tempfile.mkdtemp(prefix="sd15-random-"))
    base = build_sd15_random(cache / "sd15")
    data = write_dataset(Path(tempfile.mkdtemp(prefix="bench-data-")), 512, 12)
    common = {
        "max_train_steps": args.steps,
        "resolution": 512,
        "train_batch_size": 1,
        "mixed_precision": "bf16",
        "checkpointing_steps": 100_000,
        "num_class_images": 8,
        "class_inference_steps": 10,
    }
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for rank in (4, 16):
        for prior in (False, True):
            name = f"SD1.5 arch, 512px, bf16, rank {rank}, prior {'on' if prior else 'off'}"
            hps = common | {"rank": rank, "prior_preservation": str(prior).lower()}
            row = {"config": name} | run_one(base, data, warmup=10, **hps)
            rows.append(row)
            print(
                f"{name:50s} {row['steps_per_s']:6.2f} steps/s  {row['s_per_step'] * 1000:7.1f} ms/step  "
                f"peak {row['peak_gpu_gib']:.1f} GiB",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="SD 1.5 full-size architecture on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="steps per configuration")
    parser.add_argument("--cache", help="folder to keep the random SD 1.5 model between runs (--gpu)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    args.steps = args.steps or (60 if args.gpu else 12)
    rows = gpu(args) if args.gpu else cpu(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
