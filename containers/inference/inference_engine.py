"""The model side of the inference container: one resident base pipeline, per-user LoRA
adapters hot-swapped into a single slot, generation, output safety check, identity score,
and the writes under `generations/<user_id>/<generation_id>/`.

Why a single hot-swapped slot: diffusers' `enable_lora_hotswap` pads the slot to the
largest rank once, and `load_lora_into_unet(..., hotswap=True)` then copies the next user's
weights into the same tensors. The UNet's module graph never changes, so a torch.compile'd
UNet is not recompiled and the base weights are never touched or reloaded.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from adapter_cache import Adapter, AdapterCache, AdapterInvalid
from aws_lambda_powertools import Logger
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from avatarflow import keys, moderation
from avatarflow.erasure import UserErased
from avatarflow.ids import ID_PATTERN

logger = Logger(service="avatarflow-inference")
# One worker per GPU already saturates it; tokenizer threads would only fight over CPUs.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prompts are user text: diffusers' pipelines warn with the cut-off part of a prompt and
# transformers' tokenizers with its length. Nothing of a prompt reaches the logs.
for _name in ("diffusers.pipelines", "transformers.tokenization_utils_base"):
    logging.getLogger(_name).setLevel(logging.ERROR)

UNET_SLOT = "user"  # the one UNet adapter name every user is hot-swapped into
TE_SLOT = "user_te"  # text-encoder LoRA (not hot-swappable in diffusers 0.42): load/delete
DEFAULT_NEGATIVE_PROMPT = (
    "lowres, blurry, deformed, disfigured, bad anatomy, extra limbs, watermark, text, jpeg artifacts"
)
# DPM-Solver++ (2M) reaches at 20-25 steps what DDIM/PNDM need 50 for; the base model folder's
# own scheduler stays selectable per request ("folder") or per endpoint (AVATARFLOW_SCHEDULER).
SCHEDULERS = ("dpmpp_2m", "folder")
DEFAULT_SCHEDULER = "dpmpp_2m"
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5
# CLIP reads 77 tokens (75 + begin/end). Longer prompts are encoded in windows of 75 tokens
# whose embeddings are concatenated (as the ecosystem's long-prompt helpers do); 3 windows hold
# any ordinary 500-character prompt. Past that: 400, stating the limit.
MAX_PROMPT_TOKENS = 225
MAX_SEED = 2**32 - 1 - 8  # seed + i must stay a valid 32-bit seed

# Counts base pipeline loads in this process: tests and /ping prove switching never reloads.
BASE_LOADS = 0


# --------------------------------------------------------------------------- request
class RequestInvalid(ValueError):
    def __init__(self, fields: dict[str, str]):
        super().__init__("invalid request: " + ", ".join(sorted(fields)))
        self.fields = fields


Id = Annotated[str, Field(pattern=ID_PATTERN.pattern)]
Size = Annotated[int | None, Field(default=None, strict=True, ge=64, le=1024, multiple_of=8)]


class GenerationRequest(BaseModel):
    """The body of requests/<generation_id>.json (design.md). Unknown fields are ignored so
    the API can add bookkeeping fields without breaking the container."""

    model_config = ConfigDict(extra="ignore")

    generation_id: Id
    user_id: Id
    model_version: Id
    prompt: Annotated[str, Field(min_length=1, max_length=500)]
    negative_prompt: Annotated[str | None, Field(default=None, max_length=500)]
    num_images: Annotated[int, Field(default=1, strict=True, ge=1, le=8)]
    steps: Annotated[int, Field(default=DEFAULT_STEPS, strict=True, ge=1, le=80)]
    guidance_scale: Annotated[float, Field(default=DEFAULT_GUIDANCE, ge=0.0, le=20.0, allow_inf_nan=False)]
    width: Size
    height: Size
    seed: Annotated[int | None, Field(default=None, strict=True, ge=0, le=MAX_SEED)]
    scheduler: Literal["dpmpp_2m", "folder"] | None = None  # None: the endpoint's default

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value.strip()


def parse_request(body: bytes | str) -> GenerationRequest:
    """JSON bytes -> request, or RequestInvalid with one reason per field."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestInvalid({"body": f"malformed JSON: {err.__class__.__name__}"}) from err
    if not isinstance(payload, dict):
        raise RequestInvalid({"body": "must be a JSON object"})
    try:
        return GenerationRequest.model_validate(payload)
    except ValidationError as err:
        fields: dict[str, str] = {}
        for e in err.errors(include_input=False, include_url=False):
            name = ".".join(str(p) for p in e["loc"]) or "body"
            fields.setdefault(name, e["msg"])
        raise RequestInvalid(fields) from err


