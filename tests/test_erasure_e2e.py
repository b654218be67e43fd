"""DELETE /users/{user_id} while work is in flight, on the whole local stack (LocalRuntime:
moto, the real template resources and state machine, the handlers as Lambda runs them with
IAM enforced, the inference container on the async endpoint stand-in, the HTTP API with its
JWT authorizer, the erasure queue's event source).

Each test holds one piece of work mid-way (the container between generating and writing, the
training job before it starts), DELETEs, lets the work finish, waits for the erasure to be
DONE, and then looks everywhere: every object version of the bucket, every item of every
table, the topic's subscriptions, the emails written and every message published to the
notification topic after the DELETE. The user owned everything in the stack, so nothing at
all may be left but the erasure's tombstone, which holds no id of theirs."""

import json
import threading
import time

import boto3
import pytest
from workflow_harness import call

from avatarflow import keys
from avatarflow.sample_photos import one_person_batch
from avatarflow_local import training_job
from avatarflow_local.runtime import LocalRuntime, Settings

pytestmark = pytest.mark.e2e


def upload_batch(rt, user, batch, email):
    s3 = rt.client("s3")
    prefix = keys.upload_prefix(user, batch)
    for name, data in one_person_batch(8):
        s3.put_object(Bucket=rt.bucket, Key=prefix + name, Body=data)
    request = json.dumps({"email": email}).encode()
    s3.put_object(Bucket=rt.bucket, Key=prefix + keys.REQUEST_FILE, Body=request)


def operator_inbox(rt):
    """A queue subscribed to the notification topic with no filter: every message published."""
    sqs = rt.client("sqs")
    url = sqs.create_queue(QueueName="operator-inbox")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    rt.client("sns").subscribe(TopicArn=rt.resources.topic_arn, Protocol="sqs", Endpoint=arn,
                               Attributes={"RawMessageDelivery": "true"})
    return url


def drain(rt, url):
    sqs, found = rt.client("sqs"), []
    while got := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                     MessageAttributeNames=["All"]).get("Messages", []):
        for m in got:
            found.append({k: v["StringValue"] for k, v in m.get("MessageAttributes", {}).items()})
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    return found


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def erase(rt, user):
    """DELETE over HTTP: 202 and a status URL that answers PENDING."""
    token = rt.token(user)
    status, body = call("DELETE", f"{rt.api_url}/users/{user}", token)
    assert status == 202, body
    assert body["status_url"] == f"{rt.api_url}/users/{user}/deletion"
    return token


def deletion(rt, user, token):
    status, body = call("GET", f"{rt.api_url}/users/{user}/deletion", token)
    assert status == 200, body
    return body


