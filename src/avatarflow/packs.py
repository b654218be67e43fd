"""Avatar packs: what the pack function, on_generation_done and the API share.

A pack is one row of the packs table (env PACKS_TABLE; key user_id + pack_id) plus the
generations it queued (rows of the generations table carrying `pack_id`, `style` and
`pack_round`). Each style's images are ranked by identity similarity to the user's reference
embedding (the endpoint reports it per image); the best `keep_per_style` are kept."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

PENDING = "PENDING"
RUNNING = "RUNNING"
COMPLETED = "COMPLETED"
PARTIAL = "PARTIAL"
FAILED = "FAILED"
STATUSES = (PENDING, RUNNING, COMPLETED, PARTIAL, FAILED)

STYLE_OK = "COMPLETED"
STYLE_FAILED = "FAILED"

# Most images of one style kept, and generated per round (the endpoint's num_images bound).
MAX_IMAGES_PER_STYLE = 8


def pack_id_for(execution_arn: str) -> str:
    """The pack of a training run: derived from the execution, so a retried task finds it."""
    return hashlib.sha256(execution_arn.encode()).hexdigest()[:32]


def deliverable(images: Iterable[dict]) -> list[dict]:
    """Images that may be shown: a key, and not withheld by output moderation."""
    return [i for i in images if isinstance(i.get("key"), str) and i.get("withheld") is not True]


def rank(images: Iterable[dict], keep: int) -> list[dict]:
    """The `keep` images most like the user: highest identity similarity first, unscored
    (no face found) last; ties by seed, so the choice is reproducible."""

    def order(image: dict):
        score = image.get("identity_similarity")
        seed = image.get("seed")
        return (score is None, -(score or 0.0), seed if isinstance(seed, int) else 2**33)

    return sorted(deliverable(images), key=order)[: max(keep, 0)]


def style_outcome(name: str, generations: Iterable[dict], keep: int) -> dict:
    """One style of a pack from its generation rows: kept images, or FAILED with the reason."""
    rows = list(generations)
    images = [img for row in rows if row.get("status") == "COMPLETED" for img in row.get("images") or []]
    kept = rank(images, keep)
    if kept:
        return {"name": name, "status": STYLE_OK, "images": kept, "generated": len(deliverable(images))}
    errors = [str(row.get("error")) for row in rows if row.get("status") == "FAILED" and row.get("error")]
    pending = any(row.get("status") == "PENDING" for row in rows)
    reason = errors[-1] if errors else ("timed out" if pending else "no usable image")
    return {"name": name, "status": STYLE_FAILED, "images": [], "generated": 0, "error": reason[:300]}


def best_similarity(outcome: dict) -> float | None:
    scores = [
        i["identity_similarity"]
        for i in outcome.get("images", [])
        if i.get("identity_similarity") is not None
    ]
    return max(scores) if scores else None


def needs_regeneration(outcome: dict, min_similarity: float) -> bool:
    """A style whose best image is below the likeness threshold, or shows no face at all.
    A FAILED style is not retried: the endpoint said why, and the email names it."""
    if outcome["status"] != STYLE_OK:
        return False
    best = best_similarity(outcome)
    return best is None or best < min_similarity


def pack_status(outcomes: list[dict]) -> str:
    ok = sum(1 for o in outcomes if o["status"] == STYLE_OK)
    if outcomes and ok == len(outcomes):
        return COMPLETED
    return PARTIAL if ok else FAILED
