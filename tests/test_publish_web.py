"""functions/publish_web, the deploy-time publication of the web app, run as Lambda runs it
(its role from template.yaml, IAM enforced on every call) with CloudFormation's custom-resource
protocol: the answer is PUT to the event's ResponseURL (here a capture server on 127.0.0.1)."""

import json

import boto3
import pytest
import unit_stack
from botocore.exceptions import ClientError
from http_stub import QuietHandler, serving

from avatarflow import webapp

module_stack, stack = unit_stack.module_stack, unit_stack.stack  # one stack per module, emptied per test
ORIGIN = "https://d111111abcdef8.cloudfront.net"
HOSTED_UI = "https://avatarflow-prod-123456789012.auth.us-east-1.amazoncognito.com"


@pytest.fixture
def cloudformation():
    """Where CloudFormation would receive the answer: every PUT body, parsed."""
    answers = []

    class Handler(QuietHandler):
        def do_PUT(self):  # noqa: N802 - stdlib name
            answers.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    with serving(Handler) as url:
        yield f"{url}/response", answers


def event(kind, url, stack, **props):
    properties = {"AppBucket": stack.resources.physical["WebBucket"]["Ref"], "AppOrigin": ORIGIN,
                  "DataBucket": stack.resources.bucket, "UserPoolId": "", "ClientId": "client1",
                  "HostedUiUrl": HOSTED_UI, **props}
    return {"RequestType": kind, "ResponseURL": url, "RequestId": "r1",
            "StackId": "arn:aws:cloudformation:us-east-1:123456789012:stack/avatarflow-prod/1",
            "LogicalResourceId": "WebAppPublication", "ResourceType": "Custom::WebAppPublication",
            "ResourceProperties": properties}


@pytest.fixture
def site(tmp_path):
    (tmp_path / "assets").mkdir()
    (tmp_path / "index.html").write_text("<!doctype html><title>app</title>")
    (tmp_path / "assets" / "index-abc123.js").write_text("console.log(1)")
    return tmp_path


def objects(bucket):
    s3 = boto3.client("s3")
    listed = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: s3.head_object(Bucket=bucket, Key=o["Key"]) for o in listed}


def test_create_publishes_the_app_its_config_and_the_upload_cors_then_delete_removes_them(
        stack, cloudformation, site):
    url, answers = cloudformation
    stack.module("publish_web").SITE_DIR = site
    web_bucket = stack.resources.physical["WebBucket"]["Ref"]
    boto3.client("s3").put_object(Bucket=web_bucket, Key="app/assets/index-old.js", Body=b"old")

    assert stack.call("publish_web", event("Create", url, stack))["Status"] == "SUCCESS"
    assert [a["Status"] for a in answers] == ["SUCCESS"]
    published = objects(web_bucket)
    assert sorted(published) == ["app/assets/index-abc123.js", "app/config.json", "app/index.html"]
    assert published["app/index.html"]["ContentType"] == "text/html"
    assert published["app/index.html"]["CacheControl"] == "no-cache"
    assert published["app/assets/index-abc123.js"]["ContentType"] == "text/javascript"
    assert "immutable" in published["app/assets/index-abc123.js"]["CacheControl"]
    body = boto3.client("s3").get_object(Bucket=web_bucket, Key="app/config.json")["Body"].read()
    assert json.loads(body) == webapp.app_config(
        api_base="/api", client_id="client1", authorize_url=f"{HOSTED_UI}/oauth2/authorize",
        token_url=f"{HOSTED_UI}/oauth2/token", logout_url=f"{HOSTED_UI}/logout")
    cors = boto3.client("s3").get_bucket_cors(Bucket=stack.resources.bucket)["CORSRules"]
    assert [(r["AllowedOrigins"], sorted(r["AllowedMethods"])) for r in cors] == [([ORIGIN], ["GET", "POST"])]
    assert not stack.enforcer.denied

    deleted = stack.call("publish_web", event("Delete", url, stack, PhysicalResourceId="x"))
    assert deleted["Status"] == "SUCCESS"
    assert objects(web_bucket) == {}
    with pytest.raises(ClientError, match="NoSuchCORSConfiguration"):
        boto3.client("s3").get_bucket_cors(Bucket=stack.resources.bucket)
    assert [a["Status"] for a in answers] == ["SUCCESS", "SUCCESS"]
    assert not stack.enforcer.denied


def test_a_package_without_the_built_app_fails_the_deploy_with_the_reason(stack, cloudformation, tmp_path):
    url, answers = cloudformation
    stack.module("publish_web").SITE_DIR = tmp_path / "missing"
    assert stack.call("publish_web", event("Update", url, stack))["Status"] == "FAILED"
    (answer,) = answers
    assert answer["Status"] == "FAILED" and "make web-package" in answer["Reason"]
    assert objects(stack.resources.physical["WebBucket"]["Ref"]) == {}


def test_its_role_cannot_write_outside_app_or_touch_user_data(stack, cloudformation, site):
    """Least privilege as deployed: the same function, pointed at the data bucket's user
    prefixes instead of the app bucket, is refused by its role."""
    url, answers = cloudformation
    stack.module("publish_web").SITE_DIR = site
    wrong = event("Create", url, stack, AppBucket=stack.resources.bucket)
    assert stack.call("publish_web", wrong)["Status"] == "FAILED"
    assert answers[0]["Status"] == "FAILED" and "AccessDenied" in answers[0]["Reason"]
    assert any("s3:PutObject" in str(d) for d in stack.enforcer.denied)
    assert objects(stack.resources.bucket) == {}
