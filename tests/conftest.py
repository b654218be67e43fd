"""Test-wide settings: one torch thread, fake AWS credentials, no hub access."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# moto: never let a test reach real AWS with real credentials.
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"  # noqa: S105 - moto's fake credential
os.environ["AWS_SESSION_TOKEN"] = "testing"  # noqa: S105
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)
# Powertools: no X-Ray daemon in tests; metrics need a namespace.
os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "true")
os.environ.setdefault("POWERTOOLS_METRICS_NAMESPACE", "avatarflow-test")
os.environ.setdefault("POWERTOOLS_DEV", "false")

import pytest  # noqa: E402

# The template-built fixtures (tests/workflow_harness.py): `stack` (resources in moto, functions
# run as Lambda, IAM enforced) and `aws` (the same plus the tiny base model, for workflow runs).
from workflow_harness import aws, stack, tiny_model  # noqa: E402, F401


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)
