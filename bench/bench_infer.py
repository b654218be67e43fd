"""Inference container speed (`make bench-infer`).

CPU (default), side by side in one run, with Stable Diffusion 1.5's FULL-SIZE architecture
(UNet 860M, VAE, CLIP ViT-L text encoder; random weights built from config, saved once as an
fp16 diffusers folder under .cache/bench/, never downloaded) and LoRA adapters of rank 4 and
16 on the UNet attention projections:

* load: a full pipeline from local disk (what a per-user multi-model endpoint pays per user);
* switch: the engine's per-user switch on the resident pipeline (adapter already in the
  memory cache: an in-place hotswap), and from the local disk cache (read + parse + swap).

Medians of several repeats; the ratio load / switch is the headline (target >= 100x).

--gpu: 512 px, 30 steps, CFG 7.5, bf16, SDPA (optionally --compile), a user adapter hot-swapped
in: seconds per image at batch 1 and images/s at batch 4 (target <= 0.75 s/image on an H100).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
    os.environ[name] = "bench"  # moto only: never real credentials
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
REPO = Path(__file__).resolve().parents[1]
for extra in (REPO / "src", REPO / "containers" / "inference", REPO / "bench"):
    sys.path.insert(0, str(extra))

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from adapter_cache import AdapterCache  # noqa: E402
from inference_engine import Engine, GenerationRequest, load_base_pipeline  # noqa: E402

from avatarflow import keys  # noqa: E402

BUCKET = "bench-infer"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build_base(cache: Path) -> Path:
    # The same SD 1.5-shaped random model the training bench uses (one builder, one cache).
    from bench_train import build_sd15_random

    return build_sd15_random(cache / "sd15")


def make_adapter(base: Path, out: Path, rank: int, seed: int) -> Path:
    """A DreamBooth-LoRA-shaped adapter for the full-size UNet, saved like the trainer does."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    if (out / keys.ADAPTER_WEIGHTS).is_file():
        return out
    unet = UNet2DConditionModel.from_pretrained(base / "unet", dtype=torch.float16)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights="gaussian")
    unet.add_adapter(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        out,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet_lora_adapter_metadata=config.to_dict(),
    )
    del unet
    return out


def publish(s3, folder: Path, user: str) -> None:
    prefix = keys.model_prefix(user, "v1")
    s3.upload_file(str(folder / keys.ADAPTER_WEIGHTS), BUCKET, prefix + keys.ADAPTER_WEIGHTS)
    s3.put_object(Bucket=BUCKET, Key=prefix + keys.ADAPTER_CONFIG, Body=json.dumps({"token": "sks"}))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def publish_adapters(base: Path, cache_dir: Path, ranks: list[int]):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    users = {}
    for rank in ranks:
        for j in range(2):
            user = f"r{rank}-user{j}"
            publish(s3, make_adapter(base, cache_dir / "adapters" / user, rank, seed=rank * 10 + j), user)
            users[user] = rank
    return s3, users


def cpu_bench(args) -> dict:
    from moto import mock_aws

    cache_dir = Path(args.cache)
    t = time.perf_counter()
    base = build_base(cache_dir)
    build_s = round(time.perf_counter() - t, 1)
    ranks = [4, 16]
    with mock_aws():
        s3, users = publish_adapters(base, cache_dir, ranks)

        # 1. Full pipeline load from local disk (fp16 files -> fp32 on CPU), as many times as asked;
        # the last one stays resident for the switch measurements.
        loads, pipe = [], None
        for _ in range(args.load_repeats):
            pipe = None  # free the previous copy first: ~4 GB each in fp32
            start = time.perf_counter()
            pipe = load_base_pipeline(base, "cpu")
            loads.append((time.perf_counter() - start) * 1000)

        cache = AdapterCache(s3, BUCKET, cache_dir / "adapter-cache", max_memory_count=16)
        engine = Engine(pipe, cache, s3, BUCKET, max_rank=max(ranks), identity=None)

        first_use = {}
        for user in users:  # first use: S3 fetch + parse + load into the slot
            first_use[user] = timed(lambda u=user: engine.activate(cache.get(u, "v1")[0]))

        switch = {}
        for rank in ranks:
            a, b = (cache.get(f"r{rank}-user{j}", "v1")[0] for j in range(2))
            samples = []
            for i in range(args.switch_repeats):
                target = a if i % 2 else b
                samples.append(timed(lambda t=target: engine.activate(t)))
            switch[rank] = samples

        official = {}  # the same switch through diffusers' load_lora_into_unet(hotswap=True) every time
        for rank in ranks:
            a, b = (cache.get(f"r{rank}-user{j}", "v1")[0] for j in range(2))
            samples = []
            for i in range(args.switch_repeats):
                target = a if i % 2 else b
                target.swap_plan = None
                samples.append(timed(lambda t=target: engine.activate(t)))
            official[rank] = samples

        from_disk = {}
        for rank in ranks:
            samples = []
            for i in range(args.switch_repeats):
                user = f"r{rank}-user{i % 2}"
                cache.memory.pop((user, "v1"), None)  # evicted from memory, still on disk
                engine.active = None

                def go(u=user):
                    adapter, source, _ = cache.get(u, "v1")
                    assert source == "disk"
                    engine.activate(adapter)

                samples.append(timed(go))
            from_disk[rank] = samples

        gen = None
        if args.generate:
            req = GenerationRequest(
                generation_id="bench",
                user_id="r4-user0",
                model_version="v1",
                prompt="portrait of sks person",
                num_images=1,
                steps=1,
                width=256,
                height=256,
                seed=1,
            )
            gen = engine.run(req)["timings"]

    load_ms = median(loads)
    result = {
        "mode": "cpu",
        "threads": torch.get_num_threads(),
        "base": "SD 1.5 architecture, random weights, fp16 on disk, fp32 in memory",
        "base_build_or_reuse_s": build_s,
        "pipeline_load_ms": {"median": load_ms, "samples": [round(x) for x in loads]},
        "first_use_ms": {u: round(v, 1) for u, v in first_use.items()},
        "switch_memory_ms": {f"r{r}": median(v) for r, v in switch.items()},
        "switch_diffusers_hotswap_ms": {f"r{r}": median(v) for r, v in official.items()},
        "switch_disk_ms": {f"r{r}": median(v) for r, v in from_disk.items()},
        "ratio_load_over_switch_memory": {f"r{r}": round(load_ms / median(v)) for r, v in switch.items()},
        "ratio_load_over_diffusers_hotswap": {
            f"r{r}": round(load_ms / median(v)) for r, v in official.items()
        },
        "ratio_load_over_switch_disk": {f"r{r}": round(load_ms / median(v)) for r, v in from_disk.items()},
        "adapter_bytes": {
            f"r{r}": (cache_dir / "adapters" / f"r{r}-user0" / keys.ADAPTER_WEIGHTS).stat().st_size
            for r in ranks
        },
        "switch_modes": engine.switches,
        "repeats": {"load": args.load_repeats, "switch": args.switch_repeats},
    }
    if gen:
        result["one_step_256px_generation_timings_ms"] = gen
    return result


