"""bench/bench_gpu.py (`make bench-gpu`) cannot rot before a GPU comes: the same script runs here
with --tiny (tiny random models on CPU, every section), and its offline-wheel list is checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "bench_gpu.py"
SECTIONS = [
    "train_sd15_r4",
    "train_sd15_r16",
    "train_sdxl",
    "train_sdxl_prior",
    "infer_eager",
    "switch",
    "infer_compiled",
    "hotswap_compiled",
]


def _bench_module():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_gpu
    finally:
        sys.path.remove(str(REPO / "bench"))
    return bench_gpu


@pytest.mark.e2e
def test_the_gpu_bench_runs_every_section_on_tiny_models(tmp_path):
    out = tmp_path / "bench_gpu.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--json", str(out), "--cache", str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    sections = results["sections"]
    assert list(sections) == SECTIONS
    assert not [name for name, row in sections.items() if "skipped" in row], sections
    for name in SECTIONS[:4]:
        assert sections[name]["steps_per_s"] > 0 and sections[name]["timed_steps"] >= 2
        assert sections[name]["plan"]["fits"] is True
    # SDXL is planned as on an A10G, whatever GPU runs the bench.
    assert sections["train_sdxl"]["plan"]["budget_gib"] == 21.5
    assert sections["train_sd15_r4"]["plan"]["budget_gib"] is None
    for name in ("infer_eager", "infer_compiled"):
        assert 0 < sections[name]["generate_s"] <= sections[name]["s_per_image"]
    assert sections["switch"]["switch_ms"] > 0
    hotswap = sections["hotswap_compiled"]
    assert hotswap["graphs_before"] > 0  # the compiled UNet was traced: the counter is live
    assert hotswap["recompiles"] == 0 and hotswap["rebuilds"] == 0
    assert hotswap["switches"]["hotswap"] >= 1 and hotswap["switches"]["replay"] >= 1
    table = done.stdout.split("section ", 1)[1]
    assert all(name in table for name in SECTIONS)


def test_the_offline_wheels_are_the_locked_ones_without_torch():
    bench_gpu = _bench_module()
    entries = bench_gpu.lock_entries()
    names = {e.split("==")[0].lower() for e in entries}
    assert {"diffusers", "transformers", "peft", "safetensors", "pydantic", "botocore"} <= names
    assert not {n for n in names if n.startswith(("torch", "nvidia-", "triton"))}
    assert all("--hash=sha256:" in e for e in entries)


def test_without_a_gpu_and_without_tiny_it_says_so(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cache", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode != 0 and "no CUDA device" in done.stderr
