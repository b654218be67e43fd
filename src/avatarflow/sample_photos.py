"""Real photos that ship inside installed packages, and derived test cases.

For tests, `make demo` and benchmarks only (scikit-image, matplotlib and scikit-learn are
dev dependencies, imported lazily). Faces: scikit-image's astronaut (Eileen Collins) and
camera (the cameraman), matplotlib's grace_hopper. No face: scikit-image chelsea, coffee,
rocket; scikit-learn china, flower.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from functools import cache

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

FACE_PHOTOS = ("astronaut", "camera", "grace_hopper")
NO_FACE_PHOTOS = ("chelsea", "coffee", "rocket", "china", "flower")


@cache
def _load(name: str) -> Image.Image:
    if name in ("astronaut", "camera", "chelsea", "coffee", "rocket"):
        from skimage import data

        array = getattr(data, name)()
    elif name == "grace_hopper":
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as handle:
            array = np.asarray(Image.open(handle).convert("RGB"))
    elif name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        array = load_sample_image(f"{name}.jpg")
    else:
        raise KeyError(f"unknown sample photo {name!r}")
    return Image.fromarray(np.asarray(array)).convert("RGB")


def photo(name: str) -> Image.Image:
    """A shipped photo as an RGB PIL image (a fresh copy)."""
    return _load(name).copy()


def encode(image: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        params.setdefault("quality", 92)
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def photo_bytes(name: str, fmt: str = "JPEG") -> bytes:
    return encode(photo(name), fmt)


# --------------------------------------------------------------------------- derived cases


def with_orientation(image: Image.Image, orientation: int, **params) -> bytes:
    """JPEG whose pixels are stored sideways with the EXIF orientation tag that makes a
    viewer (and ImageOps.exif_transpose) show `image` upright, as phones do."""
    stored = {
        1: image,
        3: image.transpose(Image.Transpose.ROTATE_180),
        6: image.transpose(Image.Transpose.ROTATE_90),
        8: image.transpose(Image.Transpose.ROTATE_270),
    }[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", exif=exif.tobytes(), **params)


def blurred(image: Image.Image, radius: float = 6) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius))


def darkened(image: Image.Image, factor: float = 0.15) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(factor)


def shrunk_in_canvas(image: Image.Image, scale: float = 0.25, canvas: int = 1400) -> Image.Image:
    """The photo shrunk and pasted on a large grey canvas: a face far too small to crop."""
    small = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    board = Image.new("RGB", (canvas, canvas), (128, 128, 128))
    board.paste(small, ((canvas - small.width) // 2, (canvas - small.height) // 2))
    return board


def collage(*names: str, height: int = 512) -> Image.Image:
    """Photos side by side at the same height: several faces in one picture."""
    parts = [photo(n) for n in names]
    parts = [p.resize((round(p.width * height / p.height), height), Image.LANCZOS) for p in parts]
    board = Image.new("RGB", (sum(p.width for p in parts), height))
    x = 0
    for part in parts:
        board.paste(part, (x, 0))
        x += part.width
    return board


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def random_bytes(n: int = 4096, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def png_claiming(width: int = 20_000, height: int = 20_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (400 MP by default)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b""
    )


def oversized(limit: int) -> bytes:
    """A valid JPEG padded (inside a COM segment chain) past `limit` bytes."""
    base = photo_bytes("grace_hopper")
    segment = b"\xff\xfe" + struct.pack(">H", 65535) + b"\0" * 65533
    count = math.ceil((limit - len(base)) / len(segment)) + 1
    return base[:2] + segment * count + base[2:]


def phone_photo(
    name: str | Image.Image, size: tuple[int, int] = (4032, 3024), orientation: int = 6, seed: int = 0
) -> bytes:
    """A 12 MP phone-like JPEG made from a shipped photo: upscaled to fill `size` (the
    sensor's landscape frame), sensor-like noise so it compresses like a real photo. With
    orientation 6 or 8 it is a portrait shot stored sideways with the EXIF tag, as phones do."""
    base = photo(name) if isinstance(name, str) else name
    width, height = size if orientation in (1, 3) else size[::-1]  # 6 and 8: a portrait shot
    scale = max(width / base.width, height / base.height)
    big = base.resize((math.ceil(base.width * scale), math.ceil(base.height * scale)), Image.BICUBIC)
    left, top = (big.width - width) // 2, (big.height - height) // 2
    big = big.crop((left, top, left + width, top + height))
    noise = np.random.default_rng(seed).normal(0, 4, (height, width, 1)).astype(np.float32)
    array = np.clip(np.asarray(big, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return with_orientation(Image.fromarray(array), orientation, quality=90)


# --------------------------------------------------------------------------- one person


def _variant(base: Image.Image, i: int) -> Image.Image:
    """Variant i of one portrait: each changes what the face crop sees (tilt, mirror,
    re-framing against the border, light), like photos taken seconds apart."""
    angles = (0, 7, -7, 13, -13, 4)
    image = base
    if i % 2 == 1:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    angle = angles[(i // 2) % len(angles)]
    if angle:
        image = image.rotate(angle, resample=Image.BICUBIC, fillcolor=(40, 40, 40))
    # Re-frame: crop a window that shifts with i, then zoom to a common size.
    zoom = (1.0, 0.92, 0.86)[i % 3]
    w, h = image.size
    cw, ch = round(w * zoom), round(h * zoom)
    dx = (w - cw) * ((i * 7) % 5) // 4
    dy = (h - ch) * ((i * 3) % 4) // 3
    image = image.crop((dx, dy, dx + cw, dy + ch)).resize((w, h), Image.LANCZOS)
    light = (1.0, 1.15, 0.85, 1.25, 0.9, 1.05)[i % 6]
    image = ImageEnhance.Brightness(image).enhance(light)
    warmth = (1.0, 0.9, 1.1)[(i // 3) % 3]
    r, g, b = image.split()
    b = b.point(lambda v: min(255, round(v * warmth)))
    return Image.merge("RGB", (r, g, b))


def one_person_batch(n: int = 12, name: str = "grace_hopper") -> list[tuple[str, bytes]]:
    """n JPEGs of ONE person, all passing the intake gate as ok and distinct enough that
    build_dataset keeps them: [(file name, bytes)]."""
    base = photo(name)
    return [(f"photo_{i:02d}.jpg", encode(_variant(base, i), "JPEG", quality=90)) for i in range(n)]
