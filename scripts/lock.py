#!/usr/bin/env python3
"""Resolve every environment the project installs into lock/<target>.txt (`make lock`).

One resolution drives them all: the dev venv is resolved first (every extra, the versions the
tests run), and every other target that shares packages with it is resolved with those exact
versions as constraints, for its own platform and Python. The files are pip requirements with
hashes, so each consumer installs with plain `pip install --require-hashes --no-deps`:
`make install`, the Lambda layer's Makefile, and the three Dockerfiles. tests/test_lock.py
fails when any of them drifts from lock/dev.txt.

Usage:
    python scripts/lock.py              # refresh: newest versions the ranges allow
    python scripts/lock.py --keep       # re-resolve after an input changed, keep other pins
    python scripts/lock.py --only layer # one target (still constrained by lock/dev.txt)

torch: the dev venv takes the CPU build (2.13.0+cpu: no GPU in CI) from pip's configured
find-links folder when there is one, else from PyTorch's CPU index; the images take PyPI's
Linux build of the same version, which is the CUDA one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK_DIR = REPO / "lock"
CONSTRAINTS_DIR = LOCK_DIR / ".constraints"  # generated, not committed
LAYER_REQUIREMENTS = REPO / "src" / "requirements.txt"
LAYER_HEADER = "# Generated from lock/layer.txt by `make lock`: do not edit (src/Makefile installs it).\n"
# What `python -m venv` puts in every environment before anything is installed.
BOOTSTRAP = {"pip", "setuptools", "wheel"}
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# The dev venv's Python and platform: what CI and the README's machine run.
DEV_PYTHON = "3.11"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s\\;]+)")


@dataclass(frozen=True)
class Target:
    """One installed environment: what it needs, where it runs, who installs it."""

    name: str
    python: str
    platform: str
    extras: tuple[str, ...] = ()  # pyproject extras on top of [project] dependencies
    requirements_in: str | None = None  # or a lock/*.in file instead of pyproject
    torch: str | None = None  # "cpu" (local version +cpu) or "cuda" (PyPI's Linux wheel)
    constrained: bool = True  # pinned to lock/dev.txt's versions
    consumers: tuple[str, ...] = field(default=())  # files that install this lock

    @property
    def path(self) -> Path:
        return LOCK_DIR / f"{self.name}.txt"


TARGETS = (
    Target(
        "dev", DEV_PYTHON, "x86_64-manylinux_2_28", extras=("faces", "ml", "serve", "dev"),
        torch="cpu", constrained=False, consumers=("Makefile",),
    ),
    Target("tools", DEV_PYTHON, "x86_64-manylinux_2_28", requirements_in="tools.in",
           constrained=False, consumers=("Makefile",)),
    Target("checkov", DEV_PYTHON, "x86_64-manylinux_2_28", requirements_in="checkov.in",
           constrained=False, consumers=("Makefile",)),
    Target("ops", DEV_PYTHON, "x86_64-manylinux_2_28", requirements_in="ops.in",
           constrained=False, consumers=("Makefile",)),
    # Lambda python3.12 on arm64 (Amazon Linux 2023, glibc 2.34).
    Target("layer", "3.12", "aarch64-manylinux_2_28", consumers=("src/Makefile",)),
    Target("faces-image", "3.12", "aarch64-manylinux_2_28", extras=("faces",),
           consumers=("functions/faces.Dockerfile",)),
    # SageMaker GPU instances: x86_64, the dev venv's Python, the CUDA build of the same torch.
    # faces: the trainer's quality loop scores validation images with the intake's SFace model.
    Target("training-image", DEV_PYTHON, "x86_64-manylinux_2_28", extras=("ml", "faces"), torch="cuda",
           consumers=("containers/training/Dockerfile",)),
    Target("inference-image", DEV_PYTHON, "x86_64-manylinux_2_28", extras=("ml", "faces", "serve"),
           torch="cuda", consumers=("containers/inference/Dockerfile",)),
)


def pins(lock_text: str) -> dict[str, str]:
    """{normalized name: version} of a hashed requirements file.

    >>> pins("torch==2.13.0+cpu \\\\\\n    --hash=sha256:ab\\nPyYAML==6.0.2 \\\\\\n")
    {'torch': '2.13.0+cpu', 'pyyaml': '6.0.2'}
    """
    found = {}
    for line in lock_text.splitlines():
        match = PIN.match(line)
        if match:
            found[normalize(match.group(1))] = match.group(3)
    return found


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def public_version(version: str) -> str:
    """2.13.0+cpu -> 2.13.0: the CPU and CUDA builds of one release share it."""
    return version.split("+", 1)[0]


def pip_find_links() -> list[str]:
    """The find-links folders pip is configured with (uv does not read pip's configuration)."""
    value = os.environ.get("PIP_FIND_LINKS", "")
    if not value:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.find-links"],
            capture_output=True, text=True, check=False,
        )
        value = done.stdout.strip() if done.returncode == 0 else ""
    return [p for p in value.split() if Path(p.removeprefix("file://")).is_dir()]


