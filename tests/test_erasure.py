"""Erasure as a state (avatarflow.erasure, functions/erase_user, DELETE /users/{user_id}): the
mark first, every writer checking it, passes until in-flight work has drained, the user's
SNS subscriptions removed, lifecycle rules behind every prefix that holds user data.

Handlers run as Lambda runs them against template.yaml's resources in moto, each as its own
role (IAM enforced). The end-to-end cases (DELETE during a generation, during a training run)
are in tests/test_erasure_e2e.py."""

import hashlib
import json
import re
import sys
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from avatarflow import batches, erasure, keys, usage
from avatarflow import generations as gen
from avatarflow_local import iam
from avatarflow_local.functions import load_fresh_handler
from avatarflow_local.lambda_hook import LambdaHook
from avatarflow_local.workflow_stack import create_local_stack, load_template, render_definition

REPO = Path(__file__).resolve().parents[1]
T0 = 1_750_000_000  # the clock of these tests (erasure.now_s is patched)


@pytest.fixture
def world(monkeypatch):
    """template.yaml's resources in moto, a fresh instance of each handler, IAM enforced."""
    clock = {"now": T0}
    monkeypatch.setattr(erasure, "now_s", lambda: clock["now"])
    with mock_aws():
        resources = create_local_stack()
        hook = LambdaHook(resources.function_specs, loader=load_fresh_handler)
        ddb = boto3.resource("dynamodb")

        class World:
            r = resources
            s3 = boto3.client("s3")
            sqs = boto3.client("sqs")
            sns = boto3.client("sns")
            erasures = ddb.Table(resources.physical["ErasuresTable"]["Ref"])
            models = ddb.Table(resources.models_table)
            generations = ddb.Table(resources.generations_table)
            queue = resources.physical["ErasureQueue"]["Ref"]
            bucket = resources.bucket
            call = staticmethod(hook.call)

            @staticmethod
            def at(seconds_after_t0):
                clock["now"] = T0 + seconds_after_t0

            @staticmethod
            def module(name):
                return sys.modules[hook._load(name).__module__]

            @staticmethod
            def api(method, path, sub="alice", body=None):
                return hook.call("api", http_event(method, path, sub=sub, body=body))

            @staticmethod
            def delayed():
                """How many erasure messages wait for their DelaySeconds."""
                attributes = World.sqs.get_queue_attributes(
                    QueueUrl=World.queue, AttributeNames=["ApproximateNumberOfMessagesDelayed"])
                return int(attributes["Attributes"]["ApproximateNumberOfMessagesDelayed"])

            @staticmethod
            def queued():
                """The erasure messages ready now (no delay), drained."""
                found = []
                while True:
                    got = World.sqs.receive_message(QueueUrl=World.queue, MaxNumberOfMessages=10,
                                                    AttributeNames=["All"]).get("Messages", [])
                    if not got:
                        return found
                    for m in got:
                        found.append(json.loads(m["Body"]))
                        World.sqs.delete_message(QueueUrl=World.queue, ReceiptHandle=m["ReceiptHandle"])

            @staticmethod
            def sweep(user_id="alice"):
                """One pass, as the event source mapping delivers it; its report."""
                module = World.module("erase_user")
                reports = []
                original = module.sweep
                monkeypatch.setattr(module, "sweep", lambda u: reports.append(original(u)) or reports[-1])
                answer = hook.call("erase_user", sqs_event({"user_id": user_id}))
                monkeypatch.setattr(module, "sweep", original)
                assert answer == {"batchItemFailures": []}, answer
                (report,) = reports
                return report

        with iam.enforcing(resources.enforcer):
            yield World


def http_event(method, path, *, sub="alice", body=None):
    event = {
        "version": "2.0", "routeKey": "$default", "rawPath": path, "rawQueryString": "",
        "headers": {"content-type": "application/json", "host": "api.example.com"},
        "requestContext": {
            "accountId": "123456789012", "apiId": "abc123", "domainName": "api.example.com",
            "domainPrefix": "api", "requestId": "req-1", "routeKey": "$default", "stage": "$default",
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "192.0.2.1",
                     "userAgent": "pytest"},
            "time": "01/Jan/2025:00:00:00 +0000", "timeEpoch": 1735689600000,
        },
        "isBase64Encoded": False,
    }
    if sub is not None:
        event["requestContext"]["authorizer"] = {"jwt": {"claims": {"sub": sub}, "scopes": None}}
    if body is not None:
        event["body"] = json.dumps(body)
    return event


