"""DreamBooth-LoRA fine-tuning of Stable Diffusion (1.5 / 2.1 / XL) under the SageMaker
training contract.

Inputs (root = $AVATARFLOW_OPT_ML, default /opt/ml, so tests and the local runtime can run
it outside a container):
  input/config/hyperparameters.json   values arrive as strings; parsed and validated here
  input/data/training/                images/*.png crops + manifest.json (build_dataset)
  input/data/base_model/              a diffusers folder (SD 1.5, SD 2.1 incl. v-prediction, SDXL)
  input/data/class_images/            optional: prior-preservation images (else generated)
  SM_CHANNEL_<NAME> env vars override the channel folders, SM_MODEL_DIR the output folder.
Outputs:
  model/pytorch_lora_weights.safetensors  saved with diffusers' save_lora_weights + adapter metadata
  model/adapter.json                      what the adapter is (base model, token, prompts, losses, ...)
  checkpoints/checkpoint-<step>/          every `checkpointing_steps`; a restart resumes from the newest
  output/failure                          one line on any error (and a non-zero exit)

The flow follows diffusers' examples/dreambooth/train_dreambooth_lora.py, without accelerate:
one process, one device. Frozen base weights are cast to the mixed-precision dtype, LoRA
weights stay fp32. Latents and (frozen) text embeddings are computed once up front, because
a DreamBooth set is only 10-20 images and one prompt. Per-step randomness (data order, noise,
timesteps) is derived from (seed, step) alone, so a resumed run draws exactly what the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER_CONFIG = "adapter.json"
UNET_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
EMBEDDING_SIZE = 128  # SFace identity embedding, see avatarflow.faces
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Test hook: SIGKILL ourselves right after this step's checkpoint, like a spot interruption.
KILL_AFTER_STEP_ENV = "AVATARFLOW_KILL_AFTER_STEP"
# GiB the memory plan may use instead of what the GPU reports (MIG slices, a GPU shared with
# another process, or planning a given card from a CPU).
GPU_BUDGET_ENV = "AVATARFLOW_GPU_BUDGET_GIB"


class TrainingError(Exception):
    """A problem with the job's input or configuration; its message is the failure reason."""


# ---------------------------------------------------------------------------------------------
# Paths and hyperparameters
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Paths:
    root: Path
    hyperparameters: Path
    training: Path
    base_model: Path
    class_images: Path
    model: Path
    checkpoints: Path
    failure: Path

    @classmethod
    def from_env(cls, env=os.environ) -> Paths:
        root = Path(env.get("AVATARFLOW_OPT_ML", "/opt/ml"))

        def channel(name: str) -> Path:
            return Path(env.get(f"SM_CHANNEL_{name.upper()}", root / "input" / "data" / name))

        return cls(
            root=root,
            hyperparameters=root / "input" / "config" / "hyperparameters.json",
            training=channel("training"),
            base_model=channel("base_model"),
            class_images=channel("class_images"),
            model=Path(env.get("SM_MODEL_DIR", root / "model")),
            checkpoints=root / "checkpoints",
            failure=root / "output" / "failure",
        )


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    token: str = "sks"  # noqa: S105 - the DreamBooth rare token
    subject_class: str = "person"
    instance_prompt: str = ""  # "" -> "a photo of <token> <subject_class>"
    class_prompt: str = ""  # "" -> "a photo of a <subject_class>"
    max_train_steps: int = 800
    learning_rate: float = 1e-4
    # The text encoders' LoRA learns far faster than the UNet's: diffusers' SDXL DreamBooth-LoRA
    # script gives them their own rate (5e-6). Used only with train_text_encoder.
    text_encoder_lr: float = 5e-6
    rank: int = 4
    alpha: float = 0.0  # 0 -> same as rank (scale 1.0)
    resolution: int = 512
    train_batch_size: int = 1
    train_text_encoder: bool = False
    prior_preservation: bool = False
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    class_inference_steps: int = 25
    seed: int = 0
    # no | fp16 | bf16. bf16 needs no loss scaling; on a GPU without bf16 (T4, V100) it falls
    # back to fp16 with a GradScaler (resolve_precision).
    mixed_precision: str = "bf16"
    gradient_checkpointing: str = "auto"  # auto: the memory plan decides | true | false
    checkpointing_steps: int = 100
    max_grad_norm: float = 1.0
    # Off: faces are asymmetric (parting, moles, a smile's side); a mirrored face is another face.
    random_flip: bool = False
    snr_gamma: float = 0.0  # min-SNR-gamma loss weighting (Hang et al. 2023; 5.0 is typical); 0 = off
    noise_offset: float = 0.0  # offset noise (e.g. 0.05: lets the model learn darker/brighter); 0 = off
    # The quality loop: at each checkpoint, this many images with fixed seeds, scored by SFace
    # similarity to the batch's reference face; the best-scoring checkpoint is published.
    validation_images: int = 4
    validation_steps: int = 20
    base_model_id: str = ""

    @property
    def prompt(self) -> str:
        return self.instance_prompt or f"a photo of {self.token} {self.subject_class}"

    @property
    def prior_prompt(self) -> str:
        return self.class_prompt or f"a photo of a {self.subject_class}"

    @property
    def lora_alpha(self) -> float:
        return self.alpha or float(self.rank)


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_TRISTATE = {"auto": "auto"} | dict.fromkeys(_TRUE, "true") | dict.fromkeys(_FALSE, "false")


