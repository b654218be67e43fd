"""Face intake benchmark: ms per 12 MP phone-sized JPEG for each stage of the gate
(decode, detect, checks, crop, embed), on one core. Run with `make bench-intake`; writes
its section of docs/benchmarks.md.

The photos are made from the real photos shipped in scikit-image and matplotlib: upscaled
to 4032x3024, with sensor-like noise (so they compress like camera JPEGs, ~3-4 MB) and
stored sideways with EXIF orientation 6 or 8, as phones store portrait shots.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"  # one core, as in a 1-vCPU Lambda slice

import argparse
import platform
import statistics
import time
from pathlib import Path

import cv2
from PIL import Image, ImageOps

from avatarflow import faces
from avatarflow import sample_photos as S

cv2.setNumThreads(1)
STAGES = ("decode", "detect", "checks", "crop", "embed")
ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
HEADING = "## Face intake (`make bench-intake`)"
TARGET_MS = 150.0


def make_photos():
    cases = [
        ("grace_hopper", 6),
        ("astronaut", 8),
        ("grace_hopper", 8),
        ("astronaut", 6),
        ("grace_hopper", 1),
    ]
    photos = [
        (f"{name} orientation {o}", S.phone_photo(name, orientation=o, seed=i))
        for i, (name, o) in enumerate(cases)
    ]
    # Shot from farther away: the face is ~600 px tall, so a sharp 512 px crop needs the
    # second, finer (1/2 scale) decode.
    farther = S.shrunk_in_canvas(S.photo("grace_hopper"), scale=0.45, canvas=600)
    for o in (6, 8):
        data = S.phone_photo(farther, orientation=o, seed=o)
        photos.append((f"grace_hopper farther, orientation {o}", data))
    return photos


def full_decode_ms(data: bytes) -> float:
    import io

    start = time.perf_counter()
    image = Image.open(io.BytesIO(data))
    image.load()
    ImageOps.exif_transpose(image)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md")
    args = parser.parse_args()

    start = time.perf_counter()
    faces.face_models()
    cold_ms = (time.perf_counter() - start) * 1000
    photos = make_photos()
    for _, data in photos:  # warm-up: first inference allocates the graphs
        assert faces.analyze_photo(data).ok

    per_stage = {s: [] for s in STAGES}
    totals, walls, verdicts, full = [], [], [], []
    best = {label: float("inf") for label, _ in photos}
    for _ in range(args.repeats):
        for label, data in photos:
            t0 = time.perf_counter()
            result = faces.analyze_photo(data)
            walls.append((time.perf_counter() - t0) * 1000)
            best[label] = min(best[label], walls[-1])
            verdicts.append((label, result.verdict))
            for stage in STAGES:
                per_stage[stage].append(result.timings_ms.get(stage, 0.0))
            totals.append(sum(result.timings_ms.values()))
            full.append(full_decode_ms(data))

    sizes = [len(d) / 1e6 for _, d in photos]
    rows = [(s, statistics.median(per_stage[s]), statistics.mean(per_stage[s])) for s in STAGES]
    wall_median = statistics.median(walls)
    best_median = statistics.median(best.values())
    load = os.getloadavg()[0]
    wall_p95 = sorted(walls)[int(0.95 * (len(walls) - 1))]
    lines = [
        HEADING,
        "",
        "Command: `make bench-intake` (runs `.venv/bin/python bench/bench_intake.py`).",
        "",
        f"Input: {len(photos)} phone-sized JPEGs, 4032x3024 (12.2 MP), {min(sizes):.1f}-{max(sizes):.1f} MB, "
        "made from scikit-image's astronaut and matplotlib's grace_hopper (upscaled, sensor-like noise, "
        "stored sideways with EXIF orientation 6/8, one upright): five close portraits (face 1000-1700 px "
        "tall) and two shot from farther away (face ~600 px, which take the second, finer decode); "
        f"{args.repeats} passes over each, after one warm-up pass. One thread (`OMP_NUM_THREADS=1`, "
        f"`cv2.setNumThreads(1)`), {platform.processor() or platform.machine()}, Python "
        f"{platform.python_version()}, OpenCV {cv2.__version__}, Pillow {Image.__version__}.",
        "",
        "| stage | median ms | mean ms |",
        "|---|---:|---:|",
        *[f"| {s} | {med:.1f} | {mean:.1f} |" for s, med, mean in rows],
        f"| **full gate (wall, per photo)** | **{wall_median:.1f}** | {statistics.mean(walls):.1f} |",
        "",
        f"- p95 of the full gate: {wall_p95:.1f} ms. Best of the {args.repeats} passes per photo (least "
        f"disturbed by other jobs), median over photos: {best_median:.1f} ms "
        f"(per photo: {', '.join(f'{v:.0f}' for v in best.values())} ms).",
        f"- Target <= {TARGET_MS:.0f} ms per 12 MP photo: "
        f"{'met' if wall_median <= TARGET_MS else 'NOT met'} by the median of all runs.",
        f"- Machine: 2 vCPUs shared with other jobs, 1-minute load average {load:.2f} at the end of the run; "
        "numbers move by +-20% or more between runs under load.",
        f"- For comparison, a plain full-resolution decode + `exif_transpose` of the same files takes "
        f"{statistics.median(full):.1f} ms median on its own, before any resize: JPEG `draft()` (decode at "
        "1/4 DCT scale for detection, then at the smallest scale that still gives a 512 px crop) keeps "
        "the whole gate near that figure.",
        f"- Cold start (hash-check and load both ONNX models once per process): {cold_ms:.0f} ms.",
        f"- Verdicts: {sorted(set(v for _, v in verdicts))} (all photos must pass as `ok`).",
        "- Stages: decode = reduced-scale decode + orientation + resize to 640 px for YuNet; "
        "detect = YuNet; checks = face count/size, sharpness, brightness, image hash; "
        "crop = second reduced-scale decode (1/2 scale) when the 1/4 scale is too coarse for a 512 px crop, "
        "as for the farther shots, + Lanczos resize; embed = SFace alignment + forward.",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    if args.no_write:
        return
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if HEADING in text:
        before, _, after = text.partition(HEADING)
        rest = after.split("\n## ", 1)
        text = before + section + ("\n## " + rest[1] if len(rest) > 1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