def sqs_event(body):
    return {"Records": [{"messageId": "m1", "receiptHandle": "r", "body": json.dumps(body), "attributes": {},
                         "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
                         "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:erasures",
                         "awsRegion": "us-east-1"}]}


def body_of(response):
    return json.loads(response["body"]) if response.get("body") else None


def versions(w, prefix=""):
    page = w.s3.list_object_versions(Bucket=w.bucket, Prefix=prefix)
    return sorted(v["Key"] for v in page.get("Versions", []) + page.get("DeleteMarkers", []))


def rows_mentioning(w, user_id):
    """Every item of every table of the stack holding user_id as a whole value."""
    client = boto3.client("dynamodb")
    found = []
    for name in client.list_tables()["TableNames"]:
        for item in boto3.resource("dynamodb").Table(name).scan()["Items"]:
            values = json.dumps(gen.from_dynamo(item), default=sorted)  # string sets as lists
            if re.search(rf'"{re.escape(user_id)}[/"]', values) or f"/{user_id}/" in values:
                found.append((name, item))
    return found


def seed_user(w, user):
    """Objects under every per-user prefix, with an old version and a delete marker."""
    for prefix in keys.USER_PREFIXES:
        key = f"{keys.user_prefix(prefix, user)}b1/file.bin"
        w.s3.put_object(Bucket=w.bucket, Key=key, Body=b"one")
        w.s3.put_object(Bucket=w.bucket, Key=key, Body=b"two")
        gone = f"{keys.user_prefix(prefix, user)}b1/deleted.bin"
        w.s3.put_object(Bucket=w.bucket, Key=gone, Body=b"x")
        w.s3.delete_object(Bucket=w.bucket, Key=gone)


def put_generation(w, user, generation_id, status, *, created_at=None, answered=None):
    """A generation row as the API writes it (locations from InvokeEndpointAsync), its request
    object, and the endpoint's answer object when answered ("output" or "failure")."""
    out, fail = f"async-output/{generation_id}.out", f"async-failures/{generation_id}-error.out"
    w.generations.put_item(Item={
        "generation_id": generation_id, "user_id": user, "status": status, "model_version": "v1",
        "request_key": keys.request_key(generation_id), "created_at": created_at or gen.utc_now(),
        "output_location": f"s3://{w.bucket}/{out}", "failure_location": f"s3://{w.bucket}/{fail}"})
    w.s3.put_object(Bucket=w.bucket, Key=keys.request_key(generation_id), Body=b"{}")
    if answered:
        w.s3.put_object(Bucket=w.bucket, Key=out if answered == "output" else fail, Body=b"{}")
    return out, fail


def put_model(w, user, version, status, training_job=None):
    item = {"user_id": user, "version": version, "status": status, "batch_id": version,
            "model_prefix": keys.model_prefix(user, version), "created_at": "2025-01-01T00:00:00Z"}
    if training_job:
        item["training_job"] = training_job
        for name in ("output/model.tar.gz", "checkpoints/checkpoint-1/state.pt"):
            w.s3.put_object(Bucket=w.bucket, Key=f"training/{training_job}/{name}", Body=b"x")
    w.models.put_item(Item=item)


def subscribe(w, user, email):
    return w.sns.subscribe(TopicArn=w.r.topic_arn, Protocol="email", Endpoint=email,
                           Attributes={"FilterPolicy": json.dumps({"user_id": [user]}),
                                       "FilterPolicyScope": "MessageAttributes"},
                           ReturnSubscriptionArn=True)["SubscriptionArn"]


def subscribed(w):
    listed = w.sns.list_subscriptions_by_topic(TopicArn=w.r.topic_arn)["Subscriptions"]
    return sorted(s["Endpoint"] for s in listed)


# --------------------------------------------------------------------------- the mark and the API


