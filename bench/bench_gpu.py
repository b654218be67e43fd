"""GPU measurements in one script (`make bench-gpu`; docs/benchmarks.md, "GPU").

On a machine with a CUDA GPU, torch and no network, with random full-size weights built from
the published configs (containers/training/memory_plan.py REFERENCE_CONFIGS; nothing is
downloaded), through the project's own code (the trainer's `train`, the inference `Engine`):

  train_sd15_r4 / train_sd15_r16   SD 1.5, 512 px, batch 1, bf16: steps/s (target >= 10 on an H100)
  train_sdxl / train_sdxl_prior    SDXL, 1024 px, planned as on an A10G (AVATARFLOW_GPU_BUDGET_GIB):
                                   steps/s, peak memory against the plan's estimate
  infer_eager / infer_compiled     SD 1.5, 512 px, 30 steps, CFG 7.5, batch 1: s per image
                                   (target <= 0.75 s on an H100), eager and torch.compile'd UNet
  hotswap_compiled                 users switched on the compiled pipeline: recompiles (must be 0)
  switch                           adapter switch on the resident pipeline, ms (memory-cache replay)

Results: a table on stdout and JSON (--json). `--tiny` runs every section with the tiny random
models on CPU in about a minute (tests/test_bench_gpu.py runs it in `make test`, so the script
cannot rot before a GPU comes); its numbers mean nothing.

What the machine needs besides torch: the project's own code (this repository, on sys.path) and
its Python dependencies. `--wheels DIR` installs them first from wheels in DIR, with no index
(`pip install --no-index --no-deps --require-hashes`, into a folder under --cache). Make DIR on
a machine with network: `python bench/bench_gpu.py --fetch-wheels DIR` (pip download of the
hash-pinned lock/inference-image.txt, torch and its CUDA libraries left out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "lock" / "inference-image.txt"
# The GPU machine brings these itself (torch's own CUDA wheels).
PROVIDED = ("torch", "triton", "nvidia-", "cuda-", "setuptools")


# --------------------------------------------------------------------------- offline wheels
def lock_entries(lock: Path = LOCK) -> list[str]:
    """The hash-pinned requirement entries of `lock` that the GPU machine does not bring."""
    entries, current = [], []
    for line in lock.read_text(encoding="utf-8").splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            if current:
                entries.append("\n".join(current))
            current = [line]
        elif current and line.strip().startswith("--hash"):
            current.append(line)
    if current:
        entries.append("\n".join(current))
    return [e for e in entries if not e.split("==")[0].lower().startswith(PROVIDED)]


def requirements_file(folder: Path) -> Path:
    path = folder / "bench-gpu-requirements.txt"
    path.write_text("\n".join(e.rstrip(" \\") for e in lock_entries()) + "\n", encoding="utf-8")
    return path


def fetch_wheels(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--require-hashes",
            "--only-binary=:all:",
            "--platform",
            "manylinux_2_28_x86_64",
            "--platform",
            "manylinux_2_17_x86_64",
            "--platform",
            "manylinux2014_x86_64",
            "--python-version",
            "3.11",
            "-d",
            str(folder),
            "-r",
            str(requirements_file(folder)),
        ],
        check=True,
    )


def install_wheels(folder: Path, cache: Path) -> None:
    target = cache / "site"
    if not (target / ".installed").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--no-index",
                "--no-deps",
                "--require-hashes",
                "--find-links",
                str(folder),
                "--target",
                str(target),
                "-r",
                str(requirements_file(folder)),
            ],
            check=True,
        )
        (target / ".installed").write_text("ok")
    sys.path.insert(0, str(target))


# --------------------------------------------------------------------------- setup
def setup_paths() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("SAFETY_CHECKER", "off")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    for extra in ("src", "containers/training", "containers/inference", "bench"):
        sys.path.insert(0, str(REPO / extra))


class MemoryS3:
    """The four S3 calls the adapter cache and the engine make, in memory (no moto, no network)."""

    def __init__(self):
        self.objects: dict[tuple[str, str], bytes] = {}

    def put_object(self, Bucket, Key, Body, **_):  # noqa: N803 - boto3's names
        self.objects[(Bucket, Key)] = Body if isinstance(Body, bytes) else Body.read()

    def upload_file(self, path, bucket, key, **_):
        self.objects[(bucket, key)] = Path(path).read_bytes()

    def head_object(self, Bucket, Key):  # noqa: N803
        return {"ContentLength": len(self.objects[(Bucket, Key)])}

    def get_object(self, Bucket, Key):  # noqa: N803
        import io

        return {"Body": io.BytesIO(self.objects[(Bucket, Key)])}

    def download_file(self, bucket, key, path):
        Path(path).write_bytes(self.objects[(bucket, key)])


def build_random(family: str, path: Path, device: str) -> Path:
    """A diffusers folder with the family's full-size architecture and random weights (fp16 on
    disk), built on `device` (seconds on a GPU); the tokenizer is the tiny one (ids are ids)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from memory_plan import REFERENCE_CONFIGS
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from avatarflow.tiny_model import build_tokenizer, sd_scheduler

    if (path / "model_index.json").is_file():
        return path
    configs = REFERENCE_CONFIGS[family]
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    with torch.device(device):
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        encoders = []
        for config in configs["text_encoders"]:
            config = dict(config)
            cls = CLIPTextModelWithProjection if config.pop("projection") else CLIPTextModel
            ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            encoders.append(cls(CLIPTextConfig(**config, **ids)))
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=tokenizer,
            tokenizer_2=build_tokenizer(),
            unet=unet,
            scheduler=sd_scheduler(),
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=encoders[0],
            tokenizer=tokenizer,
            unet=unet,
            scheduler=sd_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=path.parent))
    pipe.to(torch.float16).save_pretrained(tmp)
    tmp.rename(path)
    return path


