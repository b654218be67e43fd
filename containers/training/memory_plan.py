"""GPU memory of a DreamBooth-LoRA job, measured before the job touches the GPU, and the plan
chosen from it: gradient checkpointing, text encoders off the GPU, micro-batch.

Why measured and not guessed: SDXL at 1024 px on a 24 GB A10G sits right at the edge (15-19 GiB
at batch 1, over 22 GiB with prior preservation or text-encoder training), and the answer
depends on the model's own config (attention layout, block depths), the resolution, the batch
and the options. So the job runs its own UNet (and text encoders when they train) once, forward
and backward, on the META device: modules built from the base model's config files, no weights
read, no arithmetic done, only shapes. Three pieces make that pass count what a GPU step holds:

* `StorageTracker` (a TorchDispatchMode, below autograd) adds up every tensor storage created
  while it is alive and subtracts it when the storage is freed: the peak is the step's peak of
  saved activations, temporaries and gradients.
* `GpuAutocast` (a TorchFunctionMode, above autograd, like torch.autocast) casts what CUDA
  autocast casts: matmuls/convolutions/linear to the low-precision dtype, normalisations,
  softmax and the loss to fp32; the casts happen before autograd records the op, so the copies
  autograd keeps are the ones a GPU keeps.
* attention goes to the flash kernel's op (mem-efficient for fp32), which on a GPU keeps only
  the output and log-sum-exp; the meta device would otherwise take SDPA's math path and count
  the full attention matrix.

Weights, LoRA parameters and AdamW's two moments are counted from the modules; CUDA context,
allocator fragmentation and cuBLAS/cuDNN workspaces are an allowance (FRAGMENTATION,
WORKSPACE_GIB) until `make bench-gpu` measures them (bench/bench_gpu.py prints the plan's
estimate next to torch.cuda.max_memory_allocated()).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import weakref
from contextlib import nullcontext
from pathlib import Path
from typing import Any

GIB = 2**30
# Allowances for what the meta pass cannot see (to be calibrated on a GPU by bench/bench_gpu.py):
# the caching allocator's fragmentation on the dynamic part, cuBLAS/cuDNN workspaces.
FRAGMENTATION = 1.10
WORKSPACE_GIB = 0.75
# What a job may plan for on a device of `total` bytes: the CUDA context (~0.5 GiB) and a margin
# stay free. On an A10G (22.5 GiB visible) this is 21.5 GiB.
CONTEXT_GIB = 1.0


# --------------------------------------------------------------------------- reference configs
# The published configs of the base models this project trains on (diffusers' config.json of
# runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 and
# stabilityai/stable-diffusion-xl-base-1.0), so plans and benchmarks for the full-size models
# can be made offline. A job plans from its own base model folder's configs instead.
_CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
}
_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32,
    "in_channels": 3,
    "out_channels": 3,
}
REFERENCE_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": {
        "native_resolution": 512,
        "unet": {
            "sample_size": 64,
            "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "down_block_types": [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        },
        "text_encoders": [dict(_CLIP_L, projection=False)],
        "vae": dict(_VAE, sample_size=512),
    },
    "sd21": {
        "native_resolution": 768,
        "unet": {
            "sample_size": 96,
            "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
            "upcast_attention": True,
            "down_block_types": [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        },
        "text_encoders": [
            {
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_attention_heads": 16,
                "num_hidden_layers": 23,
                "hidden_act": "gelu",
                "projection_dim": 512,
                "vocab_size": 49408,
                "max_position_embeddings": 77,
                "projection": False,
            }
        ],
        "vae": dict(_VAE, sample_size=768),
    },
    "sdxl": {
        "native_resolution": 1024,
        "unet": {
            "sample_size": 128,
            "block_out_channels": [320, 640, 1280],
            "layers_per_block": 2,
            "cross_attention_dim": 2048,
            "attention_head_dim": [5, 10, 20],
            "use_linear_projection": True,
            "transformer_layers_per_block": [1, 2, 10],
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        },
        "text_encoders": [
            dict(_CLIP_L, projection=False),
            {
                "hidden_size": 1280,
                "intermediate_size": 5120,
                "num_attention_heads": 20,
                "num_hidden_layers": 32,
                "hidden_act": "gelu",
                "projection_dim": 1280,
                "vocab_size": 49408,
                "max_position_embeddings": 77,
                "projection": True,
            },
        ],
        "vae": dict(_VAE, sample_size=1024, force_upcast=True),
    },
}


def folder_configs(folder: Path) -> dict[str, Any]:
    """The same structure as REFERENCE_CONFIGS, read from a diffusers folder's config files."""

    def read(sub: str) -> dict[str, Any]:
        return json.loads((folder / sub / "config.json").read_text(encoding="utf-8"))

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    encoders = []
    for name in ("text_encoder", "text_encoder_2"):
        if name in index and (folder / name / "config.json").is_file():
            config = read(name)
            config["projection"] = "WithProjection" in str(index[name])
            encoders.append(config)
    unet = read("unet")
    vae_scale = 2 ** (len(read("vae")["block_out_channels"]) - 1)
    return {
        "native_resolution": unet["sample_size"] * vae_scale,
        "unet": unet,
        "text_encoders": encoders,
        "vae": read("vae"),
    }