def assert_nothing_left(rt, user, inbox, mails_before):
    """After DONE: no object version, no row (but the tombstone, which holds no id), no
    subscription naming the user, no email and no notification since the DELETE."""
    s3 = rt.client("s3")
    page = s3.list_object_versions(Bucket=rt.bucket)
    left = [v["Key"] for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
    assert left == [], left
    ddb = boto3.resource("dynamodb", endpoint_url=rt.endpoint_url, region_name="us-east-1")
    erasures = rt.resources.physical["ErasuresTable"]["Ref"]
    for name in rt.client("dynamodb").list_tables()["TableNames"]:
        items = ddb.Table(name).scan()["Items"]
        if name == erasures:
            (tombstone,) = items
            assert tombstone["status"] == "DONE" and user not in json.dumps(items, default=str)
        elif name == rt.resources.physical["TrainingQueueTable"]["Ref"]:
            # The queue's own items (the slot count and the mean job time) name nobody.
            assert {i["entry"] for i in items} <= {"lock", "stats"}, items
            assert user not in json.dumps(items, default=str)
        else:
            assert items == [], (name, items)
    sns = rt.client("sns")
    for sub in sns.list_subscriptions_by_topic(TopicArn=rt.resources.topic_arn)["Subscriptions"]:
        policy = sns.get_subscription_attributes(SubscriptionArn=sub["SubscriptionArn"])["Attributes"]
        assert user not in policy.get("FilterPolicy", ""), sub
    time.sleep(1)  # mail capture polls every 0.3 s
    assert sorted(rt.mail_dir.glob("*.eml")) == mails_before
    assert drain(rt, inbox) == []


def test_delete_during_a_generation_leaves_nothing(tmp_path):
    user, batch = "gina-erased", "b1"
    with LocalRuntime(Settings(out_dir=tmp_path / "out", train_steps=2)) as rt:
        inbox = operator_inbox(rt)
        upload_batch(rt, user, batch, "gina@example.com")
        assert rt.wait_for_execution(user, batch, timeout=180)["status"] == "SUCCEEDED"
        wait_for(lambda: list(rt.mail_dir.glob("*MODEL_READY*.eml")), 10, "the MODEL_READY email")
        # The run's avatar pack (2 styles locally) is made too: the erasure must remove it as well.
        assert [m["event"] for m in drain(rt, inbox)] == ["MODEL_READY", "PACK_READY"]
        served_before = len(rt.endpoint.done)  # the pack's generations

        # Hold the container after it generated, before it writes anything.
        engine = rt.endpoint.engine
        generated, release = threading.Event(), threading.Event()
        moderation = engine.moderation  # the output check, between generating and writing

        class Held:
            status = moderation.status

            def __call__(self, images):
                generated.set()
                assert release.wait(120)
                return moderation(images)

        engine.moderation = Held()
        token = rt.token(user)
        status, queued = call("POST", f"{rt.api_url}/users/{user}/generations", token,
                              {"prompt": "portrait of sks person", "num_images": 2, "steps": 2})
        assert status == 202, queued
        assert generated.wait(60)
        mails_before = sorted(rt.mail_dir.glob("*.eml"))

        erase(rt, user)
        # The first pass has run: everything at rest is gone, the generation is in flight.
        progress = wait_for(lambda: (d := deletion(rt, user, token)).get("sweeps") and d, 30, "a pass")
        assert progress["status"] == "PENDING"
        assert progress["in_flight"] == {"generations": 1, "executions": 0}
        assert rt.client("s3").list_objects_v2(Bucket=rt.bucket, Prefix=keys.MODELS).get("KeyCount") == 0
        # Nothing new for the erased user meanwhile.
        again = call("POST", f"{rt.api_url}/users/{user}/generations", token, {"prompt": "sks person"})
        assert again[0] == 410, again

        release.set()
        done = wait_for(lambda: (d := deletion(rt, user, token))["status"] == "DONE" and d, 60, "DONE")
        assert done["timed_out"] is False
        # The container refused to write: 410, its failure body holds no ids (and was swept).
        assert [status for _, status in rt.endpoint.done[served_before:]] == [410]
        assert call("DELETE", f"{rt.api_url}/users/{user}", token)[0] == 204
        assert_nothing_left(rt, user, inbox, mails_before)


def test_delete_during_a_training_run_leaves_nothing_and_sends_nothing(tmp_path, monkeypatch):
    user, batch = "tom-erased", "b1"
    started, release = threading.Event(), threading.Event()
    run = training_job._run_entrypoint

    def held(name, env, timeout):
        started.set()
        assert release.wait(120)
        return run(name, env, timeout)

    monkeypatch.setattr(training_job, "_run_entrypoint", held)
    with LocalRuntime(Settings(out_dir=tmp_path / "out", train_steps=2)) as rt:
        inbox = operator_inbox(rt)
        upload_batch(rt, user, batch, "tom@example.com")
        assert started.wait(180), "the training job never started"
        topic = rt.resources.topic_arn
        listed = rt.client("sns").list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]
        assert "tom@example.com" in [s["Endpoint"] for s in listed]  # on_upload subscribed request.json's

        token = erase(rt, user)
        progress = wait_for(lambda: (d := deletion(rt, user, token)).get("sweeps") and d, 30, "a pass")
        assert progress["in_flight"] == {"generations": 0, "executions": 1}
        # At rest and gone already: the photos, the crops, the email subscription.
        s3 = rt.client("s3")
        for prefix in (keys.UPLOADS, keys.DATASETS):
            assert s3.list_objects_v2(Bucket=rt.bucket, Prefix=prefix).get("KeyCount") == 0, prefix

        release.set()
        desc = rt.wait_for_execution(user, batch, timeout=180)
        assert desc["status"] == "SUCCEEDED", desc
        entered = [e["stateEnteredEventDetails"]["name"] for e in rt.history(desc["executionArn"])
                   if e["type"].endswith("StateEntered")]
        assert "RegisterModel" in entered and entered[-1] == "UserErased"
        assert not {"NotifyReady", "NotifyFailed", "NotifyRejected"} & set(entered)

        done = wait_for(lambda: (d := deletion(rt, user, token))["status"] == "DONE" and d, 60, "DONE")
        assert done["timed_out"] is False
        assert_nothing_left(rt, user, inbox, [])
