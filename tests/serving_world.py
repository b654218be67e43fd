"""Shared by the serving tests: adapters as the trainer saves them, published in moto S3, and
fresh engines over a tiny base model (tests/test_serving_isolation.py, tests/test_prompts.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from adapter_cache import AdapterCache
from inference_engine import Engine, GenerationRequest, load_base_pipeline
from PIL import Image

from avatarflow import keys

BUCKET = "serving-test"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "v_proj"]


def make_adapter(base: Path, out: Path, variant: str, rank: int, text_encoder: bool, seed: int) -> Path:
    """An adapter as the trainer saves it (save_lora_weights + peft metadata), with distinct
    random non-zero weights; SDXL text-encoder LoRA covers both encoders."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    gen = torch.Generator().manual_seed(seed)

    def lora(model, targets):
        config = LoraConfig(r=rank, lora_alpha=rank * 1.5, target_modules=targets, init_lora_weights=False)
        model.add_adapter(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(model)), config.to_dict()

    layers, meta = lora(UNet2DConditionModel.from_pretrained(base / "unet"), UNET_TARGETS)
    kwargs = {"unet_lora_layers": layers, "unet_lora_adapter_metadata": meta}
    if text_encoder:
        encoders = {"text_encoder": CLIPTextModel}
        if variant == "sdxl":
            encoders["text_encoder_2"] = CLIPTextModelWithProjection
        for name, cls in encoders.items():
            layers, meta = lora(cls.from_pretrained(base / name), TE_TARGETS)
            kwargs[f"{name}_lora_layers"] = layers
            kwargs[f"{name}_lora_adapter_metadata"] = meta
    out.mkdir(parents=True, exist_ok=True)
    pipeline = StableDiffusionXLPipeline if variant == "sdxl" else StableDiffusionPipeline
    pipeline.save_lora_weights(out, **kwargs)
    return out


def publish(s3, folder: Path, user: str, config: dict) -> None:
    prefix = keys.model_prefix(user, "v1")
    s3.upload_file(str(folder / keys.ADAPTER_WEIGHTS), BUCKET, prefix + keys.ADAPTER_WEIGHTS)
    s3.put_object(Bucket=BUCKET, Key=prefix + keys.ADAPTER_CONFIG, Body=json.dumps(config))


def new_engine(s3, base: Path, cache_dir: Path, max_rank: int = 8, **kwargs) -> Engine:
    pipe = load_base_pipeline(base, "cpu")
    return Engine(
        pipe, AdapterCache(s3, BUCKET, cache_dir), s3, BUCKET, max_rank=max_rank, identity=None, **kwargs
    )


def request(gen_id: str, user: str, **extra) -> GenerationRequest:
    body = {
        "generation_id": gen_id,
        "user_id": user,
        "model_version": "v1",
        "prompt": "portrait of sks person",
        "negative_prompt": "blurry",
        "num_images": 1,
        "steps": 2,
        "guidance_scale": 5.0,
        "width": 64,
        "height": 64,
        "seed": 11,
    }
    return GenerationRequest(**(body | extra))


def image(s3, result: dict, i: int = 0) -> np.ndarray:
    body = s3.get_object(Bucket=BUCKET, Key=result["images"][i]["key"])["Body"].read()
    return np.asarray(Image.open(io.BytesIO(body)))