# --------------------------------------------------------------------------- the meta pass
def _torch():
    import torch

    return torch


class StorageTracker:
    """Live and peak bytes of every storage created inside it (a TorchDispatchMode, so every
    aten op's outputs are seen, autograd's saved tensors and gradients included). Storages that
    existed before (weights) are not counted: they are added from the modules."""

    def __new__(cls, *args, **kwargs):
        from torch.utils._python_dispatch import TorchDispatchMode

        class _Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.live = 0
                self.peak = 0
                self._seen: dict[int, Any] = {}

            def ignore(self, tensors) -> None:
                for t in tensors:
                    self._seen.setdefault(t.untyped_storage()._cdata, None)

            def _track(self, tensor) -> None:
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key in self._seen:
                    return
                size = storage.nbytes()
                self.live += size
                self.peak = max(self.peak, self.live)

                def freed(key=key, size=size) -> None:
                    self.live -= size
                    self._seen.pop(key, None)

                self._seen[key] = weakref.finalize(storage, freed)

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                from torch.utils._pytree import tree_flatten

                out = func(*args, **(kwargs or {}))
                for item in tree_flatten(out)[0]:
                    if isinstance(item, _torch().Tensor):
                        self._track(item)
                return out

        return _Mode()


def _gpu_autocast_mode(low):
    """A TorchFunctionMode doing what torch.autocast('cuda', dtype=low) does to the ops a
    diffusion UNet and CLIP use (the meta device has no autocast of its own)."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    to_low = {
        F.linear,
        F.conv2d,
        F.conv_transpose2d,
        torch.matmul,
        torch.bmm,
        torch.baddbmm,
        torch.mm,
        torch.addmm,
        torch.Tensor.__matmul__,
        torch.Tensor.matmul,
        torch.Tensor.bmm,
    }
    to_fp32 = {
        F.group_norm,
        F.layer_norm,
        F.softmax,
        F.log_softmax,
        torch.softmax,
        torch.Tensor.softmax,
        F.mse_loss,
        torch.exp,
        torch.Tensor.exp,
        torch.pow,
        torch.Tensor.pow,
        F.softplus,
    }

    def cast(value, dtype):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
            return value.to(dtype)
        if isinstance(value, list | tuple):
            return type(value)(cast(v, dtype) for v in value)
        return value

    class GpuAutocast(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                return _fused_attention(*cast(args, low), **{k: cast(v, low) for k, v in kwargs.items()})
            if func in to_low:
                args, kwargs = cast(args, low), {k: cast(v, low) for k, v in kwargs.items()}
            elif func in to_fp32:
                args = cast(args, torch.float32)
            return func(*args, **kwargs)

    return GpuAutocast()


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """What SDPA runs on a GPU: flash attention for fp16/bf16 (head dim <= 256, no mask), else
    the memory-efficient kernel; both keep O(tokens) state for backward, not the score matrix."""
    torch = _torch()
    aten = torch.ops.aten
    if attn_mask is None and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256:
        return aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale
        )[0]
    grad = any(t.requires_grad for t in (query, key, value))
    return aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, grad, dropout_p, is_causal, scale=scale
    )[0]


@dataclasses.dataclass(frozen=True)
class Step:
    """One training step's shape: what the meta pass runs."""

    resolution: int
    unet_batch: int  # samples through the UNet per forward (instance + class with prior preservation)
    rank: int
    checkpointing: bool
    train_text_encoder: bool
    low_precision: str = "bf16"  # bf16 | fp16 | fp32 (mixed_precision "no")