def make_adapter(base: Path, out: Path, rank: int, seed: int) -> Path:
    """A UNet LoRA adapter (attention projections) saved as the trainer saves it; the LoRA
    matrices are made from the UNet's module shapes on the meta device (no weights loaded)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig

    if (out / "pytorch_lora_weights.safetensors").is_file():
        return out
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base / "unet"))
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(targets):
            layers[f"{name}.lora.down.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.01
            layers[f"{name}.lora.up.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets))
    StableDiffusionPipeline.save_lora_weights(
        out,
        unet_lora_layers={k: v.half() for k, v in layers.items()},
        unet_lora_adapter_metadata=config.to_dict(),
    )
    return out


# --------------------------------------------------------------------------- sections
def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib(reset: bool = False) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    value = torch.cuda.max_memory_allocated() / 2**30
    if reset:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return round(value, 2)


def train_section(base: Path, data: Path, steps: int, warmup: int, **hyperparameters) -> dict:
    """The real trainer under a temp /opt/ml; steps/s = 1 / median step time after warm-up."""
    import contextlib
    import io

    import train_dreambooth_lora as tdl

    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        (root / "input" / "config").mkdir(parents=True)
        values = {
            "max_train_steps": steps,
            "checkpointing_steps": 100_000,
            "validation_images": 0,
            **hyperparameters,
        }
        (root / "input" / "config" / "hyperparameters.json").write_text(
            json.dumps({k: str(v) for k, v in values.items()})
        )
        (root / "input" / "data").mkdir()
        (root / "input" / "data" / "training").symlink_to(data)
        (root / "input" / "data" / "base_model").symlink_to(base)
        paths = tdl.Paths.from_env({"AVATARFLOW_OPT_ML": str(root)})
        peak_gib(reset=True)
        buffer = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(buffer):
            info = tdl.train(paths, tdl.read_hyperparameters(paths), log=print)
        job_s = time.perf_counter() - start
    times = sorted(
        float(line.rsplit("step_time=", 1)[1])
        for line in buffer.getvalue().splitlines()
        if line.startswith("step=")
    )[warmup:]
    median = statistics.median(times)
    return {
        "steps_per_s": round(1 / median, 2),
        "s_per_step": round(median, 4),
        "timed_steps": len(times),
        "job_s": round(job_s, 1),
        "peak_gib": peak_gib(),
        "plan": info["memory_plan"],
        "mixed_precision": info["mixed_precision"],
    }


def engine_for(base: Path, adapters: dict[str, Path], cache: Path, compile_unet: bool, backend: str):
    import torch
    from adapter_cache import AdapterCache
    from inference_engine import Engine, load_base_pipeline

    from avatarflow import keys

    s3 = MemoryS3()
    for user, folder in adapters.items():
        prefix = keys.model_prefix(user, "v1")
        s3.upload_file(folder / keys.ADAPTER_WEIGHTS, "bench", prefix + keys.ADAPTER_WEIGHTS)
        s3.put_object(Bucket="bench", Key=prefix + keys.ADAPTER_CONFIG, Body=b'{"token": "sks"}')
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_base_pipeline(base, device, "bfloat16" if device == "cuda" else "float32")
    if compile_unet:
        os.environ["AVATARFLOW_COMPILE_BACKEND"] = backend
    engine = Engine(
        pipe,
        AdapterCache(s3, "bench", cache),
        s3,
        "bench",
        max_rank=16,
        identity=None,
        compile_unet=compile_unet,
    )
    return engine


def generate(engine, user: str, size: int, steps: int, i: int) -> tuple[float, float]:
    from inference_engine import GenerationRequest

    req = GenerationRequest(
        generation_id=f"g{i}",
        user_id=user,
        model_version="v1",
        prompt="portrait of sks person, studio light",
        num_images=1,
        steps=steps,
        guidance_scale=7.5,
        width=size,
        height=size,
        seed=i,
    )
    sync()
    start = time.perf_counter()
    result = engine.run(req)
    sync()
    return time.perf_counter() - start, result["timings"]["generate_ms"] / 1000


def infer_section(engine, users: list[str], size: int, steps: int, repeats: int) -> dict:
    generate(engine, users[0], size, steps, 0)  # warm-up (and the compile, when compiled)
    runs = [generate(engine, users[0], size, steps, 1 + i) for i in range(repeats)]
    return {
        "s_per_image": round(statistics.median(r[0] for r in runs), 3),
        "generate_s": round(statistics.median(r[1] for r in runs), 3),
        "repeats": repeats,
        "peak_gib": peak_gib(),
    }


def hotswap_section(engine, users: list[str], size: int, steps: int) -> dict:
    """Users one after another on the compiled UNet (same slot rank): every switch a hotswap or a
    replay, never a rebuild, and dynamo compiles no new graph."""
    from torch._dynamo.utils import counters

    def graphs() -> int:
        return int(counters["stats"]["unique_graphs"])

    before, times = graphs(), []
    for i, user in enumerate(users[1:] + users[:1] + users[1:]):
        elapsed, _ = generate(engine, user, size, steps, 100 + i)
        times.append(elapsed)
    return {
        "graphs_before": before,  # > 0: the warm-up compiled the UNet, so the counter is live
        "recompiles": graphs() - before,
        "switches": {k: v for k, v in engine.switches.items() if v},
        "rebuilds": engine.switches["rebuild"],
        "s_per_image": round(statistics.median(times), 3),
    }


def switch_section(engine, users: list[str], repeats: int) -> dict:
    a, b = (engine.cache.get(u, "v1")[0] for u in users[:2])
    samples = []
    for i in range(repeats):
        sync()
        start = time.perf_counter()
        engine.activate(a if i % 2 else b)
        sync()
        samples.append((time.perf_counter() - start) * 1000)
    return {"switch_ms": round(statistics.median(samples[2:] or samples), 3), "repeats": repeats}


# --------------------------------------------------------------------------- main
TARGETS = {
    "train_sd15_r4": ("steps_per_s", ">= 10"),
    "train_sd15_r16": ("steps_per_s", ">= 10"),
    "infer_eager": ("s_per_image", "<= 0.75"),
    "infer_compiled": ("s_per_image", "<= 0.75"),
    "hotswap_compiled": ("recompiles", "== 0"),
}


def table(results: dict) -> str:
    lines = [f"{'section':20s} {'result':58s} target", "-" * 90]
    for name, row in results["sections"].items():
        if "skipped" in row:
            lines.append(f"{name:20s} skipped: {row['skipped']}")
            continue
        keys = [
            k
            for k in ("steps_per_s", "s_per_image", "generate_s", "recompiles", "switch_ms", "peak_gib")
            if row.get(k) is not None
        ]
        text = ", ".join(f"{k}={row[k]}" for k in keys)
        if "plan" in row:
            text += f", plan={row['plan']['estimated_peak_gib']} GiB"
        target = TARGETS.get(name, ("", ""))[1]
        lines.append(f"{name:20s} {text:58s} {target}")
    return "\n".join(lines)


def run(args) -> dict:
    import torch

    tiny = args.tiny
    if not tiny and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device (use --tiny for the CPU run of the same script)")
    deadline = time.monotonic() + args.budget_s
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    from bench_train import write_dataset

    from avatarflow.tiny_model import build_tiny_pipeline

    if tiny:
        bases = {
            "sd15": build_tiny_pipeline(cache / "tiny-sd", "sd"),
            "sdxl": build_tiny_pipeline(cache / "tiny-sdxl", "sdxl", seed=1),
        }
        sd_px, xl_px, infer_px = 64, 64, 64
    else:
        bases = {f: build_random(f, cache / f"random-{f}", device) for f in ("sd15", "sdxl")}
        sd_px, xl_px, infer_px = 512, 1024, 512
    results = {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else "cpu (--tiny: tiny models, numbers meaningless)",
        "torch": torch.__version__,
        "tiny": tiny,
        "sections": {},
    }
    sections = results["sections"]
    a10g_budget = "21.5"  # memory_plan.device_budget_gib of an A10G (ml.g5): SDXL as it runs there

    def timed(name, fn, *fn_args, **fn_kwargs):
        if time.monotonic() > deadline:
            sections[name] = {"skipped": "time budget spent"}
            return None
        start = time.perf_counter()
        try:
            sections[name] = fn(*fn_args, **fn_kwargs) | {"section_s": round(time.perf_counter() - start, 1)}
        except Exception as err:  # one failing section must not hide the others' numbers
            sections[name] = {"skipped": f"{type(err).__name__}: {str(err)[:300]}"}
        print(f"[{time.monotonic() - deadline + args.budget_s:6.1f} s] {name}: {sections[name]}", flush=True)
        return sections[name]

    steps = {"sd": 6 if tiny else 30, "xl": 4 if tiny else 12, "warm": 2 if tiny else 5}
    common = {"mixed_precision": "no" if tiny else "bf16", "train_batch_size": 1}
    with tempfile.TemporaryDirectory() as tmp:
        sd_data = write_dataset(Path(tmp) / "sd", sd_px, 6)
        xl_data = write_dataset(Path(tmp) / "xl", xl_px, 6)
        for rank in (4, 16):
            timed(
                f"train_sd15_r{rank}",
                train_section,
                bases["sd15"],
                sd_data,
                steps["sd"],
                steps["warm"],
                rank=rank,
                resolution=sd_px,
                **common,
            )
        os.environ["AVATARFLOW_GPU_BUDGET_GIB"] = a10g_budget
        try:
            prior = {"prior_preservation": "true", "num_class_images": 2, "class_inference_steps": 4}
            for name, extra in (("train_sdxl", {}), ("train_sdxl_prior", prior)):
                timed(name, train_section, bases["sdxl"], xl_data, steps["xl"], steps["warm"] // 2,
                      rank=16, resolution=xl_px, **extra, **common)
        finally:
            os.environ.pop("AVATARFLOW_GPU_BUDGET_GIB", None)

    adapters = {
        f"user{i}": make_adapter(bases["sd15"], cache / f"adapter-{i}", rank, seed=i)
        for i, rank in enumerate((16, 16, 8))
    }
    users = list(adapters)
    # --tiny proves the script runs (its numbers mean nothing): 4 denoising steps prove that as
    # well as 30, and the suite's run of it (tests/test_bench_gpu.py) spent ~8 s on the other 26.
    n_steps, repeats = (4 if tiny else 30), (2 if tiny else 5)
    eager = engine_for(bases["sd15"], adapters, cache / "adapters-eager", False, args.compile_backend)
    timed("infer_eager", infer_section, eager, users, infer_px, n_steps, repeats)
    timed("switch", switch_section, eager, users, 12 if tiny else 30)
    del eager
    peak_gib(reset=True)
    compiled = engine_for(bases["sd15"], adapters, cache / "adapters-compiled", True, args.compile_backend)
    timed("infer_compiled", infer_section, compiled, users, infer_px, n_steps, repeats)
    timed("hotswap_compiled", hotswap_section, compiled, users, infer_px, 4 if tiny else n_steps)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models on CPU: checks the script, not a GPU"
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--cache", default=str(REPO / ".cache" / "bench-gpu"), help="random models, wheels")
    parser.add_argument("--budget-s", type=float, default=450.0, help="sections past this are skipped")
    parser.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (inductor; tiny: aot_eager)"
    )
    parser.add_argument(
        "--wheels", help="install the dependencies from wheels in this folder first (no index)"
    )
    parser.add_argument(
        "--fetch-wheels", metavar="DIR", help="download those wheels into DIR (needs network)"
    )
    args = parser.parse_args(argv)
    if args.fetch_wheels:
        fetch_wheels(Path(args.fetch_wheels))
        return 0
    if args.wheels:
        install_wheels(Path(args.wheels), Path(args.cache))
    args.compile_backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
    setup_paths()
    if args.tiny:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = run(args)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
