"""The quality loop diffusers' scripts only log: at each checkpoint the trainer draws a few
validation images with fixed seeds, scores each by SFace similarity to the batch's reference
embedding (manifest.json), and publishes the best checkpoint, not merely the last. The scores
go into adapter.json (its `metrics` become the registry row's), the SageMaker metrics
(train:identity), the MODEL_READY email and GET /users/{u}/models.

The tiny model draws no faces, so the embedder is a stand-in that answers per checkpoint."""

from __future__ import annotations

import io
import json
import re
import tarfile

import boto3
import numpy as np
import pytest
import torch
import train_dreambooth_lora as tdl
import unit_stack
from apitools import body_of, http_event
from test_training import REFERENCE, adapter, base_models, dataset, make_job, run_main  # noqa: F401

from avatarflow import notifications

# Most tests here run a diffusion model (tiny, random weights) or train one: the module is in
# the e2e tier, out of make test-fast's quick loop.
pytestmark = pytest.mark.e2e

module_stack, stack = unit_stack.module_stack, unit_stack.stack
IMAGES = 4
ASL = json.loads(
    (tdl.Path(__file__).resolve().parents[1] / "statemachines" / "train_avatar.asl.json").read_text()
)


def with_cosine(c: float) -> list[float]:
    """An embedding whose cosine to REFERENCE is c."""
    r = np.asarray(REFERENCE, dtype=np.float64)
    r /= np.linalg.norm(r)
    u = np.random.default_rng(0).standard_normal(r.size)
    u -= (u @ r) * r
    u /= np.linalg.norm(u)
    return list(c * r + np.sqrt(1 - c * c) * u)


class StandIn:
    """Embeds the images of checkpoint k (in order) as plan[k]: a cosine, or None (no face)."""

    def __init__(self, plan: list[list[float | None]], stop_at: int | None = None):
        self.plan, self.stop_at, self.calls = plan, stop_at, 0
        self.sizes: set = set()

    def __call__(self, image):
        checkpoint, i = divmod(self.calls, IMAGES)
        if checkpoint == self.stop_at:
            raise KeyboardInterrupt  # the instance went away mid-validation
        self.calls += 1
        self.sizes.add(image.size)
        value = self.plan[checkpoint][i]
        return None if value is None else with_cosine(value)


def job(tmp_path, name, base, data, **extra):
    hps = {"max_train_steps": 6, "checkpointing_steps": 2, "validation_images": IMAGES, "validation_steps": 2}
    return make_job(tmp_path / name, base, data, **(hps | extra))


def test_the_best_checkpoint_is_published_not_the_last(tmp_path, base_models, dataset, capsys):  # noqa: F811
    embedder = StandIn([[0.3] * 4, [1.0, 1.0, 1.0, None], [0.5] * 4])  # steps 2, 4, 6
    paths_env = job(tmp_path, "loop", base_models["sd"], dataset)
    hp = tdl.read_hyperparameters(tdl.Paths.from_env(paths_env))
    info = tdl.train(tdl.Paths.from_env(paths_env), hp, log=print, embedder=embedder)
    assert embedder.sizes == {(64, 64)}  # images of the training resolution were scored

    assert [v["step"] for v in info["validation"]] == [2, 4, 6]
    assert [v["identity"] for v in info["validation"]] == pytest.approx([0.3, 0.75, 0.5])
    assert [v["faces_found"] for v in info["validation"]] == [4, 3, 4]
    assert info["validation"][1]["scores"] == pytest.approx([1.0, 1.0, 1.0, None])
    assert info["published_step"] == 4 and info["steps"] == 6
    assert info["identity_score"] == pytest.approx(0.75)
    metrics = info["metrics"]
    assert metrics["identity_score"] == pytest.approx(0.75) and metrics["published_step"] == 4
    assert metrics["faces_found"] == 3 and metrics["validation_images"] == IMAGES
    assert metrics["identity_by_step"] == pytest.approx({"2": 0.3, "4": 0.75, "6": 0.5})

    # The weights are step 4's: the same job stopped at 4 steps trains exactly those.
    published, saved = adapter(tmp_path / "loop")
    assert saved["published_step"] == 4
    env = make_job(tmp_path / "four", base_models["sd"], dataset, max_train_steps=4, checkpointing_steps=2)
    assert run_main(env) == 0
    four, _ = adapter(tmp_path / "four")
    assert published.keys() == four.keys()
    assert all(torch.equal(published[k], four[k]) for k in four)

    # SageMaker reads train:identity from the validation lines, one per checkpoint.
    out = capsys.readouterr().out
    definitions = ASL["States"]["Train"]["Parameters"]["AlgorithmSpecification"]["MetricDefinitions"]
    regex = next(d["Regex"] for d in definitions if d["Name"] == "train:identity")
    assert [float(x) for x in re.findall(regex, out)] == pytest.approx([0.3, 0.75, 0.5])
    assert "publishing checkpoint 4 (identity 0.7500), not the last step" in out