def _dtype(name: str):
    torch = _torch()
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _unet_targets() -> list[str]:
    return ["to_q", "to_k", "to_v", "to_out.0"]


def _text_targets() -> list[str]:
    return ["q_proj", "k_proj", "v_proj", "out_proj"]


def _meta_modules(configs_json: str, step: Step, device: str = "meta"):
    """UNet (+ text encoders) on the meta device (or, to calibrate the meta pass, real CPU
    tensors), frozen weights in the low-precision dtype, LoRA in fp32, as the trainer sets them
    up."""
    torch = _torch()
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = json.loads(configs_json)
    low = _dtype(step.low_precision)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        encoders = []
        for config in configs["text_encoders"]:
            config = dict(config)
            projection = config.pop("projection", False)
            cls = CLIPTextModelWithProjection if projection else CLIPTextModel
            known = {k: v for k, v in config.items() if not k.startswith("_")}
            encoders.append(cls(CLIPTextConfig(**known)))
    trained = [unet] + (encoders if step.train_text_encoder else [])
    for model in [unet, *encoders]:
        model.requires_grad_(False)
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.data = t.data.to(low)
    with torch.device(device):
        unet.add_adapter(LoraConfig(r=step.rank, lora_alpha=step.rank, target_modules=_unet_targets()))
        if step.train_text_encoder:
            for te in encoders:
                te.add_adapter(LoraConfig(r=step.rank, lora_alpha=step.rank, target_modules=_text_targets()))
    for model in trained:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if step.checkpointing:
            # Recomputation runs inside backward, where the autocast emulation is not active:
            # hand checkpoint a context for it, as torch.autocast's state is handed over.
            recompute = functools.partial(_recompute_context, device, low)
            kwargs = {"use_reentrant": False, "context_fn": recompute}
            if model is unet:
                model.enable_gradient_checkpointing(functools.partial(_checkpoint_call, kwargs=kwargs))
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()
    return unet, encoders, configs


def _recompute_context(device: str, low):
    return nullcontext(), (_gpu_autocast_mode(low) if device == "meta" else nullcontext())


def _checkpoint_call(module, *args, kwargs):
    return _torch().utils.checkpoint.checkpoint(module.__call__, *args, **kwargs)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@functools.lru_cache(maxsize=64)
