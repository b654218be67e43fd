"""The contact sheet of an avatar pack: one row per style (its title, then the kept images,
each with its identity similarity), a failed style as a row that says so.

Drawn with OpenCV and numpy, because the pack function runs in the face functions' container
image (functions/faces.Dockerfile), which has them; the Lambda layer has no imaging library.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

TILE = 160
PAD = 8
TITLE_W = 170
LABEL_H = 20
HEADER_H = 34
BG = (248, 250, 250)  # BGR
INK = (30, 30, 30)
BAD = (40, 40, 200)
MUTED = (110, 110, 110)
FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass(frozen=True)
class Row:
    title: str
    images: Sequence[tuple[bytes, float | None]]  # (encoded image, identity similarity)
    error: str | None = None


def _tile(data: bytes) -> np.ndarray:
    """The image fitted into a TILE x TILE square (letterboxed); grey when unreadable."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    tile = np.full((TILE, TILE, 3), 200, np.uint8)
    if image is None:
        return tile
    h, w = image.shape[:2]
    scale = TILE / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    y, x = (TILE - nh) // 2, (TILE - nw) // 2
    tile[y : y + nh, x : x + nw] = resized
    return tile


def _text(canvas: np.ndarray, text: str, x: int, y: int, color=INK, scale: float = 0.45) -> None:
    # Hershey fonts are ASCII only: anything else is drawn as "?".
    safe = text.encode("ascii", "replace").decode("ascii")
    cv2.putText(canvas, safe, (x, y), FONT, scale, color, 1, cv2.LINE_AA)


def draw(title: str, rows: Sequence[Row]) -> bytes:
    """PNG bytes of the sheet."""
    columns = max([len(r.images) for r in rows] + [1])
    row_h = TILE + LABEL_H + PAD
    width = TITLE_W + columns * (TILE + PAD) + PAD
    height = HEADER_H + max(len(rows), 1) * row_h + PAD
    canvas = np.full((height, width, 3), BG, np.uint8)
    _text(canvas, title, PAD, 22, INK, 0.6)
    for r, row in enumerate(rows):
        top = HEADER_H + r * row_h
        _text(canvas, row.title[:22], PAD, top + TILE // 2)
        if row.error or not row.images:
            _text(canvas, ("failed: " + (row.error or "no images"))[:60], TITLE_W, top + TILE // 2, BAD)
            continue
        for c, (data, score) in enumerate(row.images):
            left = TITLE_W + c * (TILE + PAD)
            canvas[top : top + TILE, left : left + TILE] = _tile(data)
            label = "likeness n/a" if score is None else f"likeness {score:.2f}"
            _text(canvas, label, left, top + TILE + 15, MUTED, 0.4)
    ok, encoded = cv2.imencode(".png", canvas)
    if not ok:  # pragma: no cover - encoding a uint8 BGR array does not fail
        raise RuntimeError("could not encode the contact sheet")
    return encoded.tobytes()
