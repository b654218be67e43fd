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


# The longest single tests (`pytest --durations`: 40-160 s each under load). xdist's worksteal
# hands each worker one contiguous slice of the collection and later moves only the ends of
# slices, so a long test near the end of a slice starts late and the whole run waits for it.
# Each of these goes to the start of a slice instead: they run from the first second, in
# parallel. Only the order changes; a name that no longer matches simply keeps its place.
LONGEST_FIRST = (
    "tests/test_web_app.py::test_a_user_signs_in_uploads_trains_generates_downloads_and_deletes",
    "tests/test_bench_gpu.py::test_the_gpu_bench_runs_every_section_on_tiny_models",
    "tests/test_local_stack.py::test_up_server_with_the_aws_cli_and_plain_http",
    "tests/test_training.py::test_killed_run_resumes_from_its_checkpoint_and_finishes",
    "tests/test_memory_plan.py::test_the_meta_pass_counts_what_a_real_step_holds",
    "tests/test_local_stack.py::test_in_process_stack_upload_to_model_ready_to_generation",
)


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: the slices are cut from what runs
def pytest_collection_modifyitems(config, items):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    rank = {nodeid: i for i, nodeid in enumerate(LONGEST_FIRST)}
    first = sorted((item for item in items if item.nodeid in rank), key=lambda item: rank[item.nodeid])
    if workers < 2 or not first:
        return
    rest = [item for item in items if item.nodeid not in rank]
    # The slices as worksteal cuts them: each idle worker in turn gets len(pending) // workers_left.
    sizes, left = [], len(items)
    for remaining in range(workers, 0, -1):
        sizes.append(left // remaining)
        left -= sizes[-1]
    slices = [first[w::workers] for w in range(workers)]
    for w, size in enumerate(sizes):
        take = size - len(slices[w])
        slices[w] += rest[:take]
        rest = rest[take:]
    items[:] = [item for part in slices for item in part] + rest
