"""Per-user LoRA adapters: fetched from `models/<user_id>/<version>/` on first use, kept in
two LRU tiers, each bounded by count and by bytes:

* disk: the two files under `<cache_dir>/<user_id>/<version>/`, so an adapter evicted from
  memory is re-read locally instead of downloaded again;
* memory: the parsed state dict (what diffusers' lora_state_dict returns), so a switch
  between cached users costs one in-place weight copy.

An adapter evicted from both tiers is simply fetched again. One cache per worker process
(gunicorn forks one worker per GPU), so no locking across processes is needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from avatarflow import keys
from avatarflow.ids import validate_id
from avatarflow.workflow import DEFAULT_SUBJECT_CLASS, DEFAULT_TOKEN


class AdapterNotFound(LookupError):
    """No published adapter at models/<user_id>/<version>/."""


class AdapterInvalid(ValueError):
    """The adapter exists but cannot be used (bad adapter.json, no UNet weights, too large)."""


@dataclass
class Adapter:
    user_id: str
    version: str
    state_dict: dict[str, Any]
    network_alphas: dict[str, float] | None
    metadata: dict[str, Any] | None
    config: dict[str, Any]
    disk_bytes: int
    nbytes: int = 0
    rank: int = 0  # the largest LoRA rank in the file (UNet and text encoders)
    unet_rank: int = 0  # the largest UNet LoRA rank: what must fit the engine's slot
    has_text_encoder: bool = False
    # Set by the engine after the first diffusers hotswap of this adapter: the exact in-place
    # copies that swap made, replayed on later switches (lives and dies with this entry).
    swap_plan: Any = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.user_id, self.version)

    @property
    def token(self) -> str:
        return str(self.config.get("token") or DEFAULT_TOKEN)

    @property
    def subject_class(self) -> str:
        return str(self.config.get("subject_class") or DEFAULT_SUBJECT_CLASS)

    @property
    def reference_embedding(self) -> list[float] | None:
        ref = self.config.get("reference_embedding")
        return ref if isinstance(ref, list) and ref else None


@dataclass
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    s3_fetches: int = 0
    memory_evictions: int = 0
    disk_evictions: int = 0
    extra: dict[str, int] = field(default_factory=dict)


# The "down" (A) matrix of a LoRA pair in every key layout diffusers' lora_state_dict returns:
# peft (lora_A), diffusers (lora.down), old attention processors (lora_linear_layer.down) and
# kohya (lora_down). Its first dimension is the rank, for Linear and Conv2d alike.
_DOWN_KEY = re.compile(r"(?:\.lora_A\.|\.lora\.down\.|\.lora_linear_layer\.down\.|\.lora_down\.)")


def lora_rank(state_dict: dict[str, Any], prefix: str = "") -> int:
    """The largest LoRA rank among the keys under `prefix`, read from the tensor shapes (the
    truth the slot has to hold). The first version looked for "lora_B" keys, which
    lora_state_dict never returns for a diffusers-format file, so every adapter reported
    rank 0 and a rank above the slot was hot-swapped into it."""
    ranks = [
        int(v.shape[0])
        for k, v in state_dict.items()
        if k.startswith(prefix) and _DOWN_KEY.search(k) and getattr(v, "ndim", 0) >= 2
    ]
    return max(ranks, default=0)


def parse_adapter(path: Path) -> tuple[dict, dict | None, dict | None]:
    """Read the weights exactly as `pipe.load_lora_weights(folder)` would, once, so that a
    switch can hand the parsed dict (and its alpha metadata) straight to the loader."""
    from diffusers import StableDiffusionPipeline

    # lora_state_dict is a classmethod shared by the SD/SDXL loaders (same key layout).
    state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
        str(path.parent), weight_name=path.name, return_lora_metadata=True
    )
    return state_dict, alphas, metadata


class AdapterCache:
    def __init__(
        self,
        s3,
        bucket: str,
        cache_dir: str | Path,
        *,
        max_memory_count: int = 8,
        max_memory_bytes: int = 1 << 30,
        max_disk_count: int = 64,
        max_disk_bytes: int = 8 << 30,
        max_adapter_bytes: int = 512 << 20,
        parse: Callable[[Path], tuple[dict, dict | None, dict | None]] = parse_adapter,
    ):
        self.s3 = s3
        self.bucket = bucket
        self.root = Path(cache_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_memory_count = max_memory_count
        self.max_memory_bytes = max_memory_bytes
        self.max_disk_count = max_disk_count
        self.max_disk_bytes = max_disk_bytes
        self.max_adapter_bytes = max_adapter_bytes
        self.parse = parse
        self.memory: OrderedDict[tuple[str, str], Adapter] = OrderedDict()
        self.disk: OrderedDict[tuple[str, str], int] = OrderedDict()  # key -> bytes on disk
        self.stats = CacheStats()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ public
    @property
    def memory_bytes(self) -> int:
        return sum(a.nbytes for a in self.memory.values())

    @property
    def disk_bytes(self) -> int:
        return sum(self.disk.values())

    def get(self, user_id: str, version: str) -> tuple[Adapter, str, float]:
        """The adapter, where it came from ("memory", "disk", "s3") and the ms it took."""
        key = (validate_id(user_id, "user_id"), validate_id(version, "model_version"))
        start = time.perf_counter()
        with self._lock:
            adapter = self.memory.get(key)
            if adapter is not None:
                self.memory.move_to_end(key)
                self.stats.memory_hits += 1
                return adapter, "memory", _ms(start)
            source = "disk"
            if key in self.disk and self._folder(key).joinpath(keys.ADAPTER_WEIGHTS).is_file():
                self.disk.move_to_end(key)
                self.stats.disk_hits += 1
            else:
                self.disk.pop(key, None)
                self._download(key)
                self.stats.s3_fetches += 1
                source = "s3"
            adapter = self._load(key)
            self.memory[key] = adapter
            self._evict_memory()
            return adapter, source, _ms(start)

    # ------------------------------------------------------------------ internals
    def _folder(self, key: tuple[str, str]) -> Path:
        return self.root / key[0] / key[1]

    def _download(self, key: tuple[str, str]) -> None:
        prefix = keys.model_prefix(*key)
        weights_key = prefix + keys.ADAPTER_WEIGHTS
        try:
            head = self.s3.head_object(Bucket=self.bucket, Key=weights_key)
            config_obj = self.s3.get_object(Bucket=self.bucket, Key=prefix + keys.ADAPTER_CONFIG)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            # The endpoint's role may read models/* but not list the bucket, so S3 answers a
            # missing adapter with 403, never 404 (a denied read of models/* cannot happen
            # otherwise: the grant covers every key there).
            if code in ("404", "NoSuchKey", "NotFound", "403", "AccessDenied"):
                raise AdapterNotFound(f"no adapter published for this user at version {key[1]}") from err
            raise
        if head["ContentLength"] > self.max_adapter_bytes:
            raise AdapterInvalid(f"adapter weights exceed {self.max_adapter_bytes} bytes")
        config_bytes = config_obj["Body"].read()
        _parse_config(config_bytes)  # fail before spending a download on a broken adapter

        folder = self._folder(key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Download into a sibling temp folder and rename: a crash never leaves half a file
        # that a later request would take for a cached adapter.
        tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=folder.parent))
        try:
            self.s3.download_file(self.bucket, weights_key, str(tmp / keys.ADAPTER_WEIGHTS))
            (tmp / keys.ADAPTER_CONFIG).write_bytes(config_bytes)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.disk[key] = sum(p.stat().st_size for p in folder.iterdir())
        self._evict_disk(keep=key)

    def _load(self, key: tuple[str, str]) -> Adapter:
        folder = self._folder(key)
        config = _parse_config((folder / keys.ADAPTER_CONFIG).read_bytes())
        try:
            state_dict, alphas, metadata = self.parse(folder / keys.ADAPTER_WEIGHTS)
        except Exception as err:  # safetensors/diffusers raise many types for a bad file
            raise AdapterInvalid(f"adapter weights cannot be read ({err.__class__.__name__})") from err
        unet_keys = [k for k in state_dict if k.startswith("unet.")]
        if not unet_keys:
            raise AdapterInvalid("adapter has no UNet LoRA weights")
        return Adapter(
            user_id=key[0],
            version=key[1],
            state_dict=state_dict,
            network_alphas=alphas,
            metadata=metadata,
            config=config,
            disk_bytes=self.disk.get(key, 0),
            nbytes=sum(v.numel() * v.element_size() for v in state_dict.values()),
            rank=lora_rank(state_dict),
            unet_rank=lora_rank(state_dict, prefix="unet."),
            has_text_encoder=any(not k.startswith("unet.") for k in state_dict),
        )

    def _evict_memory(self) -> None:
        # The newest entry always stays, even alone over the byte bound: it is in use.
        while len(self.memory) > 1 and (
            len(self.memory) > self.max_memory_count or self.memory_bytes > self.max_memory_bytes
        ):
            self.memory.popitem(last=False)
            self.stats.memory_evictions += 1

    def _evict_disk(self, keep: tuple[str, str]) -> None:
        while len(self.disk) > 1 and (
            len(self.disk) > self.max_disk_count or self.disk_bytes > self.max_disk_bytes
        ):
            key = next(iter(self.disk))
            if key == keep:  # pragma: no cover - keep is always the newest
                break
            self.disk.pop(key)
            shutil.rmtree(self._folder(key), ignore_errors=True)
            with contextlib.suppress(OSError):  # the user's folder, once it holds no version
                self._folder(key).parent.rmdir()
            self.stats.disk_evictions += 1


def _parse_config(data: bytes) -> dict[str, Any]:
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterInvalid("adapter.json is not valid JSON") from err
    if not isinstance(config, dict):
        raise AdapterInvalid("adapter.json must be a JSON object")
    ref = config.get("reference_embedding")
    if ref is not None and not (isinstance(ref, list) and all(isinstance(v, int | float) for v in ref)):
        raise AdapterInvalid("adapter.json reference_embedding must be a list of numbers or null")
    token = config.get("token")
    if token is not None and (not isinstance(token, str) or not token.strip() or len(token) > 32):
        raise AdapterInvalid("adapter.json token must be a short non-empty string")
    return config


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)