def _coerce(name: str, value, kind: str):
    """SageMaker passes every hyperparameter as a string (the SDK sometimes JSON-quotes them);
    the local runtime may pass JSON numbers and booleans. Accept both, reject anything else."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        value = json.loads(value)
    text = str(value).strip()
    if kind == "str":
        if not isinstance(value, str):
            raise TrainingError(f"hyperparameter {name} must be a string, got {value!r}")
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise TrainingError(f"hyperparameter {name} must be true or false, got {value!r}")
    try:
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(text) if isinstance(value, str) else int(value)
        number = float(text)
    except (TypeError, ValueError):
        raise TrainingError(
            f"hyperparameter {name} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}"
        ) from None
    if not math.isfinite(number):
        raise TrainingError(f"hyperparameter {name} must be finite, got {value!r}")
    return number


def parse_hyperparameters(raw: dict) -> Hyperparameters:
    if not isinstance(raw, dict):
        raise TrainingError("hyperparameters.json must hold a JSON object")
    fields = {f.name: f for f in dataclasses.fields(Hyperparameters)}
    # Typos must not silently fall back to a default; SageMaker's own keys are ignored.
    unknown = sorted(k for k in raw if k not in fields and not k.startswith("sagemaker_"))
    if unknown:
        raise TrainingError(f"unknown hyperparameter(s) {', '.join(unknown)}; accepted: {', '.join(fields)}")
    raw = dict(raw)
    if isinstance(raw.get("gradient_checkpointing"), bool):  # JSON true/false from the local runtime
        raw["gradient_checkpointing"] = str(raw["gradient_checkpointing"]).lower()
    hp = Hyperparameters(**{k: _coerce(k, v, fields[k].type) for k, v in raw.items() if k in fields})
    hp = dataclasses.replace(
        hp, gradient_checkpointing=_TRISTATE.get(hp.gradient_checkpointing.strip().lower(), "")
    )

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise TrainingError(f"bad hyperparameter: {message}")

    check(
        re.fullmatch(r"[A-Za-z0-9]{2,32}", hp.token) is not None,
        f"token must be 2-32 letters/digits, got {hp.token!r}",
    )
    check(
        re.search(rf"\b{re.escape(hp.token)}\b", hp.prompt) is not None,
        f"instance_prompt {hp.prompt!r} must contain the token {hp.token!r}",
    )
    check(
        re.fullmatch(r"[a-z]{2,20}", hp.subject_class) is not None,
        f"subject_class must be 2-20 lowercase letters, got {hp.subject_class!r}",
    )
    check(1 <= hp.max_train_steps <= 100_000, f"max_train_steps must be 1..100000, got {hp.max_train_steps}")
    check(0 < hp.learning_rate < 1, f"learning_rate must be in (0, 1), got {hp.learning_rate}")
    check(0 < hp.text_encoder_lr < 1, f"text_encoder_lr must be in (0, 1), got {hp.text_encoder_lr}")
    check(hp.gradient_checkpointing != "", "gradient_checkpointing must be auto, true or false")
    check(0 <= hp.snr_gamma <= 100, f"snr_gamma must be 0..100 (0 = off), got {hp.snr_gamma}")
    check(0 <= hp.noise_offset <= 1, f"noise_offset must be 0..1 (0 = off), got {hp.noise_offset}")
    check(0 <= hp.validation_images <= 16, f"validation_images must be 0..16, got {hp.validation_images}")
    check(1 <= hp.validation_steps <= 100, f"validation_steps must be 1..100, got {hp.validation_steps}")
    check(1 <= hp.rank <= 256, f"rank must be 1..256, got {hp.rank}")
    check(0 <= hp.alpha <= 1024, f"alpha must be 0..1024 (0 = rank), got {hp.alpha}")
    check(
        64 <= hp.resolution <= 2048 and hp.resolution % 8 == 0,
        f"resolution must be a multiple of 8 in 64..2048, got {hp.resolution}",
    )
    check(1 <= hp.train_batch_size <= 64, f"train_batch_size must be 1..64, got {hp.train_batch_size}")
    check(1 <= hp.num_class_images <= 10_000, f"num_class_images must be 1..10000, got {hp.num_class_images}")
    check(0 <= hp.prior_loss_weight <= 100, f"prior_loss_weight must be 0..100, got {hp.prior_loss_weight}")
    check(
        1 <= hp.class_inference_steps <= 200,
        f"class_inference_steps must be 1..200, got {hp.class_inference_steps}",
    )
    check(0 <= hp.seed < 2**31, f"seed must be 0..2^31-1, got {hp.seed}")
    check(
        hp.mixed_precision in ("no", "fp16", "bf16"),
        f"mixed_precision must be no, fp16 or bf16, got {hp.mixed_precision!r}",
    )
    check(
        1 <= hp.checkpointing_steps <= 100_000,
        f"checkpointing_steps must be >= 1, got {hp.checkpointing_steps}",
    )
    check(hp.max_grad_norm > 0, f"max_grad_norm must be > 0, got {hp.max_grad_norm}")
    return hp


def read_hyperparameters(paths: Paths) -> Hyperparameters:
    if not paths.hyperparameters.is_file():
        return parse_hyperparameters({})  # SageMaker omits the file when there are none
    try:
        raw = json.loads(paths.hyperparameters.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise TrainingError(f"hyperparameters.json is not valid JSON: {err}") from None
    return parse_hyperparameters(raw)


# ---------------------------------------------------------------------------------------------
# Inputs: dataset, class images, base model
# ---------------------------------------------------------------------------------------------


def _load_images(folder: Path, resolution: int) -> list:
    from PIL import Image, ImageOps

    images = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except OSError as err:
            raise TrainingError(f"cannot read image {path.name}: {err}") from None
        # Resize the short side then center-crop (crops from intake are square already).
        images.append(ImageOps.fit(img, (resolution, resolution), Image.Resampling.BICUBIC))
    return images


def load_dataset(paths: Paths, resolution: int) -> tuple[list, list[float]]:
    """Instance images and the batch's reference face embedding from manifest.json."""
    if not paths.training.is_dir():
        raise TrainingError(f"missing input channel 'training' ({paths.training})")
    manifest_path = paths.training / "manifest.json"
    if not manifest_path.is_file():
        raise TrainingError("training channel has no manifest.json")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise TrainingError(f"manifest.json is not valid JSON: {err}") from None
    embedding = manifest.get("reference_embedding") if isinstance(manifest, dict) else None
    if (
        not isinstance(embedding, list)
        or len(embedding) != EMBEDDING_SIZE
        or not all(isinstance(x, int | float) and math.isfinite(x) for x in embedding)
    ):
        raise TrainingError(f"manifest.json reference_embedding must be a list of {EMBEDDING_SIZE} numbers")
    folder = paths.training / "images"
    images = _load_images(folder, resolution) if folder.is_dir() else []
    if not images:
        raise TrainingError("training channel has no images (expected images/*.png)")
    return images, [float(x) for x in embedding]