def test_delete_marks_the_user_first_and_answers_202_with_a_status_url(world):
    response = world.api("DELETE", "/users/alice")
    assert response["statusCode"] == 202, response
    body = body_of(response)
    url = "https://api.example.com/users/alice/deletion"
    assert body["status"] == "PENDING" and body["status_url"] == url
    assert response["headers"]["Location"] == url
    # The mark: keyed by SHA-256 of the id; the id itself is in no row.
    (mark,) = world.erasures.scan()["Items"]
    assert mark["user_key"] == hashlib.sha256(b"alice").hexdigest()
    assert "alice" not in json.dumps(gen.from_dynamo(mark))
    assert mark["status"] == erasure.PENDING and int(mark["requested_at"]) == T0
    # The first pass is queued at once.
    assert world.queued() == [{"user_id": "alice"}]
    status = world.api("GET", "/users/alice/deletion")
    assert status["statusCode"] == 200 and body_of(status)["status"] == "PENDING"
    # A repeated DELETE keeps the first mark and queues another pass.
    world.at(30)
    assert world.api("DELETE", "/users/alice")["statusCode"] == 202
    assert int(world.erasures.scan()["Items"][0]["requested_at"]) == T0
    assert world.queued() == [{"user_id": "alice"}]


def test_no_deletion_requested_is_404_and_another_users_is_403(world):
    assert world.api("GET", "/users/alice/deletion")["statusCode"] == 404
    assert world.api("GET", "/users/bob/deletion", sub="alice")["statusCode"] == 403
    assert world.api("DELETE", "/users/bob", sub="alice")["statusCode"] == 403
    assert world.erasures.scan()["Items"] == []


def test_an_erased_user_may_not_upload_or_generate(world):
    files = {"files": [{"name": "a.jpg", "content_type": "image/jpeg"}]}
    assert world.api("POST", "/users/alice/uploads", body=files)["statusCode"] == 200
    world.api("DELETE", "/users/alice")
    refused = world.api("POST", "/users/alice/uploads", body=files)
    assert refused["statusCode"] == 410, refused
    assert world.api("POST", "/users/alice/generations", body={"prompt": "sks person"})["statusCode"] == 410
    assert world.api("POST", "/users/bob/uploads", sub="bob", body=files)["statusCode"] == 200


# --------------------------------------------------------------------------- the passes


def test_the_sweep_removes_every_object_row_and_subscription_of_the_user_and_only_theirs(world):
    for user in ("alice", "bob", "alice2"):  # alice2 shares a name prefix with alice: must survive
        seed_user(world, user)
    done_out, _ = put_generation(world, "alice", "gena", gen.COMPLETED, answered="output")
    world.s3.put_object(Bucket=world.bucket, Key=keys.result_key("alice", "gena"), Body=b"{}")
    put_generation(world, "bob", "genb", gen.COMPLETED, answered="output")
    put_model(world, "alice", "v1", "READY", training_job="avatar-job-alice")
    put_model(world, "alice", "v2", "FAILED")
    put_model(world, "bob", "v1", "READY", training_job="avatar-job-bob")
    statuses = boto3.resource("dynamodb").Table(world.r.physical["BatchesTable"]["Ref"])
    for user in ("alice", "bob"):  # batch status rows hold photo file names
        photos = [{"name": "me.jpg", "verdict": "accepted"}]
        batches.set_stage(statuses, user, "b1", batches.QUEUED, photos=photos)
    pack_rows = boto3.resource("dynamodb").Table(world.r.physical["PacksTable"]["Ref"])
    for user in ("alice", "bob"):  # avatar packs (their objects are under packs/ and generations/)
        pack_rows.put_item(Item={"user_id": user, "pack_id": "p1", "status": "COMPLETED",
                                 "contact_sheet_key": keys.contact_sheet_key(user, "p1")})
    subscribe(world, "alice", "alice@example.com")
    subscribe(world, "bob", "bob@example.com")
    world.sns.subscribe(TopicArn=world.r.topic_arn, Protocol="email", Endpoint="ops@example.com")
    usage_table = world.r.physical["UsageTable"]["Ref"]
    for user in ("alice", "bob"):  # quota (day) and metering (month, total) rows
        usage.take_images(boto3.resource("dynamodb").Table(usage_table), user, 2, 10)
        usage.record_generation(boto3.client("dynamodb"), usage_table, user, f"gen-{user}", 1.5, 2, None)

    assert world.api("DELETE", "/users/alice")["statusCode"] == 202
    report = world.sweep()
    assert report["outcome"] == "pending" and report["scheduled"] is True  # not old enough to end
    assert report["subscriptions"] == 1 and report["registry_rows"] == 2 + 3  # models, then usage rows
    assert report["pack_rows"] == 1
    assert [r["user_id"] for r in pack_rows.scan()["Items"]] == ["bob"]

    for prefix in keys.USER_PREFIXES:
        assert versions(world, keys.user_prefix(prefix, "alice")) == []
        assert len(versions(world, keys.user_prefix(prefix, "bob"))) == 4
        assert len(versions(world, keys.user_prefix(prefix, "alice2"))) == 4
    assert versions(world, keys.request_key("gena")) == [] and versions(world, done_out) == []
    assert versions(world, "training/avatar-job-alice/") == []
    assert len(versions(world, "training/avatar-job-bob/")) == 2
    assert versions(world, keys.request_key("genb")) == [keys.request_key("genb")]
    assert rows_mentioning(world, "alice") == []
    assert {(m["user_id"], m["version"]) for m in world.models.scan()["Items"]} == {("bob", "v1")}
    assert [(b["user_id"], b["batch_id"]) for b in statuses.scan()["Items"]] == [("bob", "b1")]
    assert {r["user_id"] for r in boto3.resource("dynamodb").Table(usage_table).scan()["Items"]} == {"bob"}
    assert subscribed(world) == ["bob@example.com", "ops@example.com"]
    # The API's message (this test ran its pass directly) and the next pass, delayed.
    assert world.queued() == [{"user_id": "alice"}] and world.delayed() == 1
    # The API agrees.
    assert body_of(world.api("GET", "/users/alice/models"))["models"] == []
    assert world.api("GET", "/users/alice/generations/gena")["statusCode"] == 404