def test_a_resumed_job_keeps_the_best_checkpoint_of_its_first_life(tmp_path, base_models, dataset):  # noqa: F811
    """The best checkpoint's LoRA rides in every checkpoint: a spot restart after step 4 still
    publishes step 2's weights when nothing later beats them."""
    env = job(tmp_path, "spot", base_models["sd"], dataset)
    paths = tdl.Paths.from_env(env)
    hp = tdl.read_hyperparameters(paths)
    first = StandIn([[0.9] * 4, [0.2] * 4], stop_at=2)  # interrupted while validating step 6
    with pytest.raises(KeyboardInterrupt):
        tdl.train(paths, hp, log=print, embedder=first)
    assert (paths.checkpoints / "checkpoint-4").is_dir()
    second = StandIn([[0.5] * 4])
    info = tdl.train(paths, hp, log=print, embedder=second)
    assert info["resumed_from_step"] == 4
    assert [v["step"] for v in info["validation"]] == [2, 4, 6]
    assert info["published_step"] == 2 and info["identity_score"] == pytest.approx(0.9)

    weights, _ = adapter(tmp_path / "spot")
    env = make_job(tmp_path / "two", base_models["sd"], dataset, max_train_steps=2, checkpointing_steps=2)
    assert run_main(env) == 0
    two, _ = adapter(tmp_path / "two")
    assert all(torch.equal(weights[k], two[k]) for k in two)


def test_no_face_anywhere_publishes_the_last_checkpoint(tmp_path, base_models, dataset):  # noqa: F811
    """The tiny model (and a real one that drew no face) gives nothing to rank: ties go to the
    later checkpoint, the score is 0 with no face found, and nobody is told a likeness."""
    env = job(tmp_path, "noface", base_models["sd"], dataset, max_train_steps=4)
    paths = tdl.Paths.from_env(env)
    info = tdl.train(paths, tdl.read_hyperparameters(paths), log=print, embedder=lambda image: None)
    assert info["published_step"] == 4
    assert info["metrics"]["identity_score"] == 0.0 and info["metrics"]["faces_found"] == 0
    assert not any("Likeness" in line for line in _ready(info["metrics"]).splitlines())


def _ready(metrics) -> str:
    return notifications.ready("ada", "b1", "b1", metrics, {"accepted": 9})["message"]


def _tarball(model_dir) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(model_dir.iterdir()):
            tar.add(path, arcname=path.name)
    return buf.getvalue()


def test_the_score_reaches_the_registry_the_email_and_get_models(tmp_path, base_models, dataset, stack):  # noqa: F811
    """The trainer's real output through register_model (as Lambda runs it, as its role) and
    the API: the registry row's metrics, MODEL_READY's text, GET /users/{u}/models."""
    env = job(tmp_path, "ready", base_models["sd"], dataset, max_train_steps=2)
    paths = tdl.Paths.from_env(env)
    tdl.train(paths, tdl.read_hyperparameters(paths), log=print, embedder=StandIn([[0.62, 0.62, None, 0.62]]))
    s3 = boto3.client("s3")
    bucket = stack.resources.bucket
    s3.put_object(Bucket=bucket, Key="training/avatar-q/output/model.tar.gz", Body=_tarball(paths.model))
    result = stack.call(
        "register_model",
        {
            "user_id": "ada",
            "batch_id": "b1",
            "version": "b1",
            "training_job": "avatar-q",
            "model_artifacts": f"s3://{bucket}/training/avatar-q/output/model.tar.gz",
            "execution_arn": "arn:aws:states:us-east-1:123456789012:execution:sm:x",
            "dataset": {"accepted": 3},
        },
    )
    message = result["notification"]["message"]
    assert "Likeness check" in message and "similarity of 0.47" in message  # (3 x 0.62 + 0) / 4
    row = (
        boto3.resource("dynamodb")
        .Table(stack.resources.models_table)
        .get_item(Key={"user_id": "ada", "version": "b1"})["Item"]
    )
    assert float(row["metrics"]["identity_score"]) == pytest.approx(0.465)
    listed = body_of(stack.call("api", http_event("GET", "/users/ada/models", sub="ada")))
    assert listed["models"][0]["identity_score"] == pytest.approx(0.465)
    assert listed["models"][0]["metrics"]["published_step"] == 2
