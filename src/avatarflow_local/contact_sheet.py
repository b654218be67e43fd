"""The demo's contact sheet: uploaded photos (with rejection reasons) -> face crops ->
generated avatars (with their identity scores) -> the avatar pack the workflow made after
MODEL_READY (one kept image per style, with its style), one row each, drawn with Pillow."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

THUMB = 112
AVATAR = 192
PAD = 10
LABEL_H = 30
ROW_TITLE_W = 110
BG = (250, 250, 248)
INK = (30, 30, 30)
OK = (40, 150, 70)
BAD = (200, 40, 40)
MUTED = (110, 110, 110)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _thumb(path: Path, side: int) -> Image.Image:
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        if max(image.size) < side:  # tiny-model crops and avatars (64 px): keep pixels sharp
            return image.resize((side, side), Image.NEAREST)
        return ImageOps.fit(image, (side, side), Image.LANCZOS)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if not text.endswith("…") else text[:-2] + "…"
    return text


def contact_sheet(
    photos: list[tuple[Path, str | None]],
    crops: list[Path],
    avatars: list[tuple[Path, float | None, int | None]],
    title: str,
    note: str = "",
    pack: list[tuple[Path, str, float | None]] | None = None,
) -> Image.Image:
    """photos: (path, rejection reason or None); avatars: (path, identity score or None, seed);
    pack: (path, style name, identity score or None), the pack's kept images."""
    pack = pack or []
    per_row = max(len(photos), len(crops), 1)
    width = ROW_TITLE_W + PAD + per_row * (THUMB + PAD)
    width = max(width, ROW_TITLE_W + PAD + max(len(avatars), len(pack)) * (AVATAR + PAD), 900)
    height = 50 + (THUMB + LABEL_H + PAD) * 2 + AVATAR + LABEL_H + PAD + 40
    if pack:
        height += AVATAR + LABEL_H + PAD
    sheet = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(sheet)
    big, small = _font(20), _font(12)
    draw.text((PAD, 12), title, fill=INK, font=big)

    y = 50
    draw.text((PAD, y + THUMB // 2 - 8), "photos", fill=INK, font=_font(16))
    for i, (path, reason) in enumerate(photos):
        x = ROW_TITLE_W + PAD + i * (THUMB + PAD)
        sheet.paste(_thumb(path, THUMB), (x, y))
        colour = BAD if reason else OK
        draw.rectangle((x - 2, y - 2, x + THUMB + 1, y + THUMB + 1), outline=colour, width=3)
        label = reason.replace("_", " ") if reason else "ok"
        draw.text((x, y + THUMB + 4), _fit_text(draw, label, small, THUMB), fill=colour, font=small)
        draw.text((x, y + THUMB + 16), _fit_text(draw, path.name, small, THUMB), fill=MUTED, font=small)

    y += THUMB + LABEL_H + PAD
    draw.text((PAD, y + THUMB // 2 - 8), "crops", fill=INK, font=_font(16))
    for i, path in enumerate(crops):
        x = ROW_TITLE_W + PAD + i * (THUMB + PAD)
        sheet.paste(_thumb(path, THUMB), (x, y))
        draw.text((x, y + THUMB + 4), path.name, fill=MUTED, font=small)

    y += THUMB + LABEL_H + PAD
    draw.text((PAD, y + AVATAR // 2 - 8), "avatars", fill=INK, font=_font(16))
    for i, (path, score, seed) in enumerate(avatars):
        x = ROW_TITLE_W + PAD + i * (AVATAR + PAD)
        sheet.paste(_thumb(path, AVATAR), (x, y))
        text = f"identity {score:.2f}" if score is not None else "identity n/a (no face found)"
        draw.text((x, y + AVATAR + 4), text, fill=INK if score is not None else MUTED, font=small)
        if seed is not None:
            draw.text((x, y + AVATAR + 16), f"seed {seed}", fill=MUTED, font=small)
    if pack:
        y += AVATAR + LABEL_H + PAD
        draw.text((PAD, y + AVATAR // 2 - 8), "pack", fill=INK, font=_font(16))
        for i, (path, style, score) in enumerate(pack):
            x = ROW_TITLE_W + PAD + i * (AVATAR + PAD)
            sheet.paste(_thumb(path, AVATAR), (x, y))
            draw.text((x, y + AVATAR + 4), _fit_text(draw, style, small, AVATAR), fill=INK, font=small)
            text = f"identity {score:.2f}" if score is not None else "identity n/a"
            draw.text((x, y + AVATAR + 16), text, fill=MUTED, font=small)
    if note:
        draw.text((PAD, height - 26), note, fill=MUTED, font=small)
    return sheet