def test_an_erasure_ends_when_nothing_is_in_flight_and_it_is_old_enough(world):
    timing = erasure.Timing()
    world.api("DELETE", "/users/alice")
    world.queued()
    assert world.sweep()["outcome"] == "pending"
    assert world.queued() == [] and world.delayed() == 1  # the next pass, once the erasure is old enough
    world.at(timing.min_age_s - 1)
    assert world.sweep()["outcome"] == "pending"
    world.at(timing.min_age_s)
    report = world.sweep()
    assert report["outcome"] == "done", report
    status = body_of(world.api("GET", "/users/alice/deletion"))
    assert status["status"] == "DONE" and status["timed_out"] is False
    # A pass that arrives later does nothing; DELETE now answers 204; the id stays refused
    # until the tombstone expires, then it is a new user.
    assert world.sweep()["outcome"] == "not_pending"
    assert world.api("DELETE", "/users/alice")["statusCode"] == 204
    files = {"files": [{"name": "a.jpg", "content_type": "image/jpeg"}]}
    assert world.api("POST", "/users/alice/uploads", body=files)["statusCode"] == 410
    world.at(timing.min_age_s + timing.tombstone_s)
    assert world.api("GET", "/users/alice/deletion")["statusCode"] == 404
    assert world.api("POST", "/users/alice/uploads", body=files)["statusCode"] == 200
    (mark,) = world.erasures.scan()["Items"]
    assert set(gen.from_dynamo(mark)) == {"user_key", "status", "requested_at", "updated_at", "sweeps",
                                          "ttl", "completed_at", "timed_out"}


def test_a_generation_in_flight_keeps_its_row_until_the_endpoint_has_answered(world):
    out, fail = put_generation(world, "alice", "genp", gen.PENDING)
    world.api("DELETE", "/users/alice")
    first = world.sweep()
    assert first["in_flight"] == {"generations": 1, "executions": 0}
    # Its input is gone (a queued request fails instead of running), its row stays: it says
    # where SageMaker will write.
    assert versions(world, keys.request_key("genp")) == []
    assert world.generations.get_item(Key={"generation_id": "genp"}).get("Item")
    # The endpoint answers (the container refuses an erased user: SageMaker keeps the
    # failure body), then writes nothing more.
    world.s3.put_object(Bucket=world.bucket, Key=fail, Body=b'{"error": "user_erased"}')
    world.at(erasure.Timing().sweep_interval_s)
    second = world.sweep()
    assert second["in_flight"] == {"generations": 0, "executions": 0}
    assert versions(world, fail) == [] and versions(world, out) == []
    assert world.generations.scan()["Items"] == []