def gpu_bench(args) -> dict:
    """Not run in the CPU-only development session: see docs/benchmarks.md."""
    from moto import mock_aws

    assert torch.cuda.is_available(), "--gpu needs a CUDA device"
    cache_dir = Path(args.cache)
    base = build_base(cache_dir)
    with mock_aws():
        s3, users = publish_adapters(base, cache_dir, [4, 16])
        pipe = load_base_pipeline(base, "cuda", "bfloat16")
        cache = AdapterCache(s3, BUCKET, cache_dir / "adapter-cache-gpu")
        engine = Engine(pipe, cache, s3, BUCKET, max_rank=16, identity=None, compile_unet=args.compile)

        def run(user: str, n: int, i: int) -> float:
            req = GenerationRequest(
                generation_id=f"g{i}",
                user_id=user,
                model_version="v1",
                prompt="portrait of sks person, studio light",
                num_images=n,
                steps=30,
                guidance_scale=7.5,
                width=512,
                height=512,
                seed=i,
            )
            torch.cuda.synchronize()
            start = time.perf_counter()
            engine.run(req)
            torch.cuda.synchronize()
            return time.perf_counter() - start

        for i, user in enumerate(users):  # warm-up: kernels, cuDNN autotune, compile
            run(user, 1, i)
        user_list = list(users)
        b1 = [run(user_list[i % len(user_list)], 1, 100 + i) for i in range(args.gpu_repeats)]
        b4 = [run(user_list[i % len(user_list)], 4, 200 + i) for i in range(args.gpu_repeats)]
        switch = []
        a, b = (cache.get(u, "v1")[0] for u in user_list[:2])
        for i in range(10):
            torch.cuda.synchronize()
            start = time.perf_counter()
            engine.activate(a if i % 2 else b)
            torch.cuda.synchronize()
            switch.append((time.perf_counter() - start) * 1000)
    return {
        "mode": "gpu",
        "device": torch.cuda.get_device_name(),
        "compile": args.compile,
        "s_per_image_batch1": round(statistics.median(b1), 3),
        "images_per_s_batch4": round(4 / statistics.median(b4), 2),
        "s_per_image_batch4": round(statistics.median(b4) / 4, 3),
        "switch_ms": median(switch),
        "switch_modes": engine.switches,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "note": "end to end per request: generation, PNG encode, S3 (moto) writes; 512 px, 30 steps, CFG 7.5",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache", default=str(REPO / ".cache" / "bench"), help="keeps the random SD 1.5 model"
    )
    parser.add_argument("--load-repeats", type=int, default=3)
    parser.add_argument("--switch-repeats", type=int, default=10)
    parser.add_argument("--generate", action="store_true", help="also one 1-step 256 px generation (CPU)")
    parser.add_argument("--gpu", action="store_true", help="512 px, 30 steps, CFG latency on a CUDA GPU")
    parser.add_argument("--compile", action="store_true", help="--gpu: torch.compile the UNet (hotswap-safe)")
    parser.add_argument("--gpu-repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    result = gpu_bench(args) if args.gpu else cpu_bench(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
