"""The operator CLI: retrain a batch's dataset with other hyperparameters (outside the
workflow: nothing is registered), stream a training job's logs, show the training queue and
the endpoint, and invoke the endpoint once as a post-deploy smoke test.

SageMaker calls go through the SageMaker Python SDK's resource classes (sagemaker-core 2.x:
`TrainingJob`, `Endpoint`); S3, DynamoDB and CloudWatch Logs through the same boto3 session.
Exit codes: 0 done, 1 the thing checked is not well (a failed job, a smoke test without an
image), 2 bad usage or not found."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

import boto3

LOG_GROUP = "/aws/sagemaker/TrainingJobs"
TERMINAL_JOB = ("Completed", "Failed", "Stopped")


def _session(args) -> boto3.Session:
    return boto3.Session(profile_name=args.profile, region_name=args.region)


def _print(value) -> None:
    print(json.dumps(value, indent=1, default=str))


# --------------------------------------------------------------------------- retrain
def _job_of(args, session) -> str:
    if args.job:
        return args.job
    table = session.resource("dynamodb").Table(args.models_table)
    row = table.get_item(Key={"user_id": args.user, "version": args.version}).get("Item")
    if not row or not row.get("training_job"):
        raise LookupError(f"no training job on the registry row {args.user}/{args.version}")
    return row["training_job"]


def _hyperparameters(pairs: list[str]) -> dict[str, str]:
    found = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes key=value, not {pair!r}")
        found[key] = value
    return found


def retrain(args) -> int:
    """A new training job on the dataset, image, role, instance and limits of an existing one
    (found by name, or from the registry row of user/version), with hyperparameters changed by
    --set. Its output lands in training/<new job>/; nothing is registered or emailed."""
    from sagemaker.core.resources import TrainingJob

    session = _session(args)
    source = TrainingJob.get(_job_of(args, session), session=session, region=args.region)
    hyperparameters = {**(source.hyper_parameters or {}), **_hyperparameters(args.set)}
    name = f"avatar-ops-{uuid.uuid4().hex[:12]}"  # the stack's IAM scopes jobs to avatar-*
    extra = {}
    if getattr(source, "checkpoint_config", None) and not isinstance(source.checkpoint_config, type(None)):
        uri = getattr(source.checkpoint_config, "s3_uri", None)
        if isinstance(uri, str) and source.training_job_name in uri:
            from sagemaker.core.shapes import CheckpointConfig

            extra["checkpoint_config"] = CheckpointConfig(
                s3_uri=uri.replace(source.training_job_name, name),
                local_path=getattr(source.checkpoint_config, "local_path", "/opt/ml/checkpoints"),
            )
    job = TrainingJob.create(
        training_job_name=name,
        role_arn=source.role_arn,
        algorithm_specification=source.algorithm_specification,
        input_data_config=source.input_data_config,
        output_data_config=source.output_data_config,
        resource_config=source.resource_config,
        stopping_condition=source.stopping_condition,
        hyper_parameters=hyperparameters,
        tags=[{"key": "avatarflow:retrain_of", "value": source.training_job_name}],
        session=session,
        region=args.region,
        **extra,
    )
    _print(
        {
            "training_job": job.training_job_name,
            "retrain_of": source.training_job_name,
            "hyperparameters": hyperparameters,
        }
    )
    return 0


# --------------------------------------------------------------------------- logs
def logs(args) -> int:
    """Print the job's CloudWatch log events (every stream of the job), following new ones
    until the job ends with --follow."""
    from sagemaker.core.resources import TrainingJob

    session = _session(args)
    client = session.client("logs")
    tokens: dict[str, str | None] = {}
    while True:
        job = TrainingJob.get(args.job, session=session, region=args.region)
        streams = client.describe_log_streams(logGroupName=LOG_GROUP, logStreamNamePrefix=f"{args.job}/")
        for stream in streams.get("logStreams", []):
            name = stream["logStreamName"]
            kwargs = {"logGroupName": LOG_GROUP, "logStreamName": name, "startFromHead": True}
            if tokens.get(name):
                kwargs["nextToken"] = tokens[name]
            page = client.get_log_events(**kwargs)
            for event in page.get("events", []):
                print(f"[{name}] {event['message']}")
            tokens[name] = page.get("nextForwardToken")
        status = str(job.training_job_status)
        if not args.follow or status in TERMINAL_JOB:
            print(f"-- {args.job}: {status}", file=sys.stderr)
            return 1 if status == "Failed" else 0
        time.sleep(args.poll)


# --------------------------------------------------------------------------- queue
def queue(args) -> int:
    """The training queue: the jobs holding slots and the waiting batches in grant order,
    with their estimated waits (avatarflow.training_queue, read only)."""
    from avatarflow.training_queue import TrainingQueue

    table = _session(args).resource("dynamodb").Table(args.table)
    _print(TrainingQueue(table, args.limit, 60 * args.estimate_minutes).snapshot())
    return 0


# --------------------------------------------------------------------------- endpoint
def _endpoint_state(name: str, session: boto3.Session, region: str | None) -> dict:
    """DescribeEndpoint through the SDK's Endpoint resource. Where the answer does not fit the
    SDK's model (moto answers DataCaptureConfig {} for an endpoint without capture, which AWS
    omits), the same call through the session's client, said on stderr."""
    from pydantic import ValidationError
    from sagemaker.core.resources import Endpoint

    try:
        found = Endpoint.get(name, session=session, region=region)
    except ValidationError as err:
        print(
            f"note: the SDK could not read DescribeEndpoint's answer ({err.error_count()} fields); "
            "showing it as returned",
            file=sys.stderr,
        )
        raw = session.client("sagemaker", region_name=region).describe_endpoint(EndpointName=name)
        return {
            "endpoint": raw["EndpointName"],
            "status": raw["EndpointStatus"],
            "config": raw.get("EndpointConfigName"),
            "created": raw.get("CreationTime"),
            "last_modified": raw.get("LastModifiedTime"),
            "failure_reason": raw.get("FailureReason"),
            "variants": [
                {
                    "name": v.get("VariantName"),
                    "current_instances": v.get("CurrentInstanceCount"),
                    "desired_instances": v.get("DesiredInstanceCount"),
                }
                for v in raw.get("ProductionVariants", [])
            ],
        }
    failure = getattr(found, "failure_reason", None)
    return {
        "endpoint": found.endpoint_name,
        "status": str(found.endpoint_status),
        "config": found.endpoint_config_name,
        "created": found.creation_time,
        "last_modified": found.last_modified_time,
        "failure_reason": failure if isinstance(failure, str) else None,
        "variants": [
            {
                "name": v.variant_name,
                "current_instances": getattr(v, "current_instance_count", None),
                "desired_instances": getattr(v, "desired_instance_count", None),
            }
            for v in (found.production_variants or [])
        ],
    }


