"""The operator CLI (src/avatarflow_ops), run as the operator runs it: a subprocess of its own
venv (.venv-ops, lock/ops.txt: sagemaker-core 2.x, whose pins differ from the dev venv's)
against moto in server mode, where moto implements the calls (SageMaker training jobs,
endpoints, InvokeEndpointAsync; S3; DynamoDB; CloudWatch Logs).

One subprocess for the whole module (tests/ops_driver.py: each command through the CLI's
main() in one interpreter, exit code and output per command), so the module imports
sagemaker-core once; `python -m avatarflow_ops` itself is run once more as its own process
(a usage error: that path imports no SDK)."""

import json
import os
import select
import subprocess
import time
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from avatarflow.training_queue import Delivery, TrainingQueue
from avatarflow_local import workflow_stack

REPO = Path(__file__).resolve().parents[1]
OPS_PYTHON = REPO / ".venv-ops" / "bin" / "python"
REGION = "us-east-1"
ROLE = "arn:aws:iam::123456789012:role/avatarflow-training"

pytestmark = [
    pytest.mark.e2e,  # the driver process imports sagemaker-core once (~5-8 s)
    pytest.mark.skipif(
        not OPS_PYTHON.exists() and not os.environ.get("CI"), reason=".venv-ops not built (make tools)"
    ),
]


@pytest.fixture(scope="module")
def moto_server():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    env = {
        "PATH": os.environ["PATH"],
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "ops",
        "AWS_SECRET_ACCESS_KEY": "ops",
        "AWS_DEFAULT_REGION": REGION,
        "PYTHONPATH": str(REPO / "src"),
        "HOME": os.environ.get("HOME", "/tmp"),
    }
    session = boto3.Session(aws_access_key_id="ops", aws_secret_access_key="ops", region_name=REGION)

    def client(name):
        return session.client(name, endpoint_url=url)

    yield env, client, lambda: session.resource("dynamodb", endpoint_url=url)
    server.stop()