def base_model_fingerprint(folder: Path) -> str:
    """A cheap identity for the base model: configs in full, weight files by size and first MiB.
    Hashing every byte of a multi-GB SDXL folder would cost tens of seconds per job."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        h.update(rel.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        with path.open("rb") as f:
            h.update(f.read(1 << 20) if path.suffix != ".json" else f.read())
    return "sha256:" + h.hexdigest()


class BaseModel:
    """The base pipeline's parts, loaded the way diffusers' DreamBooth example loads them."""

    def __init__(self, folder: Path, device, weight_dtype):
        import torch
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        index_path = folder / "model_index.json"
        if not index_path.is_file():
            raise TrainingError(
                f"missing input channel 'base_model' (no diffusers model_index.json in {folder})"
            )
        self.folder = folder
        self.index = json.loads(index_path.read_text(encoding="utf-8"))
        self.is_sdxl = "text_encoder_2" in self.index
        self.device = device
        self.weight_dtype = weight_dtype
        self.noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        # Load straight into the target dtype: a full-size fp32 copy first would double host memory.
        self.tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")]
        self.text_encoders = [
            CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=weight_dtype)
        ]
        if self.is_sdxl:
            self.tokenizers.append(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"))
            self.text_encoders.append(
                CLIPTextModelWithProjection.from_pretrained(
                    folder, subfolder="text_encoder_2", torch_dtype=weight_dtype
                )
            )
        # The VAE stays fp32: it only encodes the few training images once, and SDXL's VAE
        # overflows in fp16 (its config says force_upcast).
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32).to(
            device
        )
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=weight_dtype)
        self.unet.to(device)
        for module in [self.vae, self.unet, *self.text_encoders]:
            module.requires_grad_(False)
        for te in self.text_encoders:
            te.to(device)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def pipeline(self):
        """An inference pipeline over the already loaded modules (for class images)."""
        from diffusers import DiffusionPipeline

        parts = {
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoders[0],
            "tokenizer": self.tokenizers[0],
        }
        if self.is_sdxl:
            parts |= {"text_encoder_2": self.text_encoders[1], "tokenizer_2": self.tokenizers[1]}
        # Don't load a safety checker / image encoder just to make class images.
        parts |= {
            key: None for key in ("safety_checker", "feature_extractor", "image_encoder") if key in self.index
        }
        pipe = DiffusionPipeline.from_pretrained(self.folder, **parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def encode_prompt(self, prompt: str, batch: int):
        """(prompt_embeds, pooled) for SDXL, (prompt_embeds, None) for SD; grads flow when
        a text encoder carries trainable LoRA weights."""
        import torch

        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenizer(
                prompt,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            if not self.is_sdxl:
                hidden.append(encoder(ids)[0])
                continue
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
            pooled = out[0]  # the last encoder (with projection) gives the pooled embedding
        embeds = torch.cat(hidden, dim=-1).repeat(batch, 1, 1)
        return embeds, (pooled.repeat(batch, 1) if pooled is not None else None)

    def encode_images(self, images) -> tuple:
        """Latent distribution (mean, std) per image, computed once; each step samples from it."""
        import numpy as np
        import torch

        means, stds = [], []
        with torch.no_grad():
            for img in images:
                pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
                pixels = pixels.permute(2, 0, 1).unsqueeze(0).to(self.device)
                dist = self.vae.encode(pixels).latent_dist
                means.append(dist.mean.cpu())
                stds.append(dist.std.cpu())
        return torch.cat(means), torch.cat(stds)


def class_images(paths: Paths, hp: Hyperparameters, base: BaseModel, log) -> list:
    """Prior-preservation images: a provided channel, else generated by the base model once and
    kept under checkpoints/ so a resumed (spot) job does not generate them again."""
    import torch

    if paths.class_images.is_dir():
        images = _load_images(paths.class_images, hp.resolution)
        if not images:
            raise TrainingError("class_images channel has no images")
        return images[: hp.num_class_images]
    cache = paths.checkpoints / "class_images"
    cache.mkdir(parents=True, exist_ok=True)
    have = sorted(cache.glob("*.png"))
    if len(have) < hp.num_class_images:
        log(f"generating {hp.num_class_images - len(have)} class images: {hp.prior_prompt!r}")
        base.vae.to(base.weight_dtype)  # the pipeline upcasts SDXL's VAE itself when needed
        pipe = base.pipeline()
        for i in range(len(have), hp.num_class_images):
            generator = torch.Generator("cpu").manual_seed(hp.seed * 100_003 + i)
            image = pipe(
                hp.prior_prompt,
                num_inference_steps=hp.class_inference_steps,
                height=hp.resolution,
                width=hp.resolution,
                generator=generator,
            ).images[0]
            image.save(cache / f".{i:05d}.png")
            (cache / f".{i:05d}.png").rename(cache / f"{i:05d}.png")  # whole files only
        base.vae.to(torch.float32)
        del pipe
    return _load_images(cache, hp.resolution)[: hp.num_class_images]


# ---------------------------------------------------------------------------------------------
# LoRA, checkpoints, output
# ---------------------------------------------------------------------------------------------


def add_lora(base: BaseModel, hp: Hyperparameters, checkpointing: bool) -> list:
    """LoRA adapters (fp32) on the UNet attention projections, optionally on the text encoders."""
    import torch
    from peft import LoraConfig

    torch.manual_seed(hp.seed)  # LoRA A matrices are random: make them the seed's
    base.unet.add_adapter(
        LoraConfig(
            r=hp.rank,
            lora_alpha=hp.lora_alpha,
            init_lora_weights="gaussian",
            target_modules=UNET_TARGET_MODULES,
        )
    )
    models = [base.unet]
    if hp.train_text_encoder:
        for te in base.text_encoders:
            te.add_adapter(
                LoraConfig(
                    r=hp.rank,
                    lora_alpha=hp.lora_alpha,
                    init_lora_weights="gaussian",
                    target_modules=TEXT_TARGET_MODULES,
                )
            )
            models.append(te)
    for model in models:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable weights in fp32, frozen ones in weight_dtype
        if checkpointing:
            if model is base.unet:
                model.enable_gradient_checkpointing()
            else:
                model.gradient_checkpointing_enable()
        model.train()
    return models


def make_optimizer(models, hp: Hyperparameters):
    """AdamW (weight decay 1e-2); the text encoders' LoRA in its own group at text_encoder_lr."""
    import torch

    groups = [
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}
        for model, lr in zip(
            models, [hp.learning_rate] + [hp.text_encoder_lr] * (len(models) - 1), strict=True
        )
    ]
    return torch.optim.AdamW(groups, weight_decay=1e-2)