def test_a_generation_that_never_answers_is_given_up_after_the_wait(world):
    timing = erasure.Timing()
    world.at(0)
    put_generation(world, "alice", "genq", gen.PENDING, created_at="2025-06-15T15:06:40.000000Z")  # ~T0
    world.api("DELETE", "/users/alice")
    assert world.sweep()["in_flight"]["generations"] == 1
    world.at(timing.generation_wait_s + 60)
    report = world.sweep()
    assert report["outcome"] == "done" and report["in_flight"]["generations"] == 0
    assert world.generations.scan()["Items"] == []


def test_a_running_training_run_keeps_the_registry_until_it_ends(world, monkeypatch):
    put_model(world, "alice", "b1", "TRAINING", training_job="avatar-job-1")
    world.api("DELETE", "/users/alice")
    module = world.module("erase_user")
    monkeypatch.setattr(module, "running_executions", lambda user_id: 1)
    report = world.sweep()
    assert report["in_flight"] == {"generations": 0, "executions": 1} and report["registry_rows"] == 0
    assert len(versions(world, "training/avatar-job-1/")) == 2  # the job still writes here
    monkeypatch.setattr(module, "running_executions", lambda user_id: 0)
    world.at(erasure.Timing().min_age_s)
    assert world.sweep()["outcome"] == "done"
    assert versions(world, "training/avatar-job-1/") == [] and world.models.scan()["Items"] == []


def test_running_executions_count_only_the_users_own(world):
    """ListExecutions + DescribeExecution as the function's role: "al" is a name prefix of
    "al-x"'s executions too; the execution input says whose a run is. (moto runs nothing
    here: a started execution stays RUNNING.)"""
    from avatarflow.workflow import execution_input, execution_name

    sfn = boto3.client("stepfunctions")
    for user, batch in (("al", "b1"), ("al-x", "b2"), ("al-x", "b3")):
        sfn.start_execution(stateMachineArn=world.r.state_machine_arn, name=execution_name(user, batch),
                            input=json.dumps(execution_input(user, batch)))
    counted = {}
    for user in ("al", "al-x", "bob"):
        erase(world, user)
        counted[user] = world.sweep(user)["in_flight"]["executions"]
    assert counted == {"al": 1, "al-x": 2, "bob": 0}


def test_one_chain_of_passes_however_many_messages_arrive(world):
    world.api("DELETE", "/users/alice")
    world.queued()
    first = world.sweep()
    assert first["scheduled"] is True
    # A redelivered or repeated message meanwhile: a pass, but no second chain.
    world.at(10)
    again = world.sweep()
    assert again["outcome"] == "pending" and again["scheduled"] is False
    assert world.delayed() == 1
    # The chain's own message, when due, goes on.
    world.at(erasure.Timing().sweep_interval_s)
    assert world.sweep()["scheduled"] is True


def test_a_pass_after_max_age_ends_with_whatever_is_left(world, monkeypatch):
    put_generation(world, "alice", "genx", gen.PENDING)
    put_model(world, "alice", "b1", "TRAINING", training_job="avatar-job-2")
    world.api("DELETE", "/users/alice")
    monkeypatch.setattr(world.module("erase_user"), "running_executions", lambda user_id: 1)
    world.at(erasure.Timing().max_age_s)
    report = world.sweep()
    assert report["outcome"] == "done"
    assert body_of(world.api("GET", "/users/alice/deletion"))["timed_out"] is True
    assert world.generations.scan()["Items"] == [] and world.models.scan()["Items"] == []
    assert versions(world, "training/avatar-job-2/") == []


def test_pending_confirmation_subscriptions_are_skipped_not_an_error(world, monkeypatch):
    """SNS lists an unconfirmed subscription as "PendingConfirmation" (no ARN: it can be
    neither read nor removed; SNS deletes it after 48 hours). moto confirms at once, so the
    listing is the one AWS gives."""
    subscribe(world, "alice", "alice@example.com")
    module = world.module("erase_user")
    world.sweep("nobody")  # the function's clients, made in its environment on first use
    real = module.aws().sns
    listed = real.list_subscriptions_by_topic(TopicArn=world.r.topic_arn)["Subscriptions"]
    pending = {**listed[0], "SubscriptionArn": "PendingConfirmation", "Endpoint": "late@example.com"}

    class Paginator:
        def paginate(self, **kwargs):
            listed = real.list_subscriptions_by_topic(**kwargs)["Subscriptions"]
            return [{"Subscriptions": [pending, *listed]}]

    monkeypatch.setattr(real, "get_paginator", lambda name: Paginator())
    world.api("DELETE", "/users/alice")
    report = world.sweep()
    assert (report["subscriptions"], report["pending_subscriptions"]) == (1, 1)
    assert subscribed(world) == []


