"""Face intake library on real photos shipped in packages and on derived bad cases."""

import io

import numpy as np
import pytest
from PIL import Image

from avatarflow import faces as F
from avatarflow import sample_photos as S


def verdict(data: bytes, settings: F.IntakeSettings = F.DEFAULT_SETTINGS) -> F.PhotoAnalysis:
    return F.analyze_photo(data, settings)


# --------------------------------------------------------------------------- real photos


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_real_portraits_pass_with_a_face_crop_and_embedding(name):
    result = verdict(S.photo_bytes(name))
    assert result.verdict == "ok", result
    assert result.message is None
    x, y, w, h = result.box
    assert w > 80 and h > 100 and result.score > 0.9
    assert result.crop.size == (512, 512) and result.crop.mode == "RGB"
    vector = np.asarray(result.embedding)
    assert vector.shape == (128,) and abs(np.linalg.norm(vector) - 1) < 1e-3
    assert result.sharpness >= F.DEFAULT_SETTINGS.min_sharpness
    assert result.brightness >= F.DEFAULT_SETTINGS.min_brightness
    assert len(result.phash) == 16
    assert set(result.timings_ms) == {"decode", "detect", "checks", "crop", "embed"}


def test_crop_is_centred_on_the_face():
    photo = S.photo("grace_hopper")
    result = verdict(S.encode(photo, "PNG"))
    x, y, w, h = result.box
    side = min(max(w, h) * F.DEFAULT_SETTINGS.crop_scale, photo.width, photo.height)
    x0 = min(max(x + w / 2 - side / 2, 0), photo.width - side)
    y0 = min(max(y + h / 2 - side / 2, 0), photo.height - side)
    def diff(dx):
        box = (x0 + dx, y0, x0 + dx + side, y0 + side)
        expected = photo.resize((512, 512), Image.LANCZOS, box=box)
        return np.abs(np.asarray(result.crop, np.int16) - np.asarray(expected, np.int16)).mean()

    # The box is reported in whole pixels, so allow sub-pixel drift, not a shifted crop.
    assert diff(0) < 6 and diff(-25) > 2 * diff(0)


def test_camera_face_is_found_but_too_small_for_a_512_crop():
    result = verdict(S.photo_bytes("camera"))
    assert result.verdict == "face_too_small"
    assert result.box is not None and result.embedding is None and result.crop is None


@pytest.mark.parametrize("name", S.NO_FACE_PHOTOS)
def test_real_photos_without_a_face(name):
    result = verdict(S.photo_bytes(name))
    assert result.verdict == "no_face"
    assert result.message == F.REASON_MESSAGES["no_face"]
    assert result.box is None and result.face_dict() is None


def test_same_person_and_different_people_by_embedding():
    grace = verdict(S.photo_bytes("grace_hopper")).embedding
    grace_tilted = verdict(S.encode(S.photo("grace_hopper").rotate(10, fillcolor=(0, 0, 0)))).embedding
    astronaut = verdict(S.photo_bytes("astronaut")).embedding
    assert F.cosine_similarity(grace, grace_tilted) > 0.8
    assert F.cosine_similarity(grace, astronaut) < F.DEFAULT_SETTINGS.same_person_cosine


# --------------------------------------------------------------------------- derived cases


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(orientation):
    photo = S.photo("astronaut")
    data = S.with_orientation(photo, orientation)
    stored = Image.open(io.BytesIO(data))
    assert stored.size == (photo.height, photo.width) or photo.width == photo.height
    assert np.abs(np.asarray(F.decode_image(data), np.int16) - np.asarray(photo, np.int16)).mean() < 4
    result = verdict(data)
    assert result.verdict == "ok"
    upright = verdict(S.photo_bytes("astronaut"))
    assert np.allclose(result.box, upright.box, atol=4)


