"""A local stand-in for the `arn:aws:states:::sagemaker:createTrainingJob.sync` task.

The state machine's Train state sends CreateTrainingJob parameters; in the cloud Step
Functions creates the job and waits for it. Locally (tests, the local runtime) the task's
Resource is substituted with the ARN of a Lambda that the lambda hook maps to `handler`
here, which does what SageMaker would:

  1. lays out a fresh /opt/ml (input/config/hyperparameters.json, input/data/<channel>/
     downloaded from each channel's S3 prefix (or linked from a local `file://` folder, as
     SageMaker local mode allows), model/, output/, checkpoints/);
  2. runs the training entrypoint (containers/training/train) as a new process with
     AVATARFLOW_OPT_ML pointing there, bounded by StoppingCondition.MaxRuntimeInSeconds
     (a fork of a warm interpreter that has the ML stack imported: forkserver.py);
  3. tars model/ to <S3OutputPath><job>/output/model.tar.gz;
  4. returns a DescribeTrainingJob-shaped result, or raises TrainingJobFailed with the
     job's output/failure text (the .sync task fails the same way on AWS).

Managed spot (EnableManagedSpotTraining): a spot reclaim kills the instance; SageMaker
starts the job again on a new one with CheckpointConfig's S3 checkpoints restored to
/opt/ml/checkpoints, and the job stays one job. The stand-in can play one reclaim per job:
with AVATARFLOW_LOCAL_SPOT_RECLAIM_AFTER_STEP=N in its environment, the first run is
SIGKILLed right after step N's checkpoint (the training module's AVATARFLOW_KILL_AFTER_STEP
hook), then run again with the same checkpoints/ and fresh model/ and output/. Any other
death fails the job, as on SageMaker (only reclaims are retried).

Stand-in jobs (`STAND_IN`, set by tests and bench/bench_queue.py, never by the real path):
instead of starting torch, the job sleeps a chosen duration (time-compressed), prints the
trainer's `step=N loss=...` lines, and writes a tiny model/ (an empty LoRA state dict and an
adapter.json) that register_model accepts; it can also fail, run past its stopping condition,
or be refused at creation with the error names Step Functions reports
(SageMaker.ResourceLimitExceededException, SageMaker.AmazonSageMakerException with
ThrottlingException in its cause). Every job, stand-in or real, records its start and end
(monotonic seconds) so a caller can check how many ran at once (`peak_running()`).

The job's stdout is read line by line while it runs: every callable in LISTENERS gets
(job name, line), which is how the local runtime draws a progress bar from the
`step=N loss=...` metric lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

import boto3

from avatarflow_local import forkserver, iam
from avatarflow_local.functions import REPO_ROOT

FUNCTION_NAME = "avatarflow-local-training-job"
# The EventBridge rule Step Functions manages for sagemaker:createTrainingJob.sync.
SYNC_RULE = "StepFunctionsGetEventsForSageMakerTrainingJobsRule"
ENTRYPOINT_ENV = "AVATARFLOW_TRAINING_ENTRYPOINT"
SPOT_RECLAIM_ENV = "AVATARFLOW_LOCAL_SPOT_RECLAIM_AFTER_STEP"
KILL_AFTER_STEP_ENV = "AVATARFLOW_KILL_AFTER_STEP"  # containers/training/train_dreambooth_lora.py
DEFAULT_ENTRYPOINT = REPO_ROOT / "containers" / "training" / "train"

# Every job this process ran, in order: {"name", "status", "hyperparameters", "inputs",
# "managed_spot", "spot_interruptions"}.
JOBS: list[dict] = []
_jobs_lock = threading.Lock()

# Called with (job name, stdout line) for every line a running job prints.
LISTENERS: list[Callable[[str, str], None]] = []


@dataclass
class StandIn:
    """What a stand-in job does, decided per CreateTrainingJob request (tags carry the user
    and batch): `duration_s` seconds of "training"; `outcome` None (completes), "fail", or
    "ResourceLimitExceeded" / "ThrottlingException" (refused at creation, nothing runs)."""

    duration_s: Callable[[dict], float]
    outcome: Callable[[dict], str | None] = lambda request: None
    steps: int = 4


STAND_IN: StandIn | None = None
_running = 0
_peak = 0


def peak_running(reset: bool = False) -> int:
    """The most jobs that ran at once since the last reset."""
    global _peak
    with _jobs_lock:
        peak = _peak
        if reset:
            _peak = _running
        return peak


# The names Step Functions reports for CreateTrainingJob's refusals (the SDK's exception
# classes behind the "SageMaker." prefix); the lambda hook turns a raised exception's class
# name into the task's error name, so these classes carry exactly those names.
ResourceLimitExceeded = type("SageMaker.ResourceLimitExceededException", (Exception,), {})
AmazonSageMakerException = type("SageMaker.AmazonSageMakerException", (Exception,), {})


class TrainingJobFailed(Exception):
    """The training job ended in Failed (the message is its FailureReason)."""


class InvalidTrainingJobRequest(ValueError):
    """CreateTrainingJob parameters SageMaker would reject."""


def _s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri or "")
    if parsed.scheme != "s3" or not parsed.netloc:
        raise InvalidTrainingJobRequest(f"not an s3:// URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def _download_prefix(s3, uri: str, target: Path) -> int:
    if uri.startswith("file://"):
        return _link_folder(Path(urlparse(uri).path), target)
    bucket, prefix = _s3_uri(uri)
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):].lstrip("/")
            if not rel or rel.endswith("/") or ".." in rel.split("/"):
                continue
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(dest))
            count += 1
    return count


def _link_folder(source: Path, target: Path) -> int:
    """A local channel (`file:///abs/folder`): its top-level entries are symlinked, so a
    multi-GB base model is not copied for every job."""
    if not source.is_dir():
        raise InvalidTrainingJobRequest(f"local channel folder does not exist: {source}")
    count = 0
    for item in sorted(source.iterdir()):
        (target / item.name).symlink_to(item.resolve(), target_is_directory=item.is_dir())
        count += sum(1 for f in item.rglob("*") if f.is_file()) if item.is_dir() else 1
    return count


def _run_entrypoint(name: str, env: dict, timeout: float) -> tuple[int | None, str]:
    """Run the entrypoint, streaming stdout lines to LISTENERS; (exit code or None when it
    ran past `timeout` and was killed, output tail)."""
    tail: deque[str] = deque(maxlen=200)
    with tempfile.TemporaryFile(mode="w+") as errors:
        if forkserver.enabled():
            proc = forkserver.start([str(entrypoint())], env, stderr=errors)
        else:
            proc = subprocess.Popen([sys.executable, str(entrypoint())], env=env, stdout=subprocess.PIPE,
                                    stderr=errors, text=True, bufsize=1)

        def pump() -> None:
            for line in proc.stdout:
                tail.append(line)
                for listener in list(LISTENERS):
                    with contextlib.suppress(Exception):  # a display problem never fails the job
                        listener(name, line.rstrip("\n"))

        reader = threading.Thread(target=pump, name=f"{name}-stdout", daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        reader.join(timeout=5)
        errors.seek(0)
        return code, ("".join(tail) + errors.read())[-2000:]


def entrypoint() -> Path:
    return Path(os.environ.get(ENTRYPOINT_ENV, DEFAULT_ENTRYPOINT))


def run_training_job(request: dict, s3=None) -> dict:
    name = request.get("TrainingJobName") or ""
    if not name or len(name) > 63:
        raise InvalidTrainingJobRequest("TrainingJobName must be 1-63 characters")
    hyperparameters = request.get("HyperParameters") or {}
    if not all(isinstance(v, str) for v in hyperparameters.values()):
        raise InvalidTrainingJobRequest("HyperParameters values must be strings")
    s3 = s3 or boto3.client("s3")
    output_bucket, output_prefix = _s3_uri(request["OutputDataConfig"]["S3OutputPath"])
    stopping = request.get("StoppingCondition", {})
    max_runtime = int(stopping.get("MaxRuntimeInSeconds", 86400))
    spot = request.get("EnableManagedSpotTraining") is True
    if spot and int(stopping.get("MaxWaitTimeInSeconds", 0)) < max_runtime:
        raise InvalidTrainingJobRequest(
            "managed spot training needs MaxWaitTimeInSeconds >= MaxRuntimeInSeconds")
    reclaim_after = os.environ.get(SPOT_RECLAIM_ENV, "") if spot else ""
    stand_in = STAND_IN
    refusal = stand_in.outcome(request) if stand_in else None
    if refusal == "ResourceLimitExceeded":
        raise ResourceLimitExceeded(
            f"The account-level service limit '{(request.get('ResourceConfig') or {}).get('InstanceType')}"
            " for"
            " training job usage' is 0 Instances (Service: AmazonSageMaker; Status Code: 400;"
            " Error Code: ResourceLimitExceeded)")
    if refusal == "ThrottlingException":
        raise AmazonSageMakerException(
            "Rate exceeded (Service: AmazonSageMaker; Status Code: 400; Error Code: ThrottlingException)")
    started = datetime.now(UTC)
    record = {"name": name, "status": "InProgress", "hyperparameters": dict(hyperparameters), "inputs": {},
              "managed_spot": spot, "spot_interruptions": 0, "tags": {
                  t["Key"]: t["Value"] for t in request.get("Tags") or []},
              "started": time.monotonic(), "ended": None}
    global _running, _peak
    with _jobs_lock:
        JOBS.append(record)
        _running += 1
        _peak = max(_peak, _running)
    try:
        return _run(request, record, s3, name, hyperparameters, output_bucket, output_prefix, max_runtime,
                    spot, reclaim_after, started, stand_in)
    finally:
        with _jobs_lock:
            _running -= 1
            record["ended"] = time.monotonic()


def _stand_in_job(name: str, stand_in: StandIn, request: dict, env: dict, max_runtime: float,
                  root: Path) -> tuple[int | None, str]:
    """The stand-in's "training": no torch, a sleep of the chosen duration with the trainer's
    metric lines, then a tiny model/ that register_model accepts."""
    duration = float(stand_in.duration_s(request))
    steps = max(1, stand_in.steps)
    for step in range(1, steps + 1):
        time.sleep(min(duration, max_runtime) / steps)
        for listener in list(LISTENERS):
            with contextlib.suppress(Exception):
                listener(name, f"step={step} loss=0.1 step_time={duration / steps:.3f}")
    if duration > max_runtime:
        return None, ""
    if stand_in.outcome(request) == "fail":
        (root / "output" / "failure").write_text("stand-in job failed as asked")
        return 1, ""
    (root / "model" / "pytorch_lora_weights.safetensors").write_bytes(
        (8).to_bytes(8, "little") + b"{}      ")  # a valid, empty safetensors file
    hyper = request.get("HyperParameters") or {}
    (root / "model" / "adapter.json").write_text(json.dumps({
        "token": hyper.get("token", "sks"), "base_model_id": "stand-in", "metrics": {"stand_in": True}}))
    return 0, ""


def _run(request, record, s3, name, hyperparameters, output_bucket, output_prefix, max_runtime, spot,
         reclaim_after, started, stand_in):

    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        root = Path(tmp)
        config = root / "input" / "config"
        config.mkdir(parents=True)
        (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
        (config / "inputdataconfig.json").write_text(json.dumps(
            {c["ChannelName"]: {"TrainingInputMode": "File"} for c in request.get("InputDataConfig", [])}))
        for sub in ("model", "output", "checkpoints"):
            (root / sub).mkdir()
        env = dict(os.environ, AVATARFLOW_OPT_ML=str(root), SM_MODEL_DIR=str(root / "model"),
                   SM_OUTPUT_DATA_DIR=str(root / "output" / "data"), TRAINING_JOB_NAME=name)
        for channel in request.get("InputDataConfig", []):
            cname = channel["ChannelName"]
            folder = root / "input" / "data" / cname
            folder.mkdir(parents=True)
            uri = channel["DataSource"]["S3DataSource"]["S3Uri"]
            record["inputs"][cname] = _download_prefix(s3, uri, folder)
            env[f"SM_CHANNEL_{cname.upper()}"] = str(folder)

        t0 = time.monotonic()
        first_env = dict(env, **{KILL_AFTER_STEP_ENV: reclaim_after}) if reclaim_after else env
        if stand_in is not None:
            code, tail = _stand_in_job(name, stand_in, request, env, max_runtime, root)
        else:
            code, tail = _run_entrypoint(name, first_env, max_runtime)
        if reclaim_after and code == -signal.SIGKILL:
            # The reclaim we played: a new instance, the checkpoints restored, the rest fresh.
            record["spot_interruptions"] += 1
            for sub in ("model", "output"):
                shutil.rmtree(root / sub)
                (root / sub).mkdir()
            code, tail = _run_entrypoint(name, env, max(1.0, max_runtime - (time.monotonic() - t0)))
        if code is None:
            (root / "output" / "failure").write_text("Training job reached the stopping condition")
        seconds = max(1, round(time.monotonic() - t0))
        if code != 0:
            failure = root / "output" / "failure"
            reason = failure.read_text().strip() if failure.is_file() else f"exit code {code}: {tail[-500:]}"
            record["status"] = "Failed"
            raise TrainingJobFailed(f"Training job {name} failed: {reason}")

        archive = root / "model.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for item in sorted((root / "model").iterdir()):
                tar.add(item, arcname=item.name)
        key = f"{output_prefix.rstrip('/')}/{name}/output/model.tar.gz".lstrip("/")
        s3.upload_file(str(archive), output_bucket, key)

    record["status"] = "Completed"
    ended = datetime.now(UTC)
    return {
        "TrainingJobName": name,
        "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{name}",
        "TrainingJobStatus": "Completed",
        "SecondaryStatus": "Completed",
        "ModelArtifacts": {"S3ModelArtifacts": f"s3://{output_bucket}/{key}"},
        "HyperParameters": hyperparameters,
        "AlgorithmSpecification": request.get("AlgorithmSpecification"),
        "RoleArn": request.get("RoleArn"),
        "InputDataConfig": request.get("InputDataConfig"),
        "OutputDataConfig": request.get("OutputDataConfig"),
        "ResourceConfig": request.get("ResourceConfig"),
        "StoppingCondition": request.get("StoppingCondition"),
        "EnableManagedSpotTraining": request.get("EnableManagedSpotTraining", False),
        "CreationTime": started.isoformat(),
        "TrainingStartTime": started.isoformat(),
        "TrainingEndTime": ended.isoformat(),
        "TrainingTimeInSeconds": seconds,
        "BillableTimeInSeconds": seconds,
    }


def iam_requests(request: dict, region: str, account: str) -> list[iam.Request]:
    """What the state machine's role must allow for createTrainingJob.sync (AWS: "IAM
    policies for calling Amazon SageMaker AI"): create, tag, pass the job's role, describe
    and stop the job, and the managed EventBridge rule the .sync pattern polls through."""
    params = {"TrainingJobName": request.get("TrainingJobName", ""), "RoleArn": request.get("RoleArn", ""),
              "Tags": request.get("Tags")}
    found = []
    for operation in ("CreateTrainingJob", "DescribeTrainingJob", "StopTrainingJob"):
        found += iam.requests_for("sagemaker", operation, params, region, account)
    for operation in ("PutTargets", "PutRule", "DescribeRule"):
        found += iam.requests_for("events", operation, {"Name": SYNC_RULE}, region, account)
    return found


def handler(event: dict, context=None) -> dict:
    """Lambda-shaped entry point for the lambda hook. SageMaker reads the channels and
    writes the model and checkpoints with the role the job was given (RoleArn)."""
    with iam.acting_as(event.get("RoleArn")):
        return run_training_job(event)
