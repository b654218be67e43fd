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

import functools  # noqa: E402
import gc  # noqa: E402

import pytest  # noqa: E402
from botocore import loaders  # noqa: E402

# Every new botocore session re-reads and re-parses the service models' JSON from disk (10-20 ms
# a client), and this suite makes thousands: moto gives each mock_aws() a new default session and
# the local Lambda runtime gives each handler its own. The files do not change during a run, so
# each is parsed once per process and shared, as botocore already shares one parsed model among
# all the clients of a session (nothing writes to it but botocore's idempotent extras merge).
_read_json_file = loaders.JSONFileLoader.load_file


@functools.cache
def _parsed_once(file_path):
    return _read_json_file(loaders.JSONFileLoader(), file_path)


loaders.JSONFileLoader.load_file = lambda self, file_path: _parsed_once(file_path)

# A worker holds 1-2 million objects (torch, diffusers, moto, botocore models), and the default
# thresholds (700, 10, 10) walk them over and over: 30 s of collection per worker in the unit
# tier. Rarer collections of the same garbage: 3 s. Cycles are still collected, later.
gc.set_threshold(50_000, 20, 100)

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
