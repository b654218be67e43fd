"""Shared set-up for the API and on_generation_done tests: moto resources shaped like the
template's, API Gateway HTTP API (payload 2.0) events and SNS-wrapped async notices."""

import json

import boto3

BUCKET = "avatarflow-test-bucket"
MODELS_TABLE = "avatarflow-models"
GENERATIONS_TABLE = "avatarflow-generations"
ENDPOINT_NAME = "avatarflow-async"

ENV = {
    "BUCKET_NAME": BUCKET,
    "MODELS_TABLE": MODELS_TABLE,
    "GENERATIONS_TABLE": GENERATIONS_TABLE,
    "ENDPOINT_NAME": ENDPOINT_NAME,
}


def create_resources():
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    ddb = boto3.client("dynamodb")
    ddb.create_table(
        TableName=MODELS_TABLE,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[
            {"AttributeName": "user_id", "AttributeType": "S"},
            {"AttributeName": "version", "AttributeType": "S"},
        ],
        KeySchema=[
            {"AttributeName": "user_id", "KeyType": "HASH"},
            {"AttributeName": "version", "KeyType": "RANGE"},
        ],
    )
    ddb.create_table(
        TableName=GENERATIONS_TABLE,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[
            {"AttributeName": "generation_id", "AttributeType": "S"},
            {"AttributeName": "user_id", "AttributeType": "S"},
            {"AttributeName": "created_at", "AttributeType": "S"},
        ],
        KeySchema=[{"AttributeName": "generation_id", "KeyType": "HASH"}],
        GlobalSecondaryIndexes=[
            {
                "IndexName": "user_id-index",
                "KeySchema": [
                    {"AttributeName": "user_id", "KeyType": "HASH"},
                    {"AttributeName": "created_at", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            }
        ],
    )


def put_model(user_id, version, status, created_at="2025-01-01T00:00:00.000000Z", training_job=None):
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
    boto3.resource("dynamodb").Table(MODELS_TABLE).put_item(Item=item)


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


def sns_event(message, topic="avatarflow-inference-success"):
    return {
        "Records": [
            {
                "EventSource": "aws:sns",
                "EventVersion": "1.0",
                "EventSubscriptionArn": f"arn:aws:sns:us-east-1:123456789012:{topic}:sub",
                "Sns": {
                    "Type": "Notification",
                    "MessageId": "0b0c0d0e-0000-0000-0000-000000000000",
                    "TopicArn": f"arn:aws:sns:us-east-1:123456789012:{topic}",
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


def empty_resources():
    """Back to an empty bucket and tables (cheaper than a fresh moto per test)."""
    s3 = boto3.client("s3")
    page = s3.list_object_versions(Bucket=BUCKET)
    victims = [
        {"Key": v["Key"], "VersionId": v["VersionId"]}
        for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
    ]
    if victims:
        s3.delete_objects(Bucket=BUCKET, Delete={"Objects": victims})
    ddb = boto3.resource("dynamodb")
    for name, key in ((MODELS_TABLE, ("user_id", "version")), (GENERATIONS_TABLE, ("generation_id",))):
        table = ddb.Table(name)
        for item in table.scan()["Items"]:
            table.delete_item(Key={k: item[k] for k in key})