def pipeline_prompt(prompt: str, token: str, subject_class: str, negative: str | None = None) -> str:
    """The text the pipeline receives, checked by avatarflow.moderation as a whole: the API checked
    the prompt and build_dataset the token and class, and this is the last gate before the GPU
    (a request written by anything else, or a combination of parts, never reaches the model)."""
    text = prompt_with_token(prompt, token, subject_class)
    problems = {}
    try:
        moderation.check_prompt(text)
    except moderation.BlockedText as err:
        problems["prompt"] = str(err)
    if negative:
        try:
            moderation.check_negative_prompt(negative)
        except moderation.BlockedText as err:
            problems["negative_prompt"] = str(err)
    if problems:
        raise RequestInvalid(problems)
    return text


def prompt_with_token(prompt: str, token: str, subject_class: str) -> str:
    """Every prompt names the user's DreamBooth token; add "<token> <class>" when missing. The
    token counts wherever it stands as a word, punctuation around it or not ("sks.", "(sks)")."""
    if re.search(rf"(?<![A-Za-z0-9]){re.escape(token)}(?![A-Za-z0-9])", prompt, flags=re.IGNORECASE):
        return prompt
    return f"photo of {token} {subject_class}, {prompt}"


def prompt_token_count(tokenizer, text: str) -> int:
    """CLIP tokens of `text` without the begin/end tokens (verbose=False: no length warning)."""
    return len(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids)


def _windows(tokenizer, text: str, count: int):
    """`count` rows of model_max_length ids: begin, 75 tokens of the text, end, padding; a row
    past the text is the empty prompt's (begin, end, padding). A text of <= 75 tokens gives
    exactly the tokenizer's own padded encoding as row 0."""
    import torch

    size = tokenizer.model_max_length
    body = size - 2
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
    rows = []
    for w in range(count):
        row = [tokenizer.bos_token_id, *ids[w * body : (w + 1) * body], tokenizer.eos_token_id]
        rows.append(row + [tokenizer.pad_token_id] * (size - len(row)))
    return torch.tensor(rows, dtype=torch.long)