def test_sideways_without_exif_transpose_would_find_no_face():
    # Why exif_transpose matters: the same pixels read raw are a sideways face.
    sideways = S.photo("grace_hopper").transpose(Image.Transpose.ROTATE_90)
    assert verdict(S.encode(sideways)).verdict in ("no_face", "face_too_small")
    assert verdict(S.with_orientation(S.photo("grace_hopper"), 6)).verdict == "ok"


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_blurred_face_is_blurry(name):
    result = verdict(S.encode(S.blurred(S.photo(name), 4)))
    assert result.verdict == "blurry"
    assert result.sharpness < F.DEFAULT_SETTINGS.min_sharpness
    assert result.message == F.REASON_MESSAGES["blurry"]


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_darkened_photo_is_too_dark(name):
    result = verdict(S.encode(S.darkened(S.photo(name), 0.15)))
    assert result.verdict == "too_dark"
    assert result.brightness < F.DEFAULT_SETTINGS.min_brightness


def test_moderately_dim_photo_still_passes():
    assert verdict(S.encode(S.darkened(S.photo("astronaut"), 0.5))).verdict == "ok"


def test_face_shrunk_into_large_canvas_is_too_small():
    result = verdict(S.encode(S.shrunk_in_canvas(S.photo("grace_hopper"), 0.25)))
    assert result.verdict == "face_too_small"
    assert np.sqrt(result.box[2] * result.box[3]) < F.DEFAULT_SETTINGS.min_face_px


@pytest.mark.parametrize("names", [("astronaut", "grace_hopper"), ("astronaut", "grace_hopper", "camera")])
def test_collage_has_several_faces(names):
    assert verdict(S.encode(S.collage(*names))).verdict == "several_faces"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_not_an_image(fmt):
    data = S.truncated(S.photo_bytes("grace_hopper", fmt), 0.5)
    if fmt == "JPEG":
        Image.open(io.BytesIO(data)).verify()  # the JPEG header alone looks fine...
    assert verdict(data).verdict == "not_an_image"  # ...but load() finds the cut


@pytest.mark.parametrize("data", [b"", S.random_bytes(), b"GIF8", b"%PDF-1.7\n" + b"0" * 100])
def test_garbage_is_not_an_image(data):
    result = verdict(data)
    assert result.verdict == "not_an_image"
    assert result.message == F.REASON_MESSAGES["not_an_image"]


def test_png_header_claiming_400_megapixels_is_too_large():
    data = S.png_claiming(20_000, 20_000)
    assert len(data) < 200
    assert verdict(data).verdict == "too_large"


@pytest.mark.parametrize("size", [(10_000, 6_000), (12_000, 8_000)])
def test_pixel_limit(size):
    # 60 MP: over our 50 MP limit; 96 MP: Pillow's DecompressionBombWarning, turned into an error.
    assert verdict(S.png_claiming(*size)).verdict == "too_large"


def test_file_over_the_byte_limit_is_too_large():
    limit = F.DEFAULT_SETTINGS.max_bytes
    data = S.oversized(limit)
    assert len(data) > limit
    Image.open(io.BytesIO(data)).load()  # a valid JPEG, only too big
    assert verdict(data).verdict == "too_large"
    small_limit = F.IntakeSettings(max_bytes=len(data))
    assert verdict(data, small_limit).verdict == "ok"


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_image_formats_are_unsupported(fmt):
    assert verdict(S.photo_bytes("grace_hopper", fmt)).verdict == "unsupported_format"


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "AVIF", "HEIF"])
def test_modern_formats_decode_and_pass(fmt):
    if fmt == "HEIF":
        import pillow_heif

        pillow_heif.register_heif_opener()
    assert verdict(S.photo_bytes("grace_hopper", fmt)).verdict == "ok"


def test_rgba_and_greyscale_inputs_are_handled():
    rgba = S.photo("grace_hopper").convert("RGBA")
    assert verdict(S.encode(rgba, "PNG")).verdict == "ok"
    grey = S.photo("grace_hopper").convert("L")
    assert verdict(S.encode(grey, "PNG")).verdict == "ok"