def endpoint(args) -> int:
    """The async endpoint's state: status, config, and each variant's instance counts (it
    scales to zero when idle, so 0 instances is not a fault)."""
    from botocore.exceptions import ClientError

    try:
        state = _endpoint_state(args.name, _session(args), args.region)
    except ClientError as err:
        raise LookupError(str(err)) from err
    _print(state)
    return 0 if state["status"] == "InService" else 1


# --------------------------------------------------------------------------- smoke
def smoke(args) -> int:
    """One generation request on the endpoint (the API's request shape: user, model version,
    prompt with the token), then wait for its result or failure object."""
    from sagemaker.core.resources import Endpoint

    session = _session(args)
    s3 = session.client("s3")
    inference_id = f"ops-smoke-{uuid.uuid4().hex[:12]}"
    request = {
        "user_id": args.user,
        "model_version": args.version,
        "prompt": args.prompt,
        "num_images": 1,
        "steps": args.steps,
        "seed": 1234,
    }
    key = f"requests/{inference_id}.json"
    s3.put_object(
        Bucket=args.bucket, Key=key, Body=json.dumps(request).encode(), ContentType="application/json"
    )
    # InvokeEndpointAsync needs only the name: no DescribeEndpoint first.
    answer = Endpoint(endpoint_name=args.endpoint).invoke_async(
        input_location=f"s3://{args.bucket}/{key}",
        content_type="application/json",
        inference_id=inference_id,
        session=session,
        region=args.region,
    )
    output, failure = answer.output_location, getattr(answer, "failure_location", None)
    print(
        json.dumps(
            {
                "inference_id": inference_id,
                "output_location": output,
                "failure_location": failure if isinstance(failure, str) else None,
            }
        ),
        flush=True,
    )
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        for location, ok in ((output, True), (failure, False)):
            if not isinstance(location, str):
                continue
            bucket, _, path = location.removeprefix("s3://").partition("/")
            try:
                body = s3.get_object(Bucket=bucket, Key=path)["Body"].read()
            except s3.exceptions.NoSuchKey:
                continue
            except Exception as err:  # noqa: BLE001 - a 403 for a missing key, on a role without ListBucket
                if "AccessDenied" not in str(err) and "NoSuchBucket" not in str(err):
                    raise
                continue
            print(body.decode("utf-8", "replace")[:2000])
            print("smoke test " + ("passed" if ok else "FAILED"), file=sys.stderr)
            return 0 if ok else 1
        time.sleep(args.poll)
    print(f"smoke test FAILED: no result within {args.timeout} s", file=sys.stderr)
    return 1


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m avatarflow_ops",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--region")
    top.add_argument("--profile")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("retrain", help=retrain.__doc__.split(".")[0])
    p.add_argument("--job", help="the training job to repeat")
    p.add_argument("--models-table", help="or: the registry table, with --user and --version")
    p.add_argument("--user")
    p.add_argument("--version")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a hyperparameter to change, e.g. --set learning_rate=5e-5 --set max_train_steps=1200",
    )
    p.set_defaults(run=retrain)

    p = sub.add_parser("logs", help=logs.__doc__.split(".")[0])
    p.add_argument("job")
    p.add_argument("--follow", action="store_true")
    p.add_argument("--poll", type=float, default=10)
    p.set_defaults(run=logs)

    p = sub.add_parser("queue", help=queue.__doc__.split(".")[0])
    p.add_argument("--table", required=True, help="the stack's TrainingQueueTable")
    p.add_argument("--limit", type=int, required=True, help="the stack's TrainingConcurrency")
    p.add_argument("--estimate-minutes", type=float, default=20, help="the stack's TrainingEstimateMinutes")
    p.set_defaults(run=queue)

    p = sub.add_parser("endpoint", help=endpoint.__doc__.split(".")[0])
    p.add_argument("name")
    p.set_defaults(run=endpoint)

    p = sub.add_parser("smoke", help=smoke.__doc__.split(".")[0])
    p.add_argument("--endpoint", required=True)
    p.add_argument(
        "--bucket", required=True, help="the stack's data bucket (requests/ is read by the endpoint)"
    )
    p.add_argument("--user", required=True)
    p.add_argument("--version", required=True, help="a READY model version of that user")
    p.add_argument("--prompt", default="a portrait photo of sks person, studio light")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--timeout", type=float, default=900, help="seconds (a cold endpoint scales out from zero)"
    )
    p.add_argument("--poll", type=float, default=5)
    p.set_defaults(run=smoke)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "retrain" and not args.job and not (args.models_table and args.user and args.version):
        print("retrain needs --job, or --models-table with --user and --version", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except (LookupError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
