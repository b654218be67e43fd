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

# The workflow fixtures (moto with the real state machine, the tiny base model), shared by
# tests/test_workflow.py and tests/test_faults.py without one test file importing another.
from workflow_harness import aws, stack, tiny_model  # noqa: E402, F401

from avatarflow_local.functions import load_handler  # noqa: E402


@pytest.fixture
def handler_of():
    """handler_of("preprocess_image") -> the real handler from functions/<name>/app.py."""
    return load_handler


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


class LambdaContext:
    """The attributes Powertools reads from a Lambda context."""

    function_name = "test-function"
    memory_limit_in_mb = 1024
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:test-function"
    aws_request_id = "00000000-0000-0000-0000-000000000000"

    def get_remaining_time_in_millis(self) -> int:
        return 300_000


@pytest.fixture
def lambda_context():
    return LambdaContext()