def test_large_jpeg_is_decoded_at_reduced_scale_and_cropped_sharp():
    data = S.phone_photo("grace_hopper", orientation=6)
    fast = F.decode_image(data, target=640)
    assert fast.size == (756, 1008)  # 1/4 DCT scale, upright (portrait)
    full = F.decode_image(data)
    assert full.size == (3024, 4032)
    result = verdict(data)
    assert result.verdict == "ok"
    assert result.crop.size == (512, 512)
    assert result.box[2] > 500  # in the original's pixels


def test_resolution_setting_changes_the_crop_size():
    result = verdict(S.phone_photo("grace_hopper", orientation=1), F.IntakeSettings(resolution=1024))
    assert result.verdict == "ok" and result.crop.size == (1024, 1024)


# --------------------------------------------------------------------------- embed_face


def test_embed_face_on_512_and_tiny_images():
    crop = verdict(S.photo_bytes("grace_hopper")).crop
    vector = F.embed_face(crop)
    assert len(vector) == 128
    assert F.cosine_similarity(vector, verdict(S.photo_bytes("grace_hopper")).embedding) > 0.9
    assert F.embed_face(crop.resize((64, 64))) is None or len(F.embed_face(crop.resize((64, 64)))) == 128
    assert F.embed_face(Image.new("RGB", (64, 64), (90, 90, 90))) is None
    assert F.embed_face(Image.new("RGB", (3, 5))) is None
    assert F.embed_face(S.photo("coffee")) is None


def test_models_are_verified_and_shared():
    assert F.face_models() is F.face_models()
    assert set(F.MODEL_SHA256) == {F.DETECTOR_FILE, F.RECOGNIZER_FILE}


def test_unknown_reason_is_refused():
    with pytest.raises(ValueError):
        F.PhotoRejected("sad")
    err = F.PhotoRejected("blurry")
    assert err.reason == "blurry" and err.message == F.REASON_MESSAGES["blurry"]


# --------------------------------------------------------------------------- batch selection


def _candidates(batch):
    out = []
    for name, data in batch:
        result = verdict(data)
        assert result.verdict == "ok", (name, result.verdict)
        out.append(F.Candidate(name, result.embedding, result.phash))
    return out


@pytest.fixture(scope="module")
def person_batch():
    return _candidates(S.one_person_batch(12))


def test_one_person_batch_is_kept_whole(person_batch):
    assert F.select_batch(person_batch) == {}


def test_re_encodes_are_duplicates_and_other_person_is_dropped(person_batch):
    grace = S.photo("grace_hopper")
    extra = _candidates(
        [
            ("again_q60.jpg", S.encode(grace, quality=60)),
            ("again_small.webp", S.encode(grace.resize((400, 469)), "WEBP")),
            ("astronaut.jpg", S.photo_bytes("astronaut")),
        ]
    )
    dropped = F.select_batch(person_batch + extra)
    assert dropped == {
        "again_q60.jpg": "duplicate",
        "again_small.webp": "duplicate",
        "astronaut.jpg": "different_person",
    }


def test_mean_embedding_is_normalized_and_close_to_members(person_batch):
    mean = F.mean_embedding([c.embedding for c in person_batch])
    assert abs(np.linalg.norm(mean) - 1) < 1e-5
    assert min(F.cosine_similarity(mean, c.embedding) for c in person_batch) > 0.9
    assert F.mean_embedding([]) is None


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (2, 5000), (5000, 3)])
def test_degenerate_sizes_never_crash(size):
    noise = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    for fmt in ("PNG", "JPEG"):
        assert verdict(S.encode(image, fmt)).verdict == "no_face"
    assert F.embed_face(image) is None


def test_cmyk_palette_and_16_bit_inputs_pass():
    grace = S.photo("grace_hopper")
    assert verdict(S.encode(grace.convert("CMYK"), "JPEG")).verdict == "ok"
    assert verdict(S.encode(grace.convert("P"), "PNG")).verdict == "ok"
    sixteen = Image.fromarray(np.asarray(grace.convert("L"), dtype=np.uint16) * 256)
    assert verdict(S.encode(sixteen, "PNG")).verdict == "ok"
