"""Static gates: cfn-lint on every state machine (as an AWS::StepFunctions::StateMachine),
checkov on the template (offline) and hadolint on every Dockerfile. tests/test_template.py
(the workflow's) already runs `sam validate --lint` and cfn-lint on template.yaml and
checks the ASL's transitions; they are not repeated here.

The tools live in venvs of their own (`make tools`: .venv-tools, .venv-checkov) because they
pin shared libraries differently from the runtime. A gate skips only when its venv is
missing; `make test` always builds them, so CI runs every gate. Each gate also runs on a
small bad input next to the real one, so a gate that silently passes everything (a wrong
flag, a tool that found no files) fails here instead."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from avatarflow_local.workflow_stack import REPO_ROOT as REPO
from avatarflow_local.workflow_stack import TEMPLATE, load_template

# The tests that run an external linter are e2e; the skip-justification check reads the
# template only and stays in the unit tier.

TOOLS_BIN = REPO / ".venv-tools" / "bin"
CHECKOV = REPO / ".venv-checkov" / "bin" / "checkov"
STATE_MACHINES = sorted((REPO / "statemachines").glob("*.asl.json"))
IGNORED_DIRS = {".git", ".venv", ".venv-tools", ".venv-checkov", ".venv-ops", ".aws-sam", "node_modules",
                ".cache", "out"}


def tool(path: Path, venv: str) -> Path:
    if not path.exists():
        pytest.skip(f"{path.name} not installed: run `make tools` (builds {venv})")
    return path


def tool_env() -> dict:
    env = dict(os.environ)
    env.update(
        SAM_CLI_TELEMETRY="0",
        BC_SKIP_MAPPING="TRUE",  # checkov: no call to the Bridgecrew/Prisma platform
        CHECKOV_RUN_SCA_PACKAGE_SCAN_V2="false",
        AWS_DEFAULT_REGION=env.get("AWS_DEFAULT_REGION", "us-east-1"),
    )
    return env


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, env=tool_env(), timeout=300, **kwargs
    )


# --------------------------------------------------------------------------- cfn-lint


def wrap_state_machine(asl_path: Path) -> dict:
    """The ASL file as the Definition of an AWS::StepFunctions::StateMachine, its
    ${Placeholders} declared in DefinitionSubstitutions, so cfn-lint checks it against the
    ASL schema (E3601) the way CloudFormation would see it."""
    text = asl_path.read_text(encoding="utf-8")
    names = sorted(set(re.findall(r"\$\{(\w+)\}", text)))
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Resources": {
            "StateMachine": {
                "Type": "AWS::StepFunctions::StateMachine",
                "Properties": {
                    "RoleArn": "arn:aws:iam::123456789012:role/state-machine",
                    "Definition": json.loads(text),
                    "DefinitionSubstitutions": {name: f"placeholder-{name}" for name in names},
                },
            }
        },
    }


def broken_state_machine() -> dict:
    template = wrap_state_machine(STATE_MACHINES[0])
    definition = template["Resources"]["StateMachine"]["Properties"]["Definition"]
    definition["States"][definition["StartAt"]]["Type"] = "Tasq"
    return template


@pytest.fixture(scope="module")
def cfn_lint_findings(tmp_path_factory):
    """One cfn-lint run over each wrapped state machine and a broken canary:
    {file name: [finding, ...]}."""
    cfn_lint = tool(TOOLS_BIN / "cfn-lint", ".venv-tools")
    assert STATE_MACHINES, "no statemachines/*.asl.json found"
    tmp = tmp_path_factory.mktemp("cfn-lint")
    files = []
    for asl in STATE_MACHINES:
        wrapped = tmp / f"{asl.name.removesuffix('.asl.json')}.statemachine.json"
        wrapped.write_text(json.dumps(wrap_state_machine(asl), indent=1))
        files.append(wrapped)
    canary = tmp / "canary.statemachine.json"
    canary.write_text(json.dumps(broken_state_machine(), indent=1))
    files.append(canary)
    result = run([cfn_lint, "--format", "json", "--", *files], cwd=REPO)
    assert result.returncode in (0, 2, 4, 6, 8, 10, 12, 14), result.stderr
    findings: dict[str, list] = {Path(f).name: [] for f in files}
    for match in json.loads(result.stdout or "[]"):
        findings.setdefault(Path(match["Filename"]).name, []).append(match)
    return findings


def describe(matches: list) -> str:
    return "\n".join(
        f"{m['Rule']['Id']} {m['Level']} line {m['Location']['Start']['LineNumber']}: {m['Message']}"
        for m in matches
    )


@pytest.mark.e2e
@pytest.mark.parametrize("asl", STATE_MACHINES, ids=lambda p: p.name)
def test_cfn_lint_state_machine(cfn_lint_findings, asl):
    name = f"{asl.name.removesuffix('.asl.json')}.statemachine.json"
    found = [m for m in cfn_lint_findings[name] if m["Level"] in ("Error", "Warning")]
    assert not found, f"cfn-lint on {asl.name} (as AWS::StepFunctions::StateMachine):\n" + describe(found)


@pytest.mark.e2e
def test_cfn_lint_catches_a_broken_state_machine(cfn_lint_findings):
    rules = {m["Rule"]["Id"] for m in cfn_lint_findings["canary.statemachine.json"]}
    assert "E3601" in rules, f"cfn-lint missed an unknown state Type (rules seen: {rules})"


# --------------------------------------------------------------------------- checkov

CHECKOV_CANARY = """\
AWSTemplateFormatVersion: "2010-09-09"
Resources:
  CanaryBucket:
    Type: AWS::S3::Bucket