def measure_step(configs_json: str, step: Step, vae_scale: int = 8, device: str = "meta") -> dict[str, int]:
    """Bytes of one training step, measured on the meta device: `weights` (frozen UNet, and text
    encoders when they train), `trainable` (LoRA, fp32), `text_encoders` (frozen encoders that
    could be offloaded), and `step_peak` (activations + temporaries + gradients at the step's
    peak, forward and backward, the optimizer update included). device="cpu" runs the same step
    on real CPU tensors (fp32 only: no autocast emulation there), to calibrate the meta pass."""
    torch = _torch()
    unet, encoders, configs = _meta_modules(configs_json, step, device)
    low = _dtype(step.low_precision)
    b = step.unet_batch
    latent = step.resolution // vae_scale
    tracker = StorageTracker()
    everything = [t for m in [unet, *encoders] for t in [*m.parameters(), *m.buffers()]]
    tracker.ignore(everything)
    trainable = [p for m in [unet, *encoders] for p in m.parameters() if p.requires_grad]
    unet_cfg = configs["unet"]
    with torch.device(device):
        noisy = torch.randn(b, unet_cfg.get("in_channels", 4), latent, latent, dtype=low)
        timesteps = torch.zeros(b, dtype=torch.long)
        target = torch.randn(b, unet_cfg.get("out_channels", 4), latent, latent)
        ids = torch.zeros(b, 77, dtype=torch.long)
        cached = torch.randn(b, 77, unet_cfg["cross_attention_dim"], dtype=low)
        pooled_dim = next((c["projection_dim"] for c in configs["text_encoders"] if c.get("projection")), 0)
        text_embeds = torch.randn(b, pooled_dim, dtype=low)
        time_ids = torch.zeros(b, 6, dtype=low)
    tracker.ignore([noisy, timesteps, target, ids, cached, text_embeds, time_ids])  # cached on the GPU
    autocast = _gpu_autocast_mode(low) if device == "meta" else nullcontext()
    with tracker, autocast:
        if step.train_text_encoder:
            hidden, pooled = [], None
            for te in encoders:
                out = te(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2] if len(encoders) > 1 else out[0])
                pooled = out[0] if len(encoders) > 1 else None
            embeds = torch.cat(hidden, dim=-1)
            extra = {"text_embeds": pooled, "time_ids": time_ids} if pooled is not None else None
        else:
            embeds = cached
            extra = {"text_embeds": text_embeds, "time_ids": time_ids} if pooled_dim else None
        pred = unet(noisy, timesteps, embeds, added_cond_kwargs=extra).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        del pred, embeds
        loss.backward()
        del loss
        # AdamW's update: fp32 moments exist from the first step (counted as static below);
        # its foreach temporaries are about the size of the trainable parameters, twice.
        temporaries = [torch.empty_like(p) for p in trainable for _ in range(2)]
        del temporaries
    frozen_te = [] if step.train_text_encoder else encoders
    return {
        "weights": _bytes(
            p for m in [unet, *([] if frozen_te else encoders)] for p in m.parameters() if not p.requires_grad
        )
        + _bytes(b for m in [unet] for b in m.buffers()),
        "trainable": _bytes(trainable),
        "text_encoders": _bytes(p for m in frozen_te for p in m.parameters()),
        "step_peak": tracker.peak,
    }


