"""The workflow harness shared by tests/test_workflow.py, tests/test_faults.py and
tests/test_local_stack.py. The training workflow:
the real statemachines/train_avatar.asl.json executed by moto's ASL interpreter, the real
Lambda handlers in process (lambda hook), the local createTrainingJob.sync stand-in running
the training container's entrypoint on a tiny model.

The fixtures (`tiny_model`, `aws`) are registered for every test module by tests/conftest.py;
the helpers are imported by the test files that drive the workflow. `call` and
`wait_generation` drive the local runtime's HTTP API."""

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
from moto import mock_aws

from avatarflow.tiny_model import build_tiny_pipeline
from avatarflow.workflow import execution_name
from avatarflow_local import forkserver, iam, training_job
from avatarflow_local.lambda_hook import LambdaHook
from avatarflow_local.workflow_stack import create_local_stack

USER = "ada"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sd")


BASE_MODEL_BUCKET = "avatarflow-local-base-models"  # the operator's, apart from the data bucket


@pytest.fixture
def stack():
    """Every resource of template.yaml in moto (tables with their indexes and TTL, queues,
    topics, the bucket, the state machine), nothing hand-built. `stack.call(name, event)`
    runs functions/<name> as Lambda runs it (own environment, Timeout, role) and returns its
    result or raises its exception; every AWS call it makes is checked against its role."""
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        resources = create_local_stack()
        hook = LambdaHook(resources.function_specs)
        with iam.enforcing(resources.enforcer):
            yield SimpleNamespace(resources=resources, hook=hook, call=hook.call, invoke=hook.invoke,
                                  enforcer=resources.enforcer)


@pytest.fixture
def aws(tiny_model):
    """Every resource of template.yaml in moto, the handlers run as Lambda runs them (own
    environment, Timeout, role) and every AWS call checked against its caller's role."""
    forkserver.warm_up()  # the training jobs' interpreter imports torch while the stack is built
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BASE_MODEL_BUCKET)
        for path in Path(tiny_model).rglob("*"):
            if path.is_file():
                s3.upload_file(str(path), BASE_MODEL_BUCKET, f"tiny-sd/{path.relative_to(tiny_model)}")
        # No endpoint here: PackStyles 0 turns the pack after MODEL_READY off (the template's
        # switch; tests/test_packs.py and tests/test_local_stack.py run packs).
        stack = create_local_stack(BaseModelS3Uri=f"s3://{BASE_MODEL_BUCKET}/tiny-sd/", PackStyles="0")
        hook = LambdaHook(stack.function_specs).install()
        sqs = boto3.client("sqs")
        queue = sqs.create_queue(QueueName="inbox")["QueueUrl"]
        attrs = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]
        queue_arn = attrs["QueueArn"]
        boto3.client("sns").subscribe(TopicArn=stack.topic_arn, Protocol="sqs", Endpoint=queue_arn,
                                      Attributes={"RawMessageDelivery": "true"})
        jobs_before = len(training_job.JOBS)
        with iam.enforcing(stack.enforcer):
            yield {"stack": stack, "hook": hook, "s3": s3, "sqs": sqs, "inbox": queue,
                   "sfn": boto3.client("stepfunctions"),
                   "table": boto3.resource("dynamodb").Table(stack.models_table),
                   "jobs": lambda: training_job.JOBS[jobs_before:]}
        hook.uninstall()


def upload(aws, batch, files):
    for name, data in files:
        aws["s3"].put_object(Bucket=aws["stack"].bucket, Key=f"uploads/{USER}/{batch}/{name}", Body=data)


def s3_event(aws, batch, names):
    """The SQS message S3 sends for these uploads (keys URL-encoded, as S3 does)."""
    records = [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": aws["stack"].bucket},
                "object": {"key": f"uploads/{USER}/{batch}/{n}".replace(" ", "+")}}} for n in names]
    body = json.dumps({"Records": records})
    return {"messageId": f"m-{batch}-{names[0]}", "receiptHandle": "r", "body": body,
            "attributes": {}, "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:uploads", "awsRegion": "us-east-1"}


def deliver(aws, *messages):
    """What the SQS event source mapping does: invoke on_upload (as Lambda runs it)."""
    result, error = aws["hook"].invoke("on_upload", {"Records": list(messages)})
    assert error is None and result == {"batchItemFailures": []}, result


def wait_done(aws, arn, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        desc = aws["sfn"].describe_execution(executionArn=arn)
        if desc["status"] != "RUNNING":
            assert_no_runtime_error(aws, arn)
            return desc
        time.sleep(0.2)
    raise AssertionError("execution still running")


def assert_no_runtime_error(aws, arn):
    """moto's `Catch: States.ALL` catches States.Runtime; AWS's does not (the execution just
    fails, nobody is told). Any States.Runtime in a run is therefore a failure here."""
    runtime = [e for e in history(aws, arn) if "States.Runtime" in json.dumps(e, default=str)]
    assert not runtime, f"States.Runtime (uncatchable on AWS) in {arn}: {runtime[:2]}"


def failure_of(aws, arn):
    """The error a failed execution caught (what RecordFailure wrote), for assertion messages."""
    failed = [e for e in history(aws, arn) if e["type"] in ("TaskFailed", "LambdaFunctionFailed")]
    return [e.get("taskFailedEventDetails") or e.get("lambdaFunctionFailedEventDetails") for e in failed]


def history(aws, arn):
    return aws["sfn"].get_execution_history(executionArn=arn, maxResults=1000)["events"]


def executions(aws):
    return aws["sfn"].list_executions(stateMachineArn=aws["stack"].state_machine_arn)["executions"]


def messages(aws):
    got = aws["sqs"].receive_message(QueueUrl=aws["inbox"], MaxNumberOfMessages=10,
                                     MessageAttributeNames=["All"]).get("Messages", [])
    return [{"event": m["MessageAttributes"]["event"]["StringValue"],
             "user_id": m["MessageAttributes"]["user_id"]["StringValue"], "body": m["Body"]} for m in got]


def keys_under(aws, prefix):
    resp = aws["s3"].list_objects_v2(Bucket=aws["stack"].bucket, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def run_batch(aws, batch, files):
    upload(aws, batch, files)
    deliver(aws, s3_event(aws, batch, [n for n, _ in files]))
    (execution,) = [e for e in executions(aws) if e["name"] == execution_name(USER, batch)]
    return execution["executionArn"], wait_done(aws, execution["executionArn"])


# --------------------------------------------------------------------------- HTTP API
def call(method, url, token=None, body=None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        url, method=method, headers=headers, data=json.dumps(body).encode() if body is not None else None
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def wait_generation(api, user, token, generation_id, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, body = call("GET", f"{api}/users/{user}/generations/{generation_id}", token)
        assert status == 200, body
        if body["status"] != "PENDING":
            return body
        time.sleep(0.2)
    raise AssertionError("generation still PENDING")
