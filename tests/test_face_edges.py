"""Faces cut by the photo's edge get their own reason (`face_cut_off`), on real photos that
ship in installed packages (avatarflow.sample_photos): the photo is cropped so that the edge
runs through the face, on each side. Before this check the square crop was shifted or padded
around the partial face and the photo was accepted. A well-framed face, even one close to
an edge, is still accepted."""

import math

import pytest
from PIL import Image

from avatarflow import faces as F
from avatarflow import sample_photos as S

SIDES = ("left", "top", "right", "bottom")
NO_EDGE_CHECK = F.IntakeSettings(edge_margin=-math.inf)  # every other check as it is


def _face_box(image: Image.Image) -> tuple[int, int, int, int]:
    result = F.analyze_photo(S.encode(image))
    assert result.verdict == "ok", result.verdict
    return tuple(result.box)


def _cut(image: Image.Image, side: str, into: float) -> Image.Image:
    """The photo cropped on one side so that the edge lies `into` x the face box inside the
    face (negative: that much room is left between the face and the edge)."""
    x, y, w, h = _face_box(image)
    left, top, right, bottom = 0, 0, image.width, image.height
    if side == "left":
        left = round(x + into * w)
    elif side == "top":
        top = round(y + into * h)
    elif side == "right":
        right = round(x + w - into * w)
    else:
        bottom = round(y + h - into * h)
    return image.crop((left, top, right, bottom))


@pytest.mark.parametrize("name", ["grace_hopper", "astronaut"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("into", [0.15, 0.3])
def test_a_face_cut_by_the_edge_is_rejected_with_its_own_reason(name, side, into):
    data = S.encode(_cut(S.photo(name), side, into))
    result = F.analyze_photo(data)
    assert result.verdict == "face_cut_off", (name, side, into, result.verdict)
    assert result.message == F.REASON_MESSAGES["face_cut_off"]
    assert result.crop is None and result.embedding is None
    assert result.box is not None  # what was measured stays for the manifest
    if name == "grace_hopper":
        # Nothing else is wrong with these: without the edge check they were accepted (the
        # astronaut's small face, cut, comes out blurry instead: the edge is the truer reason).
        assert F.analyze_photo(data, NO_EDGE_CHECK).verdict == "ok"


@pytest.mark.parametrize("side", SIDES)
def test_a_well_framed_face_near_an_edge_is_still_accepted(side):
    """A quarter of the face's size of room on one side: close, but the whole face is in."""
    result = F.analyze_photo(S.encode(_cut(S.photo("grace_hopper"), side, -0.25)))
    assert result.verdict == "ok", (side, result.verdict)
    assert result.crop is not None and result.crop.size == (512, 512)


def test_the_shipped_portraits_and_the_workflow_batch_pass_the_edge_check():
    for name in ("grace_hopper", "astronaut"):
        assert F.analyze_photo(S.photo_bytes(name)).verdict == "ok", name
    verdicts = {n: F.analyze_photo(data).verdict for n, data in S.one_person_batch(12)}
    assert set(verdicts.values()) == {"ok"}, verdicts


def test_the_reason_is_told_in_plain_words():
    message = F.REASON_MESSAGES["face_cut_off"]
    assert "face_cut_off" in F.REASONS
    assert "edge" in message and "whole face" in message and "_" not in message