def _trainable_state(models) -> dict:
    return {
        f"{i}.{name}": p.detach().cpu().clone()
        for i, model in enumerate(models)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def _load_trainable_state(models, state: dict) -> None:
    import torch

    params = {
        f"{i}.{name}": p
        for i, model in enumerate(models)
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _checkpoint_signature(hp: Hyperparameters, fingerprint: str) -> dict:
    # Everything that shapes the run; a checkpoint made under other settings is not resumed.
    return dataclasses.asdict(hp) | {"base_model": fingerprint}


@dataclasses.dataclass
class RunState:
    """What a checkpoint carries besides the optimizer: losses, the quality loop's scores and
    the best checkpoint's LoRA tensors (older checkpoint folders are deleted, the best is not)."""

    losses: list[float] = dataclasses.field(default_factory=list)
    validation: list[dict] = dataclasses.field(default_factory=list)
    best: dict | None = None  # {"step", "identity", "lora"}


def save_checkpoint(paths: Paths, step: int, models, optimizer, scaler, run: RunState, signature) -> None:
    import torch

    final = paths.checkpoints / f"checkpoint-{step}"
    tmp = paths.checkpoints / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(
        {
            "step": step,
            "lora": _trainable_state(models),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler else None,
            "losses": run.losses,
            "validation": run.validation,
            "best": run.best,
            "signature": signature,
        },
        tmp / "state.pt",
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # a checkpoint folder exists only once it is complete
    for old in paths.checkpoints.glob("checkpoint-*"):
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(paths: Paths) -> Path | None:
    for stale in paths.checkpoints.glob(".checkpoint-*.tmp"):  # a kill mid-save leaves these
        shutil.rmtree(stale, ignore_errors=True)
    found = [
        (int(p.name.split("-")[1]), p)
        for p in paths.checkpoints.glob("checkpoint-*")
        if re.fullmatch(r"checkpoint-\d+", p.name) and (p / "state.pt").is_file()
    ]
    return max(found)[1] if found else None


def load_checkpoint(path: Path, models, optimizer, scaler, signature) -> tuple[int, RunState]:
    import torch

    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if state["signature"] != signature:
        raise TrainingError(
            f"{path.name} was written with other hyperparameters or base model; "
            "use a fresh checkpoint location"
        )
    _load_trainable_state(models, state["lora"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    run = RunState(list(state["losses"]), list(state.get("validation") or []), state.get("best"))
    return state["step"], run


def save_adapter(paths: Paths, hp: Hyperparameters, base: BaseModel, models, info: dict) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    names = ["unet", "text_encoder", "text_encoder_2"]
    layers, metadata = {}, {}
    for name, model in zip(names, models, strict=False):
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
        # rank, alpha and target modules go into the safetensors header, so load_lora_weights
        # restores lora_alpha instead of assuming alpha == rank.
        metadata[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    pipeline_cls = StableDiffusionXLPipeline if base.is_sdxl else StableDiffusionPipeline
    paths.model.mkdir(parents=True, exist_ok=True)
    pipeline_cls.save_lora_weights(paths.model, **layers, **metadata, weight_name=ADAPTER_WEIGHTS)
    (paths.model / ADAPTER_CONFIG).write_text(json.dumps(info, indent=2), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Precision and memory
# ---------------------------------------------------------------------------------------------


def resolve_precision(requested: str, device_type: str, bf16_supported: bool) -> str:
    """The precision the job runs in: bf16 wherever the GPU has it (Ampere and newer: the
    A10G of ml.g5 does), fp16 with a GradScaler only on GPUs without bf16 (T4, V100), and
    fp16 never on a CPU."""
    if device_type != "cuda":
        if requested == "fp16":
            raise TrainingError("mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
        return requested
    if requested == "bf16" and not bf16_supported:
        return "fp16"
    return requested


def _bf16_supported() -> bool:
    import torch

    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch has no including_emulation
        return bool(torch.cuda.is_bf16_supported())


def plan_memory(paths: Paths, hp: Hyperparameters, device, precision: str):
    """The memory plan (memory_plan.py) for this job on this device: measured on the meta device
    from the base model's own configs; on a CPU (tests, local runtime) nothing limits it."""
    import memory_plan
    import torch

    budget = None
    if device.type == "cuda":
        budget = memory_plan.device_budget_gib(torch.cuda.get_device_properties(device).total_memory)
    if os.environ.get(GPU_BUDGET_ENV):  # plan for less (a shared or partitioned GPU), or a given card
        budget = float(os.environ[GPU_BUDGET_ENV])
    forced = {"auto": None, "true": True, "false": False}[hp.gradient_checkpointing]
    plan = memory_plan.make_plan(
        memory_plan.folder_configs(paths.base_model),
        hp.resolution,
        hp.train_batch_size,
        prior_preservation=hp.prior_preservation,
        train_text_encoder=hp.train_text_encoder,
        rank=hp.rank,
        budget_gib=budget,
        low_precision={"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[precision],
        checkpointing=forced,
    )
    if not plan.fits:
        raise TrainingError(
            f"the job needs about {plan.chosen.gib:.1f} GiB of GPU memory at best and the GPU has "
            f"{plan.budget_gib:.1f} GiB for it: lower resolution or train_batch_size, or turn off "
            "prior_preservation / train_text_encoder"
        )
    return plan


def silence_prompt_echo() -> None:
    """diffusers' pipelines warn with the cut-off part of a prompt, transformers' tokenizers with
    the prompt's length: prompts are user text and stay out of the logs."""
    import logging

    for name in ("diffusers.pipelines", "transformers.tokenization_utils_base"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------
# The quality loop
# ---------------------------------------------------------------------------------------------

VALIDATION_PROMPTS = (
    "{prompt}",
    "a close-up portrait photo of {token} {subject_class}, looking at the camera",
)
VALIDATION_GUIDANCE = 6.0


def default_embedder():
    """SFace (avatarflow.faces, the intake's own model): image -> 128-d embedding or None."""
    try:
        from avatarflow.faces import embed_face
    except ImportError:  # an image without the faces extra: images are made, not scored
        return None
    return embed_face


def cosine(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denominator) if denominator > 0 else 0.0


class Validator:
    """At each checkpoint: `validation_images` images of the token with fixed seeds (the same
    every time, so checkpoints are compared on the same noise), DPM-Solver multistep, scored by
    the face embedder's cosine to the batch's reference embedding. A score is the mean over
    the images, an image without a face counting 0."""

    def __init__(self, base: BaseModel, hp: Hyperparameters, reference, embedder, autocast):
        import torch
        from diffusers import DPMSolverMultistepScheduler

        self.base, self.hp, self.reference, self.embedder, self.autocast = (
            base,
            hp,
            reference,
            embedder,
            autocast,
        )
        n = hp.validation_images
        fields = {"prompt": hp.prompt, "token": hp.token, "subject_class": hp.subject_class}
        self.prompts = [VALIDATION_PROMPTS[i % len(VALIDATION_PROMPTS)].format(**fields) for i in range(n)]
        self.seeds = [hp.seed * 1009 + i for i in range(n)]
        self.scheduler = DPMSolverMultistepScheduler.from_config(base.noise_scheduler.config)
        self.cached = None
        if not hp.train_text_encoder:  # frozen encoders: embed once, before they leave the GPU
            with torch.no_grad():
                self.cached = self._embeddings()

    def _embeddings(self):
        base = self.base
        return {p: base.encode_prompt(p, 1) for p in [*dict.fromkeys(self.prompts), ""]}

    def images(self) -> list:
        """All images in one batch (CFG doubles it): the same seeds give the same starting noise
        at every checkpoint."""
        import numpy as np
        import torch
        from PIL import Image

        base, hp = self.base, self.hp
        device = base.device
        embeddings = self.cached or self._embeddings()
        n = len(self.prompts)
        neg, neg_pooled = embeddings[""]
        embeds = torch.cat([neg.expand(n, -1, -1)] + [embeddings[p][0] for p in self.prompts])
        extra = None
        if base.is_sdxl:
            r = hp.resolution
            pooled = torch.cat([neg_pooled.expand(n, -1)] + [embeddings[p][1] for p in self.prompts])
            ids = torch.tensor([[r, r, 0, 0, r, r]] * 2 * n, device=device, dtype=embeds.dtype)
            extra = {"text_embeds": pooled, "time_ids": ids}
        latent = hp.resolution // base.vae_scale
        shape = (1, base.unet.config.in_channels, latent, latent)
        x = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in self.seeds])
        x = x.to(device)
        self.scheduler.set_timesteps(hp.validation_steps, device=device)
        x = x * self.scheduler.init_noise_sigma
        base.unet.eval()
        try:
            for t in self.scheduler.timesteps:
                model_in = self.scheduler.scale_model_input(torch.cat([x, x]), t)
                with self.autocast:
                    pred = base.unet(model_in.to(base.weight_dtype), t, embeds, added_cond_kwargs=extra)
                uncond, cond = pred.sample.float().chunk(2)
                x = self.scheduler.step(uncond + VALIDATION_GUIDANCE * (cond - uncond), t, x).prev_sample
        finally:
            base.unet.train()
        shift = getattr(base.vae.config, "shift_factor", None) or 0.0
        out = []
        base.vae.to(device)
        try:
            for latents in x.float():  # one at a time: a 1024 px fp32 decode is large
                pixels = base.vae.decode(latents[None] / base.vae.config.scaling_factor + shift).sample[0]
                array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu()
                out.append(Image.fromarray(np.asarray(array)))
        finally:
            base.vae.to("cpu")
        return out

    def run(self, step: int) -> dict:
        import torch

        with torch.no_grad():
            images = self.images()
        scores = []
        for image in images:
            embedding = self.embedder(image) if self.embedder else None
            scores.append(None if embedding is None else round(cosine(embedding, self.reference), 6))
        found = [s for s in scores if s is not None]
        return {
            "step": step,
            "identity": round(sum(found) / len(images), 6) if images else 0.0,
            "faces_found": len(found),
            "scores": scores,
        }


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _batch_indices(step: int, batch: int, n: int, seed: int) -> list[int]:
    """Stateless epoch shuffling: sample k of the run is perm_{k // n}[k % n]."""
    import torch

    out = []
    for k in range(step * batch, (step + 1) * batch):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + k // n))
        out.append(int(perm[k % n]))
    return out


def metric_line(step: int, loss: float, step_time: float) -> str:
    """The one plain stdout line per step that the Train state's MetricDefinitions scrape into
    the SageMaker console (train:step, train:loss, train:step_time; docs/architecture.md)."""
    return f"step={step} loss={loss:.6f} step_time={step_time:.4f}"


def validation_line(result: dict, images: int) -> str:
    """The stdout line of each checkpoint's quality check (MetricDefinitions train:identity)."""
    faces = f"{result['faces_found']}/{images}"
    return f"validation step={result['step']} identity={result['identity']:.6f} faces={faces}"


def sample_weights(sched, timesteps, snr_gamma: float):
    """Per-sample loss weights: 1, or min-SNR-gamma (min(SNR, gamma) / SNR for epsilon,
    / (SNR + 1) for v-prediction), as diffusers' training scripts compute them."""
    import torch

    if not snr_gamma:
        return torch.ones(timesteps.shape[0], device=timesteps.device)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(sched, timesteps)
    weights = torch.clamp(snr, max=snr_gamma)
    return weights / (snr + 1 if sched.config.prediction_type == "v_prediction" else snr)


def train(paths: Paths, hp: Hyperparameters, log=print, embedder=default_embedder) -> dict:
    import torch
    from tqdm.auto import tqdm

    silence_prompt_echo()
    torch.manual_seed(hp.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(
        hp.mixed_precision, device.type, device.type == "cuda" and _bf16_supported()
    )
    if precision != hp.mixed_precision:
        log(
            f"mixed_precision={hp.mixed_precision} is not supported by this GPU: "
            f"using {precision} + GradScaler"
        )
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if device.type == "cuda":  # TF32 for whatever still runs in fp32 (Ampere and newer)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    images, reference_embedding = load_dataset(paths, hp.resolution)
    if not paths.base_model.is_dir() or not (paths.base_model / "model_index.json").is_file():
        raise TrainingError(
            f"missing input channel 'base_model' (no diffusers model_index.json in {paths.base_model})"
        )
    plan = plan_memory(paths, hp, device, precision)
    for line in plan.lines():
        log(line)
    fingerprint = base_model_fingerprint(paths.base_model)
    base = BaseModel(paths.base_model, device, weight_dtype)
    log(
        f"base model {'SDXL' if base.is_sdxl else 'SD'} ({fingerprint[:19]}), "
        f"prediction_type={base.noise_scheduler.config.prediction_type}, {len(images)} instance images, "
        f"device={device.type}, mixed_precision={precision}"
    )

    # Data: latents once (both orientations when flipping), then per step a sample of them.
    from PIL import ImageOps

    if hp.random_flip:
        images = images + [ImageOps.mirror(img) for img in images]
    inst_mean, inst_std = base.encode_images(images)
    class_mean = class_std = None
    if hp.prior_preservation:
        cls_images = class_images(paths, hp, base, log)
        if hp.random_flip:
            cls_images = cls_images + [ImageOps.mirror(img) for img in cls_images]
        class_mean, class_std = base.encode_images(cls_images)
    scaling = base.vae.config.scaling_factor
    shift = getattr(base.vae.config, "shift_factor", None) or 0.0
    base.vae.to("cpu")  # not needed on the GPU any more (validation borrows it back)

    models = add_lora(base, hp, plan.chosen.checkpointing)
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(models, hp)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=precision != "no")

    prompts = [hp.prompt] + ([hp.prior_prompt] if hp.prior_preservation else [])
    cached_text = None
    if not hp.train_text_encoder:
        with torch.no_grad():  # frozen text encoder: embeddings never change
            cached_text = [base.encode_prompt(p, 1) for p in prompts]
    validator = (
        Validator(
            base, hp, reference_embedding, embedder() if embedder is default_embedder else embedder, autocast
        )
        if hp.validation_images
        else None
    )
    if plan.chosen.offload_text_encoders:  # embeddings cached: the encoders are never called again
        for te in base.text_encoders:
            te.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    time_ids = None
    if base.is_sdxl:  # (original size, crop top-left, target size): square crops, no offset
        r = hp.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], device=device, dtype=weight_dtype)

    signature = _checkpoint_signature(hp, fingerprint)
    start, run, step_times = 0, RunState(), []
    resume = latest_checkpoint(paths)
    if resume is not None:
        start, run = load_checkpoint(resume, models, optimizer, scaler, signature)
        log(f"resumed from {resume.name} at step {start}")

    kill_after = int(os.environ.get(KILL_AFTER_STEP_ENV, "0") or 0)
    sched = base.noise_scheduler
    n_train_timesteps = sched.config.num_train_timesteps
    micro, chunks = plan.chosen.micro_batch, plan.accumulation
    n_inst = hp.train_batch_size
    bar = tqdm(total=hp.max_train_steps, initial=start, desc="train", file=sys.stderr, mininterval=5)
    for step in range(start, hp.max_train_steps):
        t0 = time.perf_counter()
        # This step's randomness, drawn for the whole batch whatever the micro-batching.
        g = torch.Generator().manual_seed(hp.seed * 1_000_003 + step)
        idx = _batch_indices(step, n_inst, len(inst_mean), hp.seed)
        mean, std = inst_mean[idx], inst_std[idx]
        if hp.prior_preservation:
            cidx = _batch_indices(step, n_inst, len(class_mean), hp.seed + 1)
            mean, std = torch.cat([mean, class_mean[cidx]]), torch.cat([std, class_std[cidx]])
        latents = (mean + std * torch.randn(mean.shape, generator=g) - shift) * scaling
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, n_train_timesteps, (latents.shape[0],), generator=g)
        if hp.noise_offset:  # a per-channel shift of the noise (offset noise)
            noise = noise + hp.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=g)
        latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
        noisy = sched.add_noise(latents, noise, timesteps)
        target = (
            sched.get_velocity(latents, noise, timesteps)
            if sched.config.prediction_type == "v_prediction"
            else noise
        )
        # Loss = mean over instance samples + prior_loss_weight x mean over class samples, each
        # sample's MSE weighted (min-SNR); summed over micro-batches, so accumulation is exact.
        weights = sample_weights(sched, timesteps, hp.snr_gamma)
        share = torch.full((latents.shape[0],), 1.0 / n_inst, device=device)
        if hp.prior_preservation:
            share[n_inst:] = hp.prior_loss_weight / n_inst
        weights = weights * share

        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for c in range(chunks):
            rows = list(range(c * micro, (c + 1) * micro))
            if hp.prior_preservation:
                rows += [n_inst + r for r in rows]
            with autocast:
                text = cached_text or [base.encode_prompt(p, 1) for p in prompts]
                embeds = torch.cat(
                    [text[0][0].expand(micro, -1, -1)]
                    + ([text[1][0].expand(micro, -1, -1)] if hp.prior_preservation else [])
                )
                extra = None
                if base.is_sdxl:
                    pooled = torch.cat(
                        [text[0][1].expand(micro, -1)]
                        + ([text[1][1].expand(micro, -1)] if hp.prior_preservation else [])
                    )
                    extra = {"text_embeds": pooled, "time_ids": time_ids.repeat(pooled.shape[0], 1)}
                pred = base.unet(
                    noisy[rows].to(weight_dtype), timesteps[rows], embeds, added_cond_kwargs=extra
                ).sample
            per_sample = ((pred.float() - target[rows].float()) ** 2).mean(dim=(1, 2, 3))
            loss = (per_sample * weights[rows]).sum()
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss.item()} at step {step + 1}; lower learning_rate or use bf16"
                )
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss += float(loss.item())
        if scaler:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        run.losses.append(step_loss)
        step_times.append(time.perf_counter() - t0)
        done = step + 1
        bar.update(1)
        bar.write(metric_line(done, run.losses[-1], step_times[-1]), file=sys.stdout)
        if done % hp.checkpointing_steps == 0 or done == hp.max_train_steps:
            if validator is not None:
                result = validator.run(done)
                run.validation.append(result)
                bar.write(validation_line(result, hp.validation_images), file=sys.stdout)
                # Ties go to the later checkpoint (it trained longer); no face anywhere ties at 0.
                if run.best is None or result["identity"] >= run.best["identity"]:
                    run.best = {
                        "step": done,
                        "identity": result["identity"],
                        "lora": _trainable_state(models),
                    }
            save_checkpoint(paths, done, models, optimizer, scaler, run, signature)
            if done == kill_after:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: a spot interruption
    bar.close()

    published = hp.max_train_steps
    if run.best is not None and run.best["step"] != hp.max_train_steps:
        _load_trainable_state(models, run.best["lora"])  # publish the best checkpoint, not the last
        published = run.best["step"]
        log(f"publishing checkpoint {published} (identity {run.best['identity']:.4f}), not the last step")
    losses = run.losses
    loss = {"first": losses[0], "last": losses[-1], "mean": sum(losses) / len(losses)} if losses else None
    best = run.best or {}
    step_time = sorted(step_times)[len(step_times) // 2] if step_times else None
    info = {
        "base_model_id": hp.base_model_id or None,
        "base_model_fingerprint": fingerprint,
        "base_model_type": "sdxl" if base.is_sdxl else "sd",
        "prediction_type": sched.config.prediction_type,
        "token": hp.token,
        "instance_prompt": hp.prompt,
        "subject_class": hp.subject_class,
        "class_prompt": hp.prior_prompt,
        "rank": hp.rank,
        "alpha": hp.lora_alpha,
        "target_modules": sorted(UNET_TARGET_MODULES),
        "train_text_encoder": hp.train_text_encoder,
        "prior_preservation": hp.prior_preservation,
        "steps": hp.max_train_steps,
        "published_step": published,
        "resumed_from_step": start or None,
        "resolution": hp.resolution,
        "train_batch_size": hp.train_batch_size,
        "learning_rate": hp.learning_rate,
        "text_encoder_lr": hp.text_encoder_lr if hp.train_text_encoder else None,
        "mixed_precision": precision,
        "snr_gamma": hp.snr_gamma or None,
        "noise_offset": hp.noise_offset or None,
        "random_flip": hp.random_flip,
        "seed": hp.seed,
        "memory_plan": plan.as_dict(),
        "num_instance_images": len(inst_mean) // (2 if hp.random_flip else 1),
        "loss": loss,
        # median over the steps this process ran (the first steps include warm-up)
        "step_time_median_s": step_time,
        "validation": run.validation,
        "identity_score": best.get("identity"),
        "reference_embedding": reference_embedding,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    # What the registry row keeps (register_model copies `metrics`; GET /users/{u}/models shows it).
    info["metrics"] = {
        "identity_score": best.get("identity"),
        "published_step": published,
        "steps": hp.max_train_steps,
        "validation_images": hp.validation_images,
        "identity_by_step": {str(v["step"]): v["identity"] for v in run.validation},
        "faces_found": next((v["faces_found"] for v in run.validation if v["step"] == published), None),
        "loss_mean": loss["mean"] if loss else None,
        "step_time_median_s": step_time,
    }
    save_adapter(paths, hp, base, models, info)
    log(f"final_loss_mean={info['loss']['mean']:.6f} steps={hp.max_train_steps}")
    return info


def write_failure(paths: Paths, reason: str) -> None:
    line = " ".join(reason.split())[:1000] or "training failed"
    try:
        paths.failure.parent.mkdir(parents=True, exist_ok=True)
        paths.failure.write_text(line + "\n", encoding="utf-8")
    except OSError:
        pass  # nowhere to write it: the non-zero exit and stderr still tell
    print(f"FAILED: {line}", file=sys.stderr, flush=True)


def main(argv=None, env=os.environ) -> int:
    """SageMaker runs `train` (no arguments); returns the process exit code."""
    paths = Paths.from_env(env)
    try:
        hp = read_hyperparameters(paths)
        train(paths, hp, log=lambda msg: print(msg, flush=True))
    except TrainingError as err:
        write_failure(paths, str(err))
        return 1
    except Exception as err:  # anything else is a bug or an environment problem: say what
        traceback.print_exc()
        write_failure(paths, f"{type(err).__name__}: {err}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