# --------------------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True)
class Option:
    checkpointing: bool
    offload_text_encoders: bool
    micro_batch: int
    gib: float  # estimated peak, allowances included
    parts: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the job runs with, and why: every option tried, in the order tried."""

    budget_gib: float | None
    resolution: int
    batch: int
    prior_preservation: bool
    train_text_encoder: bool
    chosen: Option
    tried: tuple[Option, ...]
    fits: bool

    @property
    def accumulation(self) -> int:
        return self.batch // self.chosen.micro_batch

    def lines(self) -> list[str]:
        budget = f"{self.budget_gib:.1f} GiB" if self.budget_gib else "no GPU limit"
        out = [
            f"memory plan ({budget}; resolution {self.resolution}, batch {self.batch}, prior preservation "
            f"{'on' if self.prior_preservation else 'off'}, text encoder training "
            f"{'on' if self.train_text_encoder else 'off'}):"
        ]
        for option in self.tried:
            mark = "->" if option == self.chosen else "  "
            parts = ", ".join(f"{k} {v:.2f}" for k, v in option.parts.items())
            out.append(
                f" {mark} checkpointing {'on ' if option.checkpointing else 'off'} text encoders "
                f"{'offloaded' if option.offload_text_encoders else 'on GPU  '} "
                f"micro-batch {option.micro_batch}: {option.gib:.2f} GiB ({parts})"
            )
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "budget_gib": self.budget_gib,
            "fits": self.fits,
            "estimated_peak_gib": round(self.chosen.gib, 3),
            "gradient_checkpointing": self.chosen.checkpointing,
            "offload_text_encoders": self.chosen.offload_text_encoders,
            "micro_batch": self.chosen.micro_batch,
            "gradient_accumulation": self.accumulation,
        }


def estimate(
    configs: dict[str, Any],
    resolution: int,
    micro_batch: int,
    *,
    prior_preservation: bool,
    train_text_encoder: bool,
    rank: int,
    checkpointing: bool,
    offload_text_encoders: bool,
    low_precision: str = "bf16",
) -> Option:
    """Peak GiB of a step: static (frozen weights, text encoders unless offloaded, LoRA and its
    two AdamW moments) + the measured step peak x FRAGMENTATION + WORKSPACE_GIB."""
    vae_scale = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    step = Step(
        resolution,
        micro_batch * (2 if prior_preservation else 1),
        rank,
        checkpointing,
        train_text_encoder,
        low_precision,
    )
    m = measure_step(json.dumps(configs, sort_keys=True), step, vae_scale)
    parts = {
        "weights": m["weights"] / GIB,
        "text_encoders": 0.0 if offload_text_encoders else m["text_encoders"] / GIB,
        "lora+adam": 3 * m["trainable"] / GIB,
        "step": m["step_peak"] * FRAGMENTATION / GIB,
        "workspace": WORKSPACE_GIB,
    }
    return Option(
        checkpointing,
        offload_text_encoders,
        micro_batch,
        sum(parts.values()),
        {k: round(v, 3) for k, v in parts.items()},
    )


def make_plan(
    configs: dict[str, Any],
    resolution: int,
    batch: int,
    *,
    prior_preservation: bool,
    train_text_encoder: bool,
    rank: int,
    budget_gib: float | None,
    low_precision: str = "bf16",
    checkpointing: bool | None = None,
) -> Plan:
    """The fastest setup that fits `budget_gib`: frozen text encoders go to the CPU once their
    embeddings are cached (free: they are never called again); then gradient checkpointing
    (~30 % slower steps); then smaller micro-batches with gradient accumulation, down to 1.
    `checkpointing` True/False forces it (hyperparameter), None lets the plan choose. Without a
    budget (CPU), the first option is taken."""
    offload = not train_text_encoder
    ckpt_options = [checkpointing] if checkpointing is not None else [False, True]
    micro_batches = [b for b in range(batch, 0, -1) if batch % b == 0]
    tried: list[Option] = []
    for micro in micro_batches:
        for ckpt in ckpt_options:
            option = estimate(
                configs,
                resolution,
                micro,
                prior_preservation=prior_preservation,
                train_text_encoder=train_text_encoder,
                rank=rank,
                checkpointing=ckpt,
                offload_text_encoders=offload,
                low_precision=low_precision,
            )
            tried.append(option)
            if budget_gib is None or option.gib <= budget_gib:
                return Plan(
                    budget_gib,
                    resolution,
                    batch,
                    prior_preservation,
                    train_text_encoder,
                    option,
                    tuple(tried),
                    True,
                )
    best = min(tried, key=lambda o: o.gib)
    return Plan(
        budget_gib, resolution, batch, prior_preservation, train_text_encoder, best, tuple(tried), False
    )


def device_budget_gib(total_bytes: int) -> float:
    return total_bytes / GIB - CONTEXT_GIB


# --------------------------------------------------------------------------- serving
@functools.lru_cache(maxsize=16)
def measure_generation(
    configs_json: str, resolution: int, num_images: int, sliced_decode: bool, low_precision: str = "bf16"
) -> dict[str, int]:
    """Bytes of one generation on the inference endpoint, measured on the meta device: the
    resident `weights` (UNet, text encoders, VAE; the VAE in fp32 when its config says
    force_upcast, as diffusers runs SDXL's), the UNet's peak for one guided step (batch
    2 x num_images) and the VAE decode's peak, for all images at once or one at a time."""
    torch = _torch()
    from diffusers import AutoencoderKL

    configs = json.loads(configs_json)
    low = _dtype(low_precision)
    step = Step(resolution, 2 * num_images, 4, False, False, low_precision)
    unet, encoders, _ = _meta_modules(configs_json, step)
    vae_config = {k: v for k, v in configs["vae"].items() if not k.startswith("_")}
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config)
    vae_dtype = torch.float32 if vae_config.get("force_upcast") else low
    for t in [*vae.parameters(), *vae.buffers()]:
        t.data = t.data.to(vae_dtype)
    modules = [unet, *encoders, vae]
    weights = _bytes(t for m in modules for t in [*m.parameters(), *m.buffers()])
    vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    latent = resolution // vae_scale
    unet_cfg = configs["unet"]
    pooled_dim = next((c["projection_dim"] for c in configs["text_encoders"] if c.get("projection")), 0)
    b = 2 * num_images
    peaks = {}
    with torch.no_grad():
        with torch.device("meta"):
            x = torch.empty(b, unet_cfg.get("in_channels", 4), latent, latent, dtype=low)
            embeds = torch.empty(b, 77, unet_cfg["cross_attention_dim"], dtype=low)
            extra = None
            if pooled_dim:
                extra = {
                    "text_embeds": torch.empty(b, pooled_dim, dtype=low),
                    "time_ids": torch.zeros(b, 6, dtype=low),
                }
        tracker = StorageTracker()
        tracker.ignore([t for m in modules for t in [*m.parameters(), *m.buffers()]])
        with tracker, _gpu_autocast_mode(low):
            unet(x, torch.zeros((), dtype=torch.long, device="meta"), embeds, added_cond_kwargs=extra)
        peaks["unet"] = tracker.peak
        with torch.device("meta"):
            latents = torch.empty(
                1 if sliced_decode else num_images,
                vae_config.get("latent_channels", 4),
                latent,
                latent,
                dtype=vae_dtype,
            )
        tracker = StorageTracker()
        tracker.ignore([t for m in modules for t in [*m.parameters(), *m.buffers()]])
        with tracker, _gpu_autocast_mode(vae_dtype):
            vae.decode(latents)
        # the decoded images accumulate: num_images x 3 x H x W in the VAE's dtype
        kept = num_images * 3 * resolution * resolution * vae_dtype.itemsize
        peaks["decode"] = tracker.peak + (kept if sliced_decode else 0)
    return {"weights": weights, "unet_peak": peaks["unet"], "decode_peak": peaks["decode"]}


