"""One lock drives every environment (scripts/lock.py, `make lock`).

These fail when an image, the layer or a venv would install something other than what the
tests ran with: a pin that drifts from lock/dev.txt, a pyproject range the lock no longer
satisfies, a consumer that installs without hashes or resolves, a Python or platform that
does not match where the artifact runs."""

import importlib.util
import re
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from avatarflow_local.workflow_stack import REPO_ROOT as REPO
from avatarflow_local.workflow_stack import load_template

_spec = importlib.util.spec_from_file_location("lock_script", REPO / "scripts" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
sys.modules["lock_script"] = lock  # dataclasses look their module up while it loads
_spec.loader.exec_module(lock)

TARGETS = {t.name: t for t in lock.TARGETS}
DEV = lock.pins(TARGETS["dev"].path.read_text(encoding="utf-8"))
ARTIFACTS = [t for t in lock.TARGETS if t.constrained]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def lock_text(target) -> str:
    return target.path.read_text(encoding="utf-8")


def requirement_blocks(text: str) -> dict[str, str]:
    """{name: the pin's line plus its --hash lines}."""
    blocks, name = {}, None
    for line in text.splitlines():
        match = lock.PIN.match(line)
        if match:
            name = lock.normalize(match.group(1))
            blocks[name] = line
        elif name and line.strip().startswith("--hash="):
            blocks[name] += "\n" + line
    return blocks


@pytest.mark.parametrize("target", lock.TARGETS, ids=lambda t: t.name)
def test_every_pin_is_exact_and_hashed(target):
    blocks = requirement_blocks(lock_text(target))
    assert blocks, f"{target.path} pins nothing"
    unhashed = [name for name, block in blocks.items() if "--hash=sha256:" not in block]
    assert not unhashed, f"{target.path}: no hash for {unhashed}"
    loose = [
        line for line in lock_text(target).splitlines()
        if line and not line[0].isspace() and not line.startswith("#") and "==" not in line
    ]
    assert not loose, f"{target.path}: requirements that are not exact pins: {loose}"


@pytest.mark.parametrize("target", ARTIFACTS, ids=lambda t: t.name)
def test_artifact_runs_the_versions_the_tests_run(target):
    """The layer and the three images: every package the dev venv also has is the same
    release (torch: the CUDA build of the CPU build's release)."""
    drifted = {
        name: (version, DEV[name])
        for name, version in lock.pins(lock_text(target)).items()
        if name in DEV and lock.public_version(version) != lock.public_version(DEV[name])
    }
    assert not drifted, f"{target.path} differs from lock/dev.txt (artifact, dev): {drifted}"


def project_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    names = list(PYPROJECT["dependencies"])
    for extra in extras:
        names += PYPROJECT["optional-dependencies"][extra]
    return [Requirement(r) for r in names]


@pytest.mark.parametrize("target", [t for t in lock.TARGETS if not t.requirements_in], ids=lambda t: t.name)
def test_lock_satisfies_pyproject(target):
    """A range edited in pyproject without `make lock` fails here, not in an image build."""
    pinned = lock.pins(lock_text(target))
    unmet = [
        str(req) for req in project_requirements(target.extras)
        if lock.normalize(req.name) not in pinned
        or not req.specifier.contains(pinned[lock.normalize(req.name)], prereleases=True)
    ]
    assert not unmet, f"{target.path} does not satisfy pyproject: {unmet}"


@pytest.mark.parametrize("target", [t for t in lock.TARGETS if t.requirements_in], ids=lambda t: t.name)
def test_tool_lock_satisfies_its_input(target):
    pinned = lock.pins(lock_text(target))
    wanted = [
        Requirement(line.split("#")[0].strip())
        for line in (lock.LOCK_DIR / target.requirements_in).read_text(encoding="utf-8").splitlines()
        if line.split("#")[0].strip()
    ]
    unmet = [str(r) for r in wanted if not r.specifier.contains(pinned.get(lock.normalize(r.name), "0"))]
    assert not unmet, f"{target.path} does not satisfy lock/{target.requirements_in}: {unmet}"


def test_torch_cpu_in_dev_and_the_same_release_built_for_cuda_in_the_images():
    release = lock.torch_version()
    assert DEV["torch"] == f"{release}+cpu"
    for name in ("training-image", "inference-image"):
        assert lock.pins(lock_text(TARGETS[name]))["torch"] == release, name
        assert any(n.startswith("nvidia-") for n in lock.pins(lock_text(TARGETS[name]))), name


IMAGES = [t for t in lock.TARGETS if t.name.endswith("-image")]


@pytest.mark.parametrize("target", IMAGES, ids=lambda t: t.name)
def test_dockerfile_installs_exactly_its_lock(target):
    (dockerfile,) = target.consumers
    text = (REPO / dockerfile).read_text(encoding="utf-8")
    copied = re.search(rf"^COPY lock/{re.escape(target.name)}\.txt ", text, re.M)
    assert copied, f"{dockerfile} does not copy lock/{target.name}.txt"
    installs = re.findall(r"pip install[^\n]*(?:\\\n[^\n]*)*", text)
    assert installs, f"{dockerfile} installs nothing"
    for command in installs:
        assert "--require-hashes" in command and "--no-deps" in command, f"{dockerfile}: {command}"
        assert " -r " in command, f"{dockerfile} installs packages outside the lock: {command}"
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    python = re.search(r"python:(3\.\d+)", base).group(1)
    assert python == target.python, f"{dockerfile}: base image Python {python}, lock for {target.python}"
    ignore = REPO / f"{dockerfile}.dockerignore"
    if ignore.exists():
        assert f"!lock/{target.name}.txt" in ignore.read_text(encoding="utf-8"), f"{ignore} hides the lock"


def test_layer_installs_exactly_its_lock():
    assert lock.LAYER_REQUIREMENTS.read_text(encoding="utf-8") == lock.layer_requirements(), (
        "src/requirements.txt differs from lock/layer.txt: run `make lock`"
    )
    recipe = (REPO / "src" / "Makefile").read_text(encoding="utf-8")
    assert "--require-hashes --no-deps -r requirements.txt" in recipe
    layer = load_template()["Resources"]["SharedLayer"]["Properties"]
    assert layer["CompatibleRuntimes"] == [f"python{TARGETS['layer'].python}"]
    assert layer["CompatibleArchitectures"] == ["arm64"] and TARGETS["layer"].platform.startswith("aarch64")
    # boto3 and botocore ship as a pair: never one shadowing the runtime's other.
    layer_pins = lock.pins(lock_text(TARGETS["layer"]))
    assert {"boto3", "botocore"} <= set(layer_pins)


def test_functions_run_where_the_lambda_locks_were_resolved():
    template = load_template()
    glob = template["Globals"]["Function"]
    for name, resource in template["Resources"].items():
        if resource["Type"] != "AWS::Serverless::Function":
            continue
        props = resource["Properties"]
        assert props.get("Architectures", glob.get("Architectures")) == ["arm64"], name
        if props.get("PackageType") != "Image":
            assert props.get("Runtime", glob.get("Runtime")) == f"python{TARGETS['layer'].python}", name


def test_this_venv_is_exactly_the_dev_lock(capsys):
    """What `make install` checks after installing: nothing more, nothing less, no other
    version (a hand-installed package or a resolver run shows up here)."""
    assert lock.check_installed("dev", sys.executable) == 0, capsys.readouterr().err
