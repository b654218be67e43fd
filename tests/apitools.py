"""Shared helpers for the API and on_generation_done tests: API Gateway HTTP API (payload 2.0)
events and SNS-wrapped async notices. The resources themselves come from template.yaml
(tests/unit_stack.py): nothing here builds a table or a bucket."""

import json

import boto3
from botocore.stub import Stubber

from avatarflow_local.lambda_hook import _Response
from avatarflow_local.workflow_stack import LocalStackResources

# avatarflow_local.iam checks the role of this call first on this exact event (iam.INTERCEPTED).
# botocore runs `before-call.*.*` handlers (a plain Stubber's) before the exact event's, so a
# plain Stubber would answer InvokeEndpointAsync before the role is checked.
INVOKE_ASYNC = "before-call.sagemaker-runtime.InvokeEndpointAsync"


class CheckedStubber(Stubber):
    """A botocore Stubber for the API's sagemaker-runtime client that answers after the IAM
    check: its response handler moves from `before-call.*.*` to the exact event."""

    def activate(self):
        super().activate()
        events = self.client.meta.events
        events.unregister("before-call.*.*", self._get_response_handler, unique_id=self._event_id)
        events.register(INVOKE_ASYNC, self._get_response_handler, unique_id=self._event_id)

    def deactivate(self):
        # First: the unique id names one registration, and super() would drop it unused.
        self.client.meta.events.unregister(INVOKE_ASYNC, self._get_response_handler, unique_id=self._event_id)
        super().deactivate()


def answer_invoke_endpoint_async(client) -> None:
    """Every InvokeEndpointAsync of `client` accepted (as the endpoint does), after the IAM check."""

    def answer(params, **_kwargs):
        body = params.get("body") or {}
        inference_id = body.get("InferenceId", "x") if isinstance(body, dict) else "x"
        return _Response(200, {}), {"InferenceId": inference_id, "OutputLocation": "s3://b/async-output/x.out",
                                    "ResponseMetadata": {"HTTPStatusCode": 200}}

    client.meta.events.register(INVOKE_ASYNC, answer, unique_id="avatarflow-tests-endpoint")


def put_model(resources: LocalStackResources, user_id, version, status,
              created_at="2025-01-01T00:00:00.000000Z", training_job=None):
    """A registry row, written as the operator (register_model's work, not under test here)."""
    item = {
        "user_id": user_id,
        "version": version,
        "status": status,
        "batch_id": "batch1",
        "model_prefix": f"models/{user_id}/{version}/",
        "created_at": created_at,
        "updated_at": created_at,
    }
    if training_job:
        item["training_job"] = training_job
    boto3.resource("dynamodb").Table(resources.models_table).put_item(Item=item)


def http_event(method, path, *, sub="alice", body=None, claims=None):
    event = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": "",
        "headers": {"content-type": "application/json", "host": "api.example.com"},
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "abc123",
            "domainName": "api.example.com",
            "domainPrefix": "api",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "192.0.2.1",
                "userAgent": "pytest",
            },
            "requestId": "req-1",
            "routeKey": "$default",
            "stage": "$default",
            "time": "01/Jan/2025:00:00:00 +0000",
            "timeEpoch": 1735689600000,
        },
        "isBase64Encoded": False,
    }
    if claims is None and sub is not None:
        claims = {"sub": sub, "token_use": "access"}
    if claims is not None:
        event["requestContext"]["authorizer"] = {"jwt": {"claims": claims, "scopes": None}}
    if body is not None:
        event["body"] = body if isinstance(body, str) else json.dumps(body)
    return event


def sns_event(message, topic_arn):
    """What SNS delivers to on_generation_done for one message published on topic_arn."""
    return {
        "Records": [
            {
                "EventSource": "aws:sns",
                "EventVersion": "1.0",
                "EventSubscriptionArn": f"{topic_arn}:sub",
                "Sns": {
                    "Type": "Notification",
                    "MessageId": "0b0c0d0e-0000-0000-0000-000000000000",
                    "TopicArn": topic_arn,
                    "Subject": None,
                    "Message": message if isinstance(message, str) else json.dumps(message),
                    "Timestamp": "2025-01-01T00:00:00.000Z",
                    "SignatureVersion": "1",
                    "Signature": "EXAMPLE",
                    "SigningCertUrl": "https://sns.us-east-1.amazonaws.com/cert.pem",
                    "UnsubscribeUrl": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
                    "MessageAttributes": {},
                },
            }
        ]
    }


def body_of(response):
    return json.loads(response["body"]) if response.get("body") else None