def test_a_message_that_is_not_an_erasure_is_dropped(world):
    assert world.call("erase_user", sqs_event({"user_id": "../x"})) == {"batchItemFailures": []}
    assert world.call("erase_user", {"Records": [{**sqs_event({})["Records"][0], "body": "nope"}]}) == {
        "batchItemFailures": []}


# --------------------------------------------------------------------------- every writer checks the mark


def erase(w, user="alice"):
    w.api("DELETE", f"/users/{user}", sub=user)


def test_register_model_keeps_nothing_for_an_erased_user(world):
    erase(world)
    event = {"user_id": "alice", "batch_id": "b1", "version": "b1", "training_job": "avatar-j",
             "model_artifacts": f"s3://{world.bucket}/training/avatar-j/output/model.tar.gz"}
    result = world.call("register_model", event)
    assert result["erased"] is True and result["notification"] is None
    assert versions(world, "models/") == [] and world.models.scan()["Items"] == []


def test_register_model_checks_again_after_its_writes(world, monkeypatch):
    """A DELETE during registration: the files were written (the sweep removes them once the
    run has ended), but the answer says erased, so no MODEL_READY goes out."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in ((keys.ADAPTER_WEIGHTS, b"w"), (keys.ADAPTER_CONFIG, b'{"token": "sks"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    world.s3.put_object(Bucket=world.bucket, Key="training/avatar-j/output/model.tar.gz", Body=buf.getvalue())
    event = {"user_id": "alice", "batch_id": "b1", "version": "b1", "training_job": "avatar-j",
             "model_artifacts": f"s3://{world.bucket}/training/avatar-j/output/model.tar.gz"}
    assert world.call("register_model", event)["erased"] is False  # not erased: registered, told
    world.models.delete_item(Key={"user_id": "alice", "version": "b1"})
    module = world.module("register_model")
    real = module._erased
    answers = iter([False])  # the first check passes; the DELETE lands during the writes

    def erased_during_the_writes(user_id):
        answer = next(answers, None)
        if answer is None:
            erase(world)
            return real(user_id)
        return answer

    monkeypatch.setattr(module, "_erased", erased_during_the_writes)
    result = world.call("register_model", event)
    assert result["erased"] is True and result["notification"] is None
    assert versions(world, keys.model_prefix("alice", "b1"))  # written before the DELETE


@pytest.mark.parametrize("kind", ["MODEL_REJECTED", "MODEL_FAILED"])
def test_notify_sends_nothing_for_an_erased_user(world, kind):
    event = {"event": kind, "user_id": "alice", "batch_id": "b1", "dataset": {}, "error": {}}
    told = world.call("notify", event)
    assert told["erased"] is False and told["subject"] and told["message"]
    erase(world)
    assert world.call("notify", event) == {"subject": None, "message": None, "erased": True}


def test_on_upload_starts_nothing_for_an_erased_user(world):
    world.s3.put_object(Bucket=world.bucket, Key="uploads/alice/b1/request.json",
                        Body=b'{"email": "alice@example.com"}')
    erase(world)
    record = {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": world.bucket},
                                                       "object": {"key": "uploads/alice/b1/request.json"}}}
    event = sqs_event({"Records": [record]})
    assert world.call("on_upload", event) == {"batchItemFailures": []}
    sfn = boto3.client("stepfunctions")
    assert sfn.list_executions(stateMachineArn=world.r.state_machine_arn)["executions"] == []
    assert subscribed(world) == []


def test_on_generation_done_drops_the_notice_of_an_erased_user(world):
    out, _ = put_generation(world, "alice", "gend", gen.PENDING, answered="output")
    erase(world)
    notice = gen.async_notice("gend", output_location=f"s3://{world.bucket}/{out}", endpoint_name="e",
                              input_location=f"s3://{world.bucket}/{keys.request_key('gend')}")
    sns = {"Records": [{"EventSource": "aws:sns", "Sns": {"Message": json.dumps(notice),
                                                          "TopicArn": world.r.inference_success_topic,
                                                          "MessageAttributes": {}}}]}
    assert world.call("on_generation_done", sns) == {"outcomes": ["erased"]}
    assert world.generations.get_item(Key={"generation_id": "gend"})["Item"]["status"] == gen.PENDING


# --------------------------------------------------------------------------- template and state machine


def test_the_state_machine_publishes_nothing_for_an_erased_user():
    """From each task that answers `erased`, the true branch reaches no sns:publish state."""
    definition = json.loads(render_definition({k: "x" for k in re.findall(
        r"\$\{([A-Za-z0-9_]+)\}", (REPO / "statemachines/train_avatar.asl.json").read_text())}))
    states = definition["States"]
    checked = []
    for name, state in states.items():
        if "erased.$" not in state.get("ResultSelector", {}):
            continue
        choice = states[state["Next"]]
        rule = choice["Choices"][0]  # asked first, before any other branch
        assert rule["Variable"] == f"{state['ResultPath']}.erased" and rule["BooleanEquals"] is True
        assert states[rule["Next"]]["Type"] == "Succeed"
        if name not in ("PlanPack", "ReviewPack"):
            assert states[choice["Default"]]["Resource"].endswith(":sns:publish")
        checked.append(name)
    assert sorted(checked) == ["DescribeFailure", "DescribeRejection", "PlanPack", "RegisterModel",
                               "ReviewPack"]
    # The pack's round raises UserErased (a callback task's output is the callback's): caught first.
    assert states["GenerateRound"]["Catch"][0] == {
        "ErrorEquals": ["UserErased"], "ResultPath": "$.pack_error", "Next": "UserErased"}


def _lifecycle_rules():
    rules = load_template()["Resources"]["DataBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    enabled = [r for r in rules if r["Status"] == "Enabled"]
    return {r.get("Prefix", (r.get("Filter") or {}).get("Prefix")): r for r in enabled}


def test_every_prefix_that_holds_user_data_expires_or_says_why_not():
    layout = {v for k, v in vars(keys).items() if k.isupper() and isinstance(v, str) and v.endswith("/")}
    assert layout == set(keys.RETENTION_DAYS), "a prefix of keys.py without a retention decision"
    rules = _lifecycle_rules()
    for prefix, days in keys.RETENTION_DAYS.items():
        if days is None:
            assert len(keys.KEPT_UNTIL_ERASURE[prefix]) > 40
            assert prefix not in rules or "ExpirationInDays" not in rules[prefix], prefix
        else:
            assert rules[prefix]["ExpirationInDays"] == days, prefix
            assert rules[prefix]["NoncurrentVersionExpiration"]["NoncurrentDays"] <= 1, prefix
    assert rules[None]["NoncurrentVersionExpiration"]["NoncurrentDays"] <= 30  # old versions anywhere


def test_the_erasure_pace_in_the_template_fits_what_it_waits_for():
    template = load_template()
    variables = template["Resources"]["EraseUserFunction"]["Properties"]["Environment"]["Variables"]
    timing = erasure.Timing.from_env({k: str(v) for k, v in variables.items()})
    assert timing == erasure.Timing()  # the code's defaults are the template's values
    assert set(erasure.TIMING_ENV.values()) <= set(variables)
    assert timing.sweep_interval_s <= 900  # SQS DelaySeconds
    api = (REPO / "functions/api/app.py").read_text()
    form_ttl = int(re.search(r'_int_env\("UPLOAD_URL_TTL_SECONDS", (\d+)\)', api).group(1))
    assert timing.min_age_s > form_ttl
    assert timing.generation_wait_s >= 21600 + 900  # SageMaker's default RequestTTL + InvocationTimeout
    # The longest training run the template allows: settle rounds, the Train task's own timeout
    # (spot wait + 1 h), the Lambda tasks around it.
    params = template["Parameters"]
    settle = 20 * params["SettleSeconds"]["MaxValue"]
    waits = [int(m["SpotMaxWait"]) for m in template["Mappings"]["StoppingCondition"].values()]
    longest_train = max(waits) + 3600
    assert timing.max_age_s > settle + longest_train + 3600
    with pytest.raises(ValueError, match="DelaySeconds"):  # refused at start, not at the first pass's send
        erasure.Timing.from_env({"ERASURE_SWEEP_INTERVAL_SECONDS": "901"})
    queue = template["Resources"]["ErasureQueue"]["Properties"]
    function = template["Resources"]["EraseUserFunction"]["Properties"]
    assert int(queue["VisibilityTimeout"]) >= 6 * int(function["Timeout"])