def torch_version() -> str:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    return re.search(r'"torch==([^"]+)"', text).group(1)


def compile_target(target: Target, uv: str, upgrade: bool) -> None:
    args = [uv, "pip", "compile", "--quiet", "--generate-hashes", "--no-strip-extras",
            "--python-version", target.python, "--python-platform", target.platform,
            "--custom-compile-command", "make lock", "--output-file", str(target.path)]
    if upgrade:
        args.append("--upgrade")
    if target.requirements_in:
        args.append(str(LOCK_DIR / target.requirements_in))
    else:
        args.append(str(REPO / "pyproject.toml"))
        for extra in target.extras:
            args += ["--extra", extra]
    constraints = []
    if target.constrained:
        dev = pins((LOCK_DIR / "dev.txt").read_text(encoding="utf-8"))
        constraints += [f"{name}=={public_version(v)}" for name, v in sorted(dev.items())]
    if target.torch == "cpu":
        constraints.append(f"torch=={torch_version()}+cpu")
        links = pip_find_links()
        for link in links:
            args += ["--find-links", link]
        if not links:
            args += ["--extra-index-url", TORCH_CPU_INDEX, "--index-strategy", "unsafe-best-match"]
    if constraints:
        # A fixed relative path: uv names it in the lock's "via" comments.
        constraint_file = CONSTRAINTS_DIR / f"{target.name}.txt"
        constraint_file.parent.mkdir(exist_ok=True)
        constraint_file.write_text("\n".join(constraints) + "\n", encoding="utf-8")
        args += ["--constraint", str(constraint_file.relative_to(REPO))]
    print(f"lock/{target.name}.txt: python {target.python}, {target.platform}", flush=True)
    subprocess.run(args, check=True, cwd=REPO)


def layer_requirements() -> str:
    """src/requirements.txt: SAM builds the layer from a copy of src/ alone, so the layer's
    lock travels there as a generated copy (tests/test_lock.py checks it is identical)."""
    return LAYER_HEADER + (LOCK_DIR / "layer.txt").read_text(encoding="utf-8")


def installed(python: str) -> dict[str, str]:
    """{normalized name: version} of every distribution in the interpreter's environment."""
    code = (
        "import json, importlib.metadata as m; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return {normalize(name): version for name, version in json.loads(done.stdout).items()}


def check_installed(name: str, python: str) -> int:
    """Exit 1 unless the environment holds exactly the lock's pins (and pip's own bootstrap)."""
    locked = pins((LOCK_DIR / f"{name}.txt").read_text(encoding="utf-8"))
    found = installed(python)
    wrong = sorted(
        f"{k} {found.get(k, 'missing')} (lock: {v})" for k, v in locked.items() if found.get(k) != v
    )
    extra = sorted(f"{k} {v} (not in the lock)" for k, v in found.items()
                   if k not in locked and k not in BOOTSTRAP)
    for problem in wrong + extra:
        print(f"lock/{name}.txt: {problem}", file=sys.stderr)
    if wrong or extra:
        return 1
    print(f"lock/{name}.txt: {len(locked)} packages installed, each the locked version with a checked "
          "hash; nothing resolved (pip --require-hashes --no-deps)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep existing pins where still allowed")
    parser.add_argument("--only", action="append", choices=[t.name for t in TARGETS])
    parser.add_argument("--uv", default=os.environ.get("UV", "uv"))
    parser.add_argument("--check-installed", metavar="TARGET", choices=[t.name for t in TARGETS],
                        help="check an environment against lock/TARGET.txt instead of locking")
    parser.add_argument("--python", default=sys.executable, help="the environment to check")
    options = parser.parse_args(argv)
    if options.check_installed:
        return check_installed(options.check_installed, options.python)
    for target in TARGETS:
        if options.only and target.name not in options.only:
            continue
        compile_target(target, options.uv, upgrade=not options.keep)
    LAYER_REQUIREMENTS.write_text(layer_requirements(), encoding="utf-8")
    print(f"{LAYER_REQUIREMENTS.relative_to(REPO)}: generated from lock/layer.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