def estimate_generation(
    configs: dict[str, Any],
    resolution: int,
    num_images: int,
    *,
    sliced_decode: bool,
    low_precision: str = "bf16",
) -> float:
    """Peak GiB of a generation: resident weights + the larger of the UNet's and the decode's
    peaks x FRAGMENTATION + WORKSPACE_GIB (the latents are small and counted in both)."""
    m = measure_generation(
        json.dumps(configs, sort_keys=True), resolution, num_images, sliced_decode, low_precision
    )
    return (m["weights"] + max(m["unet_peak"], m["decode_peak"]) * FRAGMENTATION) / GIB + WORKSPACE_GIB


# --------------------------------------------------------------------------- the docs' table
A10G_BYTES = 23028 * 2**20  # what an A10G (ml.g5) reports


def table(rank: int = 16) -> list[str]:
    """The markdown table of docs/architecture.md: every reference family at its resolutions,
    prior preservation off/on (and SDXL with text-encoder LoRA), batch 1, bf16, for an A10G."""
    budget = device_budget_gib(A10G_BYTES)
    rows = [
        "| model | px | prior pres. | text-encoder LoRA | unplanned GiB "
        f"| plan for an A10G ({budget:.1f} GiB) | planned GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    cases = [
        (f, px, prior, False)
        for f, sizes in (("sd15", (512, 768)), ("sd21", (768,)), ("sdxl", (768, 1024)))
        for px in sizes
        for prior in (False, True)
    ] + [("sdxl", 1024, False, True)]
    for family, px, prior, te in cases:
        configs = REFERENCE_CONFIGS[family]
        common = {"prior_preservation": prior, "train_text_encoder": te, "rank": rank}
        unplanned = estimate(configs, px, 1, checkpointing=False, offload_text_encoders=False, **common)
        plan = make_plan(configs, px, 1, budget_gib=budget, **common)
        choice = ", ".join(
            (["text encoders offloaded"] if plan.chosen.offload_text_encoders else ["text encoders on GPU"])
            + (["checkpointing"] if plan.chosen.checkpointing else [])
            + ([f"micro-batch {plan.chosen.micro_batch}"] if plan.chosen.micro_batch != 1 else [])
        )
        rows.append(
            f"| {family} | {px} | {'on' if prior else 'off'} | {'on' if te else 'off'} | {unplanned.gib:.1f} "
            f"| {choice} | {plan.chosen.gib:.1f} |"
        )
    return rows


if __name__ == "__main__":  # python containers/training/memory_plan.py: the docs' table
    print("\n".join(table()))