def run_cli(env, *args, timeout=120):
    """`python -m avatarflow_ops ARGS` as its own process (the entry point itself)."""
    return subprocess.run(
        [str(OPS_PYTHON), "-m", "avatarflow_ops", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def cli(moto_server):
    """cli(*args) -> CompletedProcess-like (returncode, stdout, stderr) of one CLI command, run
    by the module's one driver process (tests/ops_driver.py)."""
    env = moto_server[0]
    driver = subprocess.Popen(
        [str(OPS_PYTHON), str(REPO / "tests" / "ops_driver.py")],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,  # inherited: an import failure shows in the test output
        cwd=REPO,
    )

    def run(*args, timeout=120):
        driver.stdin.write((json.dumps(list(args)) + "\n").encode())
        driver.stdin.flush()
        line, deadline = b"", time.monotonic() + timeout
        while not line.endswith(b"\n"):
            ready, _, _ = select.select([driver.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                driver.kill()
                raise TimeoutError(f"ops CLI {args} took over {timeout} s")
            chunk = os.read(driver.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the ops driver exited ({driver.wait()}) during {args}")
            line += chunk
        return subprocess.CompletedProcess(list(args), **json.loads(line))

    yield run
    driver.stdin.close()
    driver.wait(timeout=30)


def _training_job(client, name, hyperparameters):
    client("sagemaker").create_training_job(
        TrainingJobName=name,
        RoleArn=ROLE,
        HyperParameters=hyperparameters,
        AlgorithmSpecification={
            "TrainingImage": "123456789012.dkr.ecr.us-east-1.amazonaws.com/avatarflow-training:1",
            "TrainingInputMode": "File",
        },
        InputDataConfig=[
            {
                "ChannelName": "training",
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": "s3://data/datasets/ann/b1/",
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
            }
        ],
        OutputDataConfig={"S3OutputPath": "s3://data/training/"},
        ResourceConfig={"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 50},
        StoppingCondition={"MaxRuntimeInSeconds": 3600},
    )


def template_table(ddb, name: str, logical_id: str):
    """The table as template.yaml declares it, under `name` on the moto server."""
    properties = workflow_stack.load_template()["Resources"][logical_id]["Properties"]
    workflow_stack.create_table(ddb().meta.client, name, properties)
    return ddb().Table(name)


def test_retrain_repeats_the_batchs_job_with_other_hyperparameters(moto_server, cli):
    _, client, ddb = moto_server
    _training_job(client, "avatar-orig", {"learning_rate": "1e-4", "max_train_steps": "800", "token": "sks"})
    template_table(ddb, "models", "ModelsTable")
    ddb().Table("models").put_item(Item={"user_id": "ann", "version": "b1", "training_job": "avatar-orig"})
    done = cli(
        "retrain",
        "--models-table",
        "models",
        "--user",
        "ann",
        "--version",
        "b1",
        "--set",
        "learning_rate=5e-5",
        "--set",
        "max_train_steps=1200",
    )
    assert done.returncode == 0, done.stderr
    new = json.loads(done.stdout)["training_job"]
    assert new.startswith("avatar-ops-")
    job = client("sagemaker").describe_training_job(TrainingJobName=new)
    assert job["HyperParameters"] == {"learning_rate": "5e-5", "max_train_steps": "1200", "token": "sks"}
    assert job["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == "s3://data/datasets/ann/b1/"
    assert job["RoleArn"] == ROLE and job["ResourceConfig"]["InstanceType"] == "ml.g5.2xlarge"
    # Usage errors and a missing row are refused, not guessed (the first also through the entry point).
    assert cli("retrain").returncode == 2
    entry = run_cli(moto_server[0], "retrain")
    assert entry.returncode == 2 and "retrain needs --job" in entry.stderr
    missing = cli("retrain", "--models-table", "models", "--user", "bob", "--version", "b9")
    assert missing.returncode == 2 and "no training job" in missing.stderr
    assert cli("retrain", "--job", "avatar-orig", "--set", "nonsense").returncode == 2


def test_logs_prints_every_stream_of_the_job(moto_server, cli):
    _, client, _ = moto_server
    _training_job(client, "avatar-logs", {"token": "sks"})
    logs = client("logs")
    logs.create_log_group(logGroupName="/aws/sagemaker/TrainingJobs")
    logs.create_log_stream(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName="avatar-logs/algo-1-1")
    now = int(time.time() * 1000)
    logs.put_log_events(
        logGroupName="/aws/sagemaker/TrainingJobs",
        logStreamName="avatar-logs/algo-1-1",
        logEvents=[
            {"timestamp": now, "message": "step=1 loss=0.5"},
            {"timestamp": now + 1, "message": "step=2 loss=0.4"},
        ],
    )
    done = cli("logs", "avatar-logs")
    assert done.returncode == 0, done.stderr
    assert "[avatar-logs/algo-1-1] step=1 loss=0.5" in done.stdout and "step=2 loss=0.4" in done.stdout


def test_queue_shows_the_running_jobs_and_the_line(moto_server, cli):
    _, _, ddb = moto_server
    table = template_table(ddb, "queue", "TrainingQueueTable")
    queue = TrainingQueue(table, 1, 600, deliver=lambda grant: Delivery.DELIVERED)
    arn = "arn:aws:states:us-east-1:123456789012:execution:m:"
    assert queue.acquire("ann", "b1", arn + "a", "token-a").acquired
    assert not queue.acquire("bob", "b1", arn + "b", "token-b").acquired
    done = cli("queue", "--table", "queue", "--limit", "1")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert [r["user_id"] for r in shown["running"]] == ["ann"]
    assert [(w["position"], w["user_id"]) for w in shown["waiting"]] == [(1, "bob")]
    assert "token-" not in done.stdout  # a task token resumes the execution: never shown


def _endpoint(client, name):
    sm = client("sagemaker")
    sm.create_model(
        ModelName=name,
        ExecutionRoleArn=ROLE,
        PrimaryContainer={"Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/avatarflow-infer:1"},
    )
    sm.create_endpoint_config(
        EndpointConfigName=name,
        ProductionVariants=[
            {
                "VariantName": "AllTraffic",
                "ModelName": name,
                "InstanceType": "ml.g4dn.xlarge",  # moto's instance list predates g5
                "InitialInstanceCount": 1,
            }
        ],
    )
    sm.create_endpoint(EndpointName=name, EndpointConfigName=name)


def test_endpoint_state_and_a_smoke_test_that_waits_for_its_image(moto_server, cli):
    _, client, _ = moto_server
    _endpoint(client, "avatarflow-infer")
    done = cli("endpoint", "avatarflow-infer")
    shown = json.loads(done.stdout)
    assert shown["endpoint"] == "avatarflow-infer" and shown["config"] == "avatarflow-infer"
    assert done.returncode == (0 if shown["status"] == "InService" else 1)
    assert cli("endpoint", "nope").returncode != 0

    s3 = client("s3")
    s3.create_bucket(Bucket="data")
    done = cli(
        "smoke",
        "--endpoint",
        "avatarflow-infer",
        "--bucket",
        "data",
        "--user",
        "ann",
        "--version",
        "b1",
        "--timeout",
        "60",
        "--poll",
        "0.2",
    )
    assert done.returncode == 0 and "smoke test passed" in done.stderr, done.stderr
    queued, *body = done.stdout.splitlines()
    queued = json.loads(queued)
    request = json.loads(
        s3.get_object(Bucket="data", Key=f"requests/{queued['inference_id']}.json")["Body"].read()
    )
    assert request["user_id"] == "ann" and request["model_version"] == "b1" and request["num_images"] == 1
    # What it printed is the result object InvokeEndpointAsync named (moto writes a canned one).
    bucket, _, key = queued["output_location"].removeprefix("s3://").partition("/")
    assert "\n".join(body) == s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()


def test_a_smoke_test_without_a_result_in_time_fails(moto_server, cli):
    _, client, _ = moto_server
    _endpoint(client, "avatarflow-silent")
    client("s3").create_bucket(Bucket="data2")
    done = cli(
        "smoke",
        "--endpoint",
        "avatarflow-silent",
        "--bucket",
        "data2",
        "--user",
        "ann",
        "--version",
        "b1",
        "--timeout",
        "0",
    )
    assert done.returncode == 1 and "no result within 0" in done.stderr