def encode_long_prompts(pipe, prompt: str, negative: str, device) -> dict[str, Any]:
    """Prompt and negative prompt embeddings for prompts longer than one CLIP window: each 75-token
    window encoded on its own, the windows concatenated along the sequence (the UNet's cross-
    attention takes any length). SDXL: penultimate hidden states of both encoders side by side,
    the pooled embedding of the first window of encoder 2, as the pipeline itself computes them.
    Both prompts get the same number of windows (the guidance batch is one tensor)."""
    import torch

    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if sdxl:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    tokenizer = pairs[0][0]
    body = tokenizer.model_max_length - 2
    count = max(1, *(-(-prompt_token_count(tokenizer, t) // body) for t in (prompt, negative)))
    out: dict[str, Any] = {}
    for name, pooled_name, text in (
        ("prompt_embeds", "pooled_prompt_embeds", prompt),
        ("negative_prompt_embeds", "negative_pooled_prompt_embeds", negative),
    ):
        hidden, pooled = [], None
        for tok, encoder in pairs:
            ids = _windows(tok, text, count).to(device)
            if not sdxl:
                states = encoder(ids)[0]
            else:
                result = encoder(ids, output_hidden_states=True)
                states = result.hidden_states[-2]
                if result[0].ndim == 2:  # the encoder with projection: pooled text embedding
                    pooled = result[0][:1]
            hidden.append(states.reshape(1, -1, states.shape[-1]))
        out[name] = torch.cat(hidden, dim=-1).to(pipe.unet.dtype)
        if sdxl:
            out[pooled_name] = pooled.to(pipe.unet.dtype)
    return out


# --------------------------------------------------------------------------- safety
@dataclass
class SafetyOutcome:
    status: str  # "checked" | "not_configured" | "disabled"
    flags: list[bool | None]


class SafetyChecker:
    """Pluggable output check: any callable images -> list[bool] (True = unsafe)."""

    def __init__(self, check: Callable[[list[Image.Image]], list[bool]] | None, status: str | None = None):
        self.check = check
        self.status = status or ("checked" if check else "not_configured")

    def __call__(self, images: list[Image.Image]) -> SafetyOutcome:
        if self.check is None:
            return SafetyOutcome(self.status, [None] * len(images))
        flags = [bool(f) for f in self.check(images)]
        if len(flags) != len(images):
            raise RuntimeError("safety check returned a wrong number of flags")
        return SafetyOutcome("checked", flags)


def diffusers_safety_check(folder: str | Path, device: str = "cpu"):
    """diffusers' StableDiffusionSafetyChecker (CLIP concept filter) from a folder that holds
    either a whole SD pipeline (safety_checker/ + feature_extractor/) or both files side by side."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    folder = Path(folder)
    model_dir = folder / "safety_checker" if (folder / "safety_checker").is_dir() else folder
    proc_dir = folder / "feature_extractor" if (folder / "feature_extractor").is_dir() else folder
    checker = StableDiffusionSafetyChecker.from_pretrained(str(model_dir), local_files_only=True).to(device)
    checker.eval()
    processor = CLIPImageProcessor.from_pretrained(str(proc_dir), local_files_only=True)

    def check(images: list[Image.Image]) -> list[bool]:
        clip_input = processor(images, return_tensors="pt").pixel_values.to(device, checker.dtype)
        arrays = [np.asarray(im, dtype=np.float32) / 255.0 for im in images]
        with torch.no_grad():
            _, flags = checker(images=arrays, clip_input=clip_input)
        return [bool(f) for f in flags]

    return check


def safety_from_env(base_model: Path | None, device: str) -> SafetyChecker:
    """SAFETY_CHECKER=off disables; =<folder> loads that checker; unset uses the base model's
    own safety_checker/ when it ships one (SD 1.5 does), else reports "not_configured"."""
    setting = os.environ.get("SAFETY_CHECKER", "").strip()
    if setting.lower() in ("off", "false", "0", "disabled"):
        return SafetyChecker(None, "disabled")
    folder = Path(setting) if setting else None
    if (
        folder is None
        and base_model is not None
        and (base_model / "safety_checker" / "config.json").is_file()
    ):
        folder = base_model
    if folder is None:
        return SafetyChecker(None, "not_configured")
    return SafetyChecker(diffusers_safety_check(folder, device))


@dataclass
class Verdict:
    withheld: bool
    labels: list[dict]


class CheckerModeration:
    """Output moderation by the base model's own safety checker (SafetyChecker): status
    "safety_checker" when one runs, else "not_moderated" (said plainly, never a silent ok)."""

    def __init__(self, checker: SafetyChecker):
        self.checker = checker
        self.status = "safety_checker" if checker.check is not None else "not_moderated"

    def __call__(self, images: list[Image.Image]) -> list[Verdict]:
        flags = self.checker(images).flags
        return [
            Verdict(bool(f), [{"name": "nsfw_concept", "parent": None, "confidence": None, "level": None,
                               "source": "safety_checker"}] if f else [])
            for f in flags
        ]


class RekognitionModeration:
    """Amazon Rekognition DetectModerationLabels on every generated image before anything is
    written; avatarflow.moderation.ImagePolicy decides which labels withhold it."""

    status = "rekognition"

    def __init__(self, client, policy: moderation.ImagePolicy):
        self.client = client
        self.policy = policy

    def __call__(self, images: list[Image.Image]) -> list[Verdict]:
        verdicts = []
        for image in images:
            buf = io.BytesIO()
            image.save(buf, format="PNG")  # Rekognition reads PNG or JPEG bytes (at most 5 MB)
            response = self.client.detect_moderation_labels(
                Image={"Bytes": buf.getvalue()}, MinConfidence=self.policy.min_confidence
            )
            labels = self.policy.labels(response)
            verdicts.append(Verdict(self.policy.withholds(labels), labels))
        return verdicts


OUTPUT_MODERATIONS = ("rekognition", "model")


def output_moderation_from_env(env, safety: SafetyChecker, client=None):
    """OUTPUT_MODERATION=rekognition (the template's default): Rekognition on every image, with
    OUTPUT_MODERATION_MIN_CONFIDENCE / _CATEGORIES. "model" (or unset): the base model's own
    safety checker when it ships one, else "not_moderated"."""
    kind = (env.get("OUTPUT_MODERATION") or "model").strip().lower()
    if kind not in OUTPUT_MODERATIONS:
        raise ValueError(f"OUTPUT_MODERATION must be one of {OUTPUT_MODERATIONS}")
    if kind == "rekognition":
        if client is None:
            import boto3

            client = boto3.client("rekognition")
        return RekognitionModeration(client, moderation.ImagePolicy.from_env("OUTPUT_MODERATION", env))
    return CheckerModeration(safety)


# --------------------------------------------------------------------------- identity
def default_identity():
    """(embed_face, cosine) from the face intake module: one detector in the project."""
    try:
        from avatarflow.faces import cosine_similarity, embed_face
    except ImportError:  # pragma: no cover - the image installs the faces extra
        return None
    return embed_face, cosine_similarity


# --------------------------------------------------------------------------- pipeline
def pick_device_dtype(device: str | None = None, dtype: str | None = None):
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = (
        dtype
        or os.environ.get("AVATARFLOW_DTYPE")
        or ("bfloat16" if device.startswith("cuda") else "float32")
    )
    return device, getattr(torch, name)


def load_base_pipeline(path: str | Path, device: str | None = None, dtype: str | None = None):
    """The base pipeline, once per process. The pipeline's own safety checker is detached:
    the engine runs the configured check itself so it can report and black out per image."""
    global BASE_LOADS
    from diffusers import DiffusionPipeline

    device, torch_dtype = pick_device_dtype(device, dtype)
    pipe = DiffusionPipeline.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    # Decode one image at a time, and in tiles past the VAE's native size: 8 images at 1024 px
    # decoded as one batch need more memory than the whole UNet (fp32 SDXL VAE). Slicing leaves
    # each image's pixels as they were; tiling only acts above the VAE's sample size.
    pipe.vae.enable_slicing()
    pipe.vae.enable_tiling()
    BASE_LOADS += 1
    # diffusers picks SDPA (AttnProcessor2_0) by default on torch 2; log it so a run shows it.
    processors = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    logger.info(
        "base pipeline loaded",
        extra={"path": str(path), "device": device, "dtype": str(torch_dtype), "attn": sorted(processors)},
    )
    return pipe


def fetch_s3_prefix(s3, uri: str, dest: Path) -> Path:
    """Copy a diffusers folder from s3://bucket/prefix/ to dest (base model from S3)."""
    if not uri.startswith("s3://"):
        raise ValueError("base model S3 location must start with s3://")
    bucket, _, prefix = uri[5:].partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    found = False
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) :]
            if not rel or rel.endswith("/") or ".." in rel.split("/"):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(target))
            found = True
    if not found:
        raise FileNotFoundError("no objects under the base model S3 prefix")
    return dest


def _erasure_check_from_env() -> Callable[[str], bool] | None:
    """ERASURES_TABLE (the template sets it on the model) -> avatarflow.erasure's check."""
    name = os.environ.get("ERASURES_TABLE")
    if not name:
        logger.warning("ERASURES_TABLE is not set: generations are not checked against erasures")
        return None
    import boto3

    from avatarflow import erasure

    return erasure.checker(boto3.resource("dynamodb").Table(name))


def make_schedulers(folder_scheduler) -> dict[str, Any]:
    """The samplers a request may pick: DPM-Solver++ 2M built from the folder's scheduler config
    (same betas, prediction type, timestep spacing), and the folder's own scheduler."""
    from diffusers import DPMSolverMultistepScheduler

    dpm = DPMSolverMultistepScheduler.from_config(
        folder_scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )
    return {"dpmpp_2m": dpm, "folder": folder_scheduler}


# --------------------------------------------------------------------------- engine
class Engine:
    def __init__(
        self,
        pipe,
        cache: AdapterCache,
        s3,
        bucket: str,
        *,
        max_rank: int = 64,
        safety: SafetyChecker | None = None,
        identity=default_identity,
        compile_unet: bool = False,
        erased: Callable[[str], bool] | None = None,
        scheduler: str | None = None,
        moderation: CheckerModeration | RekognitionModeration | None = None,
    ):
        self.pipe = pipe
        self.default_scheduler = scheduler or os.environ.get("AVATARFLOW_SCHEDULER") or DEFAULT_SCHEDULER
        if self.default_scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, not {self.default_scheduler!r}")
        self.schedulers = make_schedulers(pipe.scheduler)
        self.cache = cache
        self.s3 = s3
        self.bucket = bucket
        self.target_rank = max_rank
        self.safety = safety or SafetyChecker(None)
        self.moderation = moderation or CheckerModeration(self.safety)
        self.identity = identity() if callable(identity) and identity is default_identity else identity
        self.compile_unet = compile_unet
        # avatarflow.erasure's check (user_id -> marked erased); None: no erasures table configured.
        self.erased = erased
        self.active: tuple[str, str] | None = None
        self.slot_ready = False
        self.slot_rank = 0  # the rank the resident slot's tensors hold (padded), measured
        self.te_loaded = False
        self.switches = {"resident": 0, "load": 0, "hotswap": 0, "replay": 0, "rebuild": 0}
        self.slot_generation = 0  # bumped when the slot's tensors are re-created
        # One generation at a time per worker (the pipeline is not thread-safe). gunicorn runs
        # several threads per worker so that /ping is answered during a generation; /ping reads
        # busy_since and never takes this lock.
        self._lock = threading.Lock()
        self.busy_since: float | None = None  # time.monotonic() when the running generation began

    @classmethod
    def from_env(cls) -> Engine:
        import boto3

        bucket = os.environ["BUCKET_NAME"]
        s3 = boto3.client("s3")
        base = Path(os.environ.get("AVATARFLOW_BASE_MODEL", "/opt/ml/model"))
        if os.environ.get("AVATARFLOW_BASE_MODEL_S3"):
            base = fetch_s3_prefix(s3, os.environ["AVATARFLOW_BASE_MODEL_S3"], Path("/tmp/avatarflow-base"))  # noqa: S108
        device, _ = pick_device_dtype()
        pipe = load_base_pipeline(base, device)
        env = os.environ.get
        cache = AdapterCache(
            s3,
            bucket,
            # One folder per worker process: workers never race on the same files.
            Path(env("AVATARFLOW_ADAPTER_CACHE_DIR", "/tmp/avatarflow-adapters")) / str(os.getpid()),  # noqa: S108
            max_memory_count=int(env("AVATARFLOW_CACHE_MEMORY_COUNT", "16")),
            max_memory_bytes=int(env("AVATARFLOW_CACHE_MEMORY_BYTES", str(2 << 30))),
            max_disk_count=int(env("AVATARFLOW_CACHE_DISK_COUNT", "256")),
            max_disk_bytes=int(env("AVATARFLOW_CACHE_DISK_BYTES", str(20 << 30))),
        )
        return cls(
            pipe,
            cache,
            s3,
            bucket,
            max_rank=int(env("AVATARFLOW_MAX_LORA_RANK", "64")),
            safety=(safety := safety_from_env(base, device)),
            moderation=output_moderation_from_env(os.environ, safety),
            compile_unet=env("AVATARFLOW_COMPILE", "0") == "1",
            erased=_erasure_check_from_env(),
        )

    # ------------------------------------------------------------------ adapters
    def activate(self, adapter: Adapter) -> str:
        """Make `adapter` the one in the pipeline. Returns how: resident (already there), load
        (first adapter: creates the slot), hotswap (diffusers' in-place hotswap), replay (the
        same copies again, from this adapter's recorded plan), rebuild (new slot)."""
        if self.active == adapter.key:
            self.switches["resident"] += 1
            return "resident"
        self.active = None  # a failure below leaves no half-swapped adapter marked as active
        mode = "hotswap" if self.slot_ready else "load"
        if self._replay(adapter):
            mode = "replay"
        elif self.slot_ready and adapter.unet_rank <= self.slot_rank:
            try:
                self._load_unet(adapter, hotswap=True)
                adapter.swap_plan = self._plan(adapter)
            except (RuntimeError, ValueError) as err:
                # Different target modules or LoRA options than the slot: rebuild it once.
                logger.warning(
                    "hotswap not possible, rebuilding the LoRA slot", extra={"reason": str(err)[:300]}
                )
                mode = "rebuild"
        elif self.slot_ready:
            # Rank above the slot's padded rank. Never hand it to diffusers' hotswap: peft then
            # swaps the slot's tensors with the adapter's own (torch.utils.swap_tensors), so the
            # cached adapter ends up holding the previous user's weights.
            mode = "rebuild"
        if mode in ("load", "rebuild"):
            self._rebuild(adapter)
            adapter.swap_plan = self._plan(adapter)
        self._load_text_encoders(adapter)
        self.active = adapter.key
        self.switches[mode] += 1
        return mode

    def _plan(self, adapter: Adapter):
        """Record what diffusers' hotswap just did for this adapter, so the next switch back to
        it is the same tensor copies without diffusers' per-call model walks (~100 ms on SD 1.5
        on CPU, most of a switch). Only plain zero-padding cases are recorded; anything else
        (grouped convs, odd shapes) keeps using diffusers every time."""
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.tuners.lora import LoraLayer

        unet = self._unet()
        state = {k.removeprefix("unet."): v for k, v in adapter.state_dict.items() if k.startswith("unet.")}
        if "lora_A" not in next(iter(state)):
            state = convert_unet_state_dict_to_peft(state)
        slots = {
            name: param
            for name, param in unet.named_parameters()
            if f".lora_A.{UNET_SLOT}." in name or f".lora_B.{UNET_SLOT}." in name
        }
        copies = []
        for key, value in state.items():
            parts = key.rsplit(".", 1)  # "<module>.lora_A.weight" -> slot "<module>.lora_A.user.weight"
            slot = slots.pop(f"{parts[0]}.{UNET_SLOT}.{parts[1]}", None)
            if slot is None or value.dim() != slot.dim() or value.dim() not in (2, 4):
                return None
            if (
                any(n > o for n, o in zip(value.shape, slot.shape, strict=True))
                or value.shape[2:] != slot.shape[2:]
            ):
                return None
            copies.append((weakref.ref(slot), value))
        scalings = []
        for module in unet.modules():
            if isinstance(module, LoraLayer) and UNET_SLOT in module.scaling:
                if getattr(module.get_base_layer(), "groups", 1) > 1:
                    return None
                value = module.scaling[UNET_SLOT]
                scalings.append((weakref.ref(module), float(value)))
        # Weak references to the slot side: a plan kept by a cached adapter must never keep a
        # rebuilt slot's tensors (GPU memory) alive; a dead reference just voids the plan.
        return {
            "generation": self.slot_generation,
            "copies": copies,
            "zero": [weakref.ref(t) for t in slots.values()],
            "scalings": scalings,
        }

    def _replay(self, adapter: Adapter) -> bool:
        import torch

        plan = adapter.swap_plan
        if not self.slot_ready or plan is None or plan["generation"] != self.slot_generation:
            return False
        zero = [ref() for ref in plan["zero"]]
        copies = [(ref(), value) for ref, value in plan["copies"]]
        scalings = [(ref(), scale) for ref, scale in plan["scalings"]]
        if any(t is None for t in zero) or any(t is None for t, _ in copies + scalings):
            adapter.swap_plan = None  # made for a slot that no longer exists
            return False
        with torch.no_grad():
            for tensor in zero:  # modules this adapter does not target
                tensor.zero_()
            for slot, value in copies:
                if slot.shape != value.shape:  # lower rank than the slot: zero padding
                    slot.zero_()
                slot[tuple(slice(0, n) for n in value.shape)].copy_(value)
            for module, scale in scalings:
                current = module.scaling[UNET_SLOT]
                if isinstance(current, torch.Tensor):
                    current.fill_(scale)  # same tensor object: a compiled graph stays valid
                else:
                    module.scaling[UNET_SLOT] = scale
        return True

    def _unet(self):
        unet = self.pipe.unet
        return getattr(unet, "_orig_mod", unet)

    def _slot_rank(self) -> int:
        """The rank the slot's tensors hold now (padded to the target rank by diffusers)."""
        marker = f".lora_A.{UNET_SLOT}."
        ranks = [p.shape[0] for name, p in self._unet().named_parameters() if marker in name]
        return max(ranks, default=0)

    def _load_unet(self, adapter: Adapter, hotswap: bool) -> None:
        # Always copies: whatever diffusers/peft do with the tensors they are given (inject them
        # as parameters on a load, swap_tensors them on a hotswap that grows a rank), the
        # cached adapter's own tensors must never become, or be swapped with, the slot's.
        state = {k: v.clone() for k, v in adapter.state_dict.items() if k.startswith("unet.")}
        type(self.pipe).load_lora_into_unet(
            state,
            network_alphas=adapter.network_alphas,
            unet=self.pipe.unet,
            adapter_name=UNET_SLOT,
            _pipeline=self.pipe,
            hotswap=hotswap,
            metadata=adapter.metadata,
        )

    def _rebuild(self, adapter: Adapter) -> None:
        """Fresh slot sized for this adapter. Never reloads the base weights; on a compiled
        UNet it costs one recompile, which is why it only happens when hotswap cannot."""
        if self.compile_unet and hasattr(self.pipe.unet, "_orig_mod"):
            self.pipe.unet = self.pipe.unet._orig_mod
        # Plans recorded against the old slot die with it (they only hold weak references to
        # it anyway); dropping them here also frees their bookkeeping at once.
        for cached in list(self.cache.memory.values()):
            cached.swap_plan = None
        if getattr(self._unet(), "peft_config", None):
            self.pipe.unload_lora_weights()
        self.slot_ready = False
        self.slot_rank = 0
        self.slot_generation += 1
        self.te_loaded = False
        self.target_rank = max(self.target_rank, adapter.unet_rank)
        self.pipe.enable_lora_hotswap(target_rank=self.target_rank)
        try:
            self._load_unet(adapter, hotswap=False)
        except (RuntimeError, ValueError, KeyError) as err:
            if getattr(self._unet(), "peft_config", None):
                self.pipe.unload_lora_weights()
            raise AdapterInvalid(f"adapter does not fit the base model: {str(err)[:200]}") from err
        self.slot_ready = True
        self.slot_rank = self._slot_rank()
        if self.compile_unet:
            import torch

            self.pipe.unet = torch.compile(
                self.pipe.unet,
                mode=os.environ.get("AVATARFLOW_COMPILE_MODE") or None,
                backend=os.environ.get("AVATARFLOW_COMPILE_BACKEND") or "inductor",  # aot_eager: CPU tests
            )

    def _load_text_encoders(self, adapter: Adapter) -> None:
        from diffusers.utils.peft_utils import delete_adapter_layers

        names = [n for n in ("text_encoder", "text_encoder_2") if getattr(self.pipe, n, None) is not None]
        if self.te_loaded:
            for name in names:
                if TE_SLOT in (getattr(getattr(self.pipe, name), "peft_config", None) or {}):
                    delete_adapter_layers(getattr(self.pipe, name), TE_SLOT)
            self.te_loaded = False
        if not adapter.has_text_encoder:
            return
        for name in names:
            part = {k: v.clone() for k, v in adapter.state_dict.items() if k.startswith(f"{name}.")}
            if not part:
                continue
            type(self.pipe).load_lora_into_text_encoder(
                part,
                network_alphas=adapter.network_alphas,
                text_encoder=getattr(self.pipe, name),
                prefix=name,
                adapter_name=TE_SLOT,
                _pipeline=self.pipe,
                metadata=adapter.metadata,
            )
            self.te_loaded = True

    # ------------------------------------------------------------------ generation
    def run(self, req: GenerationRequest) -> dict[str, Any]:
        """One generation; concurrent callers wait their turn on the pipeline."""
        with self._lock:
            self.busy_since = time.monotonic()
            try:
                return self._run(req)
            finally:
                self.busy_since = None

    def busy_for(self) -> float | None:
        """Seconds the running generation has held the pipeline, None when idle. Lock-free, so
        a health check never waits for a generation."""
        since = self.busy_since
        return None if since is None else time.monotonic() - since

    def _refuse_erased(self, req: GenerationRequest) -> None:
        """Nothing is generated or written for a user erased meanwhile (DELETE /users/{id})."""
        if self.erased is not None and self.erased(req.user_id):
            raise UserErased("the user's data was deleted; nothing was generated or written")

    def _run(self, req: GenerationRequest) -> dict[str, Any]:
        import torch

        self._refuse_erased(req)
        t0 = time.perf_counter()
        adapter, source, fetch_ms = self.cache.get(req.user_id, req.model_version)
        prompt = pipeline_prompt(req.prompt, adapter.token, adapter.subject_class, req.negative_prompt)
        negative = req.negative_prompt if req.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT
        tokens = {name: prompt_token_count(self.pipe.tokenizer, text) for name, text in
                  (("prompt", prompt), ("negative_prompt", negative))}
        too_long = {
            name: f"{count} CLIP tokens; the limit is {MAX_PROMPT_TOKENS} tokens"
            for name, count in tokens.items()
            if count > MAX_PROMPT_TOKENS
        }
        if too_long:
            raise RequestInvalid(too_long)
        t = time.perf_counter()
        mode = self.activate(adapter)
        load_ms = _ms(t)

        scheduler = req.scheduler or self.default_scheduler
        self.pipe.scheduler = self.schedulers[scheduler]
        seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1)
        seeds = [seed + i for i in range(req.num_images)]
        # CPU generators: the same seed gives the same starting noise on any device.
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        window = self.pipe.tokenizer.model_max_length - 2
        t = time.perf_counter()
        with torch.inference_mode():
            if max(tokens.values()) > window:  # past one CLIP window: encoded in windows
                texts = encode_long_prompts(self.pipe, prompt, negative, self.pipe.unet.device)
            else:  # the pipeline's own encoding (identical to plain diffusers)
                texts = {"prompt": prompt, "negative_prompt": negative}
            out = self.pipe(
                **texts,
                num_inference_steps=req.steps,
                guidance_scale=req.guidance_scale,
                width=req.width,
                height=req.height,
                num_images_per_prompt=req.num_images,
                generator=generators,
                output_type="np",
            )
        arrays = (np.clip(out.images, 0.0, 1.0) * 255).round().astype(np.uint8)
        generate_ms = _ms(t)

        t = time.perf_counter()
        images = [Image.fromarray(a) for a in arrays]
        # Checked before anything is written: a withheld image is never stored, so nothing can
        # presign or link it; result.json records its labels.
        verdicts = self.moderation(images)
        if len(verdicts) != len(images):
            raise RuntimeError("output moderation returned a wrong number of verdicts")
        withheld = [v.withheld for v in verdicts]
        safety_ms = _ms(t)

        t = time.perf_counter()
        similarity = self._identity(images, adapter.reference_embedding, withheld)
        identity_ms = _ms(t)

        # The generation took seconds to minutes: a DELETE may have come meanwhile. Checked
        # right before the first write; the erasure's sweep removes any image written after it.
        self._refuse_erased(req)
        t = time.perf_counter()
        prefix = keys.generation_prefix(req.user_id, req.generation_id)
        entries = []
        for i, (image, verdict) in enumerate(zip(images, verdicts, strict=True)):
            entry = {"seed": seeds[i], "identity_similarity": similarity[i], "withheld": verdict.withheld,
                     "moderation_labels": verdict.labels}
            if not verdict.withheld:
                key = f"{prefix}{i:03d}.png"
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                self.s3.put_object(Bucket=self.bucket, Key=key, Body=buf.getvalue(), ContentType="image/png")
                entry = {"key": key, **entry}
            entries.append(entry)
        result = {
            "status": "COMPLETED",
            "generation_id": req.generation_id,
            "user_id": req.user_id,
            "model_version": req.model_version,
            "prompt": prompt,
            "negative_prompt": negative,
            "num_images": req.num_images,
            "steps": req.steps,
            "guidance_scale": req.guidance_scale,
            "width": arrays.shape[2],
            "height": arrays.shape[1],
            "seed": seed,
            "scheduler": scheduler,
            "prompt_tokens": tokens["prompt"],
            "images": entries,
            "output_moderation": self.moderation.status,
            "withheld": sum(withheld),
            "identity_check": self._identity_status(adapter),
            "adapter": {"source": source, "switch": mode, "rank": adapter.rank},
            "timings": {
                "adapter_fetch_ms": fetch_ms,
                "adapter_load_ms": load_ms,
                "generate_ms": generate_ms,
                "safety_ms": safety_ms,
                "identity_ms": identity_ms,
            },
        }
        result["timings"]["upload_ms"] = _ms(t)
        result["timings"]["total_ms"] = _ms(t0)
        self.s3.put_object(
            Bucket=self.bucket,
            Key=keys.result_key(req.user_id, req.generation_id),
            Body=json.dumps(result).encode(),
            ContentType="application/json",
        )
        logger.info(
            "generation done",
            extra={
                "generation_id": req.generation_id,
                "user_id": req.user_id,
                "images": req.num_images,
                "timings": result["timings"],
                "adapter": result["adapter"],
            },
        )
        return result

    def _identity(self, images, reference: Sequence[float] | None, flags) -> list[float | None]:
        if self.identity is None or reference is None:
            return [None] * len(images)
        embed, cosine = self.identity
        scores: list[float | None] = []
        for image, flagged in zip(images, flags, strict=True):
            emb = None if flagged else embed(image)
            scores.append(None if emb is None else round(float(cosine(emb, reference)), 6))
        return scores

    def _identity_status(self, adapter: Adapter) -> str:
        if self.identity is None:
            return "unavailable"
        return "checked" if adapter.reference_embedding is not None else "no_reference"


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)