"""


@pytest.fixture(scope="module")
def checkov_failures(tmp_path_factory):
    """One offline checkov run over template.yaml and a canary bucket with no settings:
    {file name: [failed check, ...]}."""
    checkov = tool(CHECKOV, ".venv-checkov")
    tmp = tmp_path_factory.mktemp("checkov")
    canary = tmp / "checkov_canary.yaml"
    canary.write_text(CHECKOV_CANARY)
    result = run(
        [checkov, "-f", TEMPLATE, "-f", canary, "--framework", "cloudformation", "--quiet", "--compact",
         "--output", "json", "--skip-download"],
        cwd=tmp,
    )
    assert result.stdout.strip(), f"checkov printed nothing (rc {result.returncode}):\n{result.stderr}"
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failures: dict[str, list] = {"template.yaml": [], "checkov_canary.yaml": []}
    for report in reports:
        assert report.get("summary", {}).get("parsing_errors", 0) == 0, f"checkov parsing errors: {report}"
        for check in report.get("results", {}).get("failed_checks", []):
            failures.setdefault(Path(check["file_path"]).name, []).append(check)
    return failures


@pytest.mark.e2e
def test_checkov_template_has_no_failed_checks(checkov_failures):
    failed = checkov_failures["template.yaml"]
    lines = sorted(
        f"{c['check_id']} on {c['resource']} (lines {c['file_line_range']}): {c['check_name']}"
        for c in failed
    )
    assert not failed, (
        f"checkov: {len(failed)} failed checks on template.yaml. Fix the resource, or, for a false "
        "positive or a deliberate trade-off, add Metadata: checkov: skip: [{id, comment}] next to it:\n"
        + "\n".join(lines)
    )


@pytest.mark.e2e
def test_checkov_catches_a_bare_bucket(checkov_failures):
    ids = {c["check_id"] for c in checkov_failures["checkov_canary.yaml"]}
    assert "CKV_AWS_18" in ids or "CKV_AWS_21" in ids, f"checkov missed a bare bucket (found {ids})"


def test_every_checkov_skip_is_justified():
    """Skips live next to their resource with a reason; no blanket skips on the command line."""
    problems = []
    for name, resource in load_template()["Resources"].items():
        skips = ((resource.get("Metadata") or {}).get("checkov") or {}).get("skip", [])
        for skip in skips:
            if not re.fullmatch(r"CKV2?_AWS_\d+", str(skip.get("id", ""))):
                problems.append(f"{name}: skip without a valid check id: {skip}")
            if len(str(skip.get("comment", "")).strip()) < 15:
                problems.append(f"{name}: skip {skip.get('id')} has no real justification comment")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- hadolint


def dockerfiles() -> list[Path]:
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in IGNORED_DIRS]
        for name in files:
            if name.endswith(".dockerignore"):
                continue
            if name == "Dockerfile" or name.endswith(".Dockerfile") or name.startswith("Dockerfile."):
                found.append(Path(root) / name)
    return sorted(found)


HADOLINT_CANARY = """\
FROM ubuntu
RUN apt-get update && apt-get install -y curl
RUN cd /tmp && curl http://example.com | sh
"""


@pytest.mark.e2e
def test_hadolint_every_dockerfile(tmp_path):
    hadolint = tool(TOOLS_BIN / "hadolint", ".venv-tools")
    files = dockerfiles()
    assert len(files) >= 2, f"expected the training and inference Dockerfiles at least, found {files}"
    canary = tmp_path / "canary.Dockerfile"
    canary.write_text(HADOLINT_CANARY)
    result = run([hadolint, "--format", "json", *files, canary], cwd=REPO)
    findings = json.loads(result.stdout or "[]")
    assert any(Path(f["file"]).name == "canary.Dockerfile" for f in findings), (
        f"hadolint found nothing in a bad Dockerfile: {result.stdout}\n{result.stderr}"
    )
    ours = [f for f in findings if Path(f["file"]).name != "canary.Dockerfile"]
    assert not ours, "hadolint:\n" + "\n".join(
        f"{Path(f['file']).relative_to(REPO)}:{f['line']} {f['code']} {f['level']}: {f['message']}"
        for f in ours
    )
