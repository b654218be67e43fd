"""A tiny random Stable Diffusion (or SDXL) pipeline, built from config with no download.

Tests and the local runtime use it as the base model: it is a normal diffusers folder
(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), so the training and
inference containers load it exactly as they load real SD 1.5 / SDXL weights. The module
shapes follow diffusers' own pipeline tests; the whole folder is a few MB and a 64x64 image
takes a fraction of a second on one CPU core.

The VAE has two blocks, so its scale factor is 2 (not 8): 64 px images -> 32 px latents,
which matches the UNet's sample_size.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from avatarflow.workflow import DEFAULT_TOKEN

READY_MARKER = ".avatarflow_tiny_ready"
TINY_RESOLUTION = 64

# Words that get a single BPE token each, so the prompts used across the project tokenize
# into short, meaningful sequences (the rare token first of all).
_WORDS = (
    DEFAULT_TOKEN, "person", "photo", "a", "of", "man", "woman", "portrait", "in", "the",
    "style", "painting", "an", "astronaut", "with", "and", "face", "smiling", "background",
)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """A tiny CLIP BPE vocabulary: every byte (alone and word-final), whole-word tokens for
    _WORDS via left-to-right merges, then the two special tokens last (CLIP's layout: the
    end-of-text id is the largest, which older transformers use to find the pooled token)."""
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[str] = []
    for word in _WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for nxt in symbols[1:]:
            pair = f"{current} {nxt}"
            if pair not in merges:
                merges.append(pair)
            current = current + nxt
            vocab.setdefault(current, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    vocab_path = folder / "vocab.json"
    merges_path = folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def build_tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path = _write_tokenizer_files(Path(tmp))
        # Positional: transformers 4.x names them vocab_file/merges_file, 5.x vocab/merges.
        tokenizer = CLIPTokenizer(str(vocab_path), str(merges_path), model_max_length=77)
    return tokenizer


def _text_config(tokenizer, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        projection_dim=projection_dim,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=TINY_RESOLUTION,
    )


def sd_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    # SD's training schedule (scaled_linear 0.00085..0.012); DDIM for fast sampling. Also used
    # by the full-size random SD 1.5 of the benches: the schedule does not depend on size.
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _build_sd(seed: int, prediction_type: str):
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=TINY_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    torch.manual_seed(seed + 1)
    vae = _vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(seed: int, prediction_type: str):
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tokenizer()
    tokenizer_2 = build_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=TINY_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        # 6 time ids x 8 + text_encoder_2's pooled projection (32)
        projection_class_embeddings_input_dim=80,
        # hidden states of both text encoders, concatenated (32 + 32)
        cross_attention_dim=64,
    )
    torch.manual_seed(seed + 1)
    vae = _vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=sd_scheduler(prediction_type),
        force_zeros_for_empty_prompt=True,
    )


def build_tiny_pipeline(
    path: str | Path,
    variant: str = "sd",
    seed: int = 0,
    prediction_type: str = "epsilon",
) -> Path:
    """Save a tiny random pipeline at `path` and return it. Deterministic for a seed.

    Idempotent: a folder that already holds a finished build (the ready marker, written last,
    with the same parameters) is returned as is, so the local runtime can cache it. The build
    goes to a sibling temp folder first, so a crash never leaves a half-written model that
    looks ready."""
    if variant not in ("sd", "sdxl"):
        raise ValueError(f"variant must be 'sd' or 'sdxl', not {variant!r}")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")
    path = Path(path)
    params = {"variant": variant, "seed": seed, "prediction_type": prediction_type}
    marker = path / READY_MARKER
    if marker.is_file():
        if json.loads(marker.read_text(encoding="utf-8")) == params:
            return path
        raise FileExistsError(f"{path} holds a tiny model built with other parameters: {marker.read_text()}")
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists, is not empty and is not a finished tiny model")

    build = _build_sdxl if variant == "sdxl" else _build_sd
    pipe = build(seed, prediction_type)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / READY_MARKER).write_text(json.dumps(params), encoding="utf-8")
        if path.exists():
            path.rmdir()  # empty (checked above)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path

