"""IAM in the loop (src/avatarflow_local/iam.py): AWS's evaluation rules, the mapping from
API calls to IAM actions, and the roles of template.yaml enforced on real calls.

The workflow-level proof (a role missing one statement makes a real run fail, with the user
told) is in tests/test_workflow.py; here each rule is pinned on its own."""

import boto3
import pytest
import unit_stack
from botocore.exceptions import ClientError

from avatarflow_local import iam
from avatarflow_local.iam import Request, UnmappedCall, decide, requests_for

# One template-built stack per module, emptied after each test (tests/unit_stack.py).
module_stack, stack = unit_stack.module_stack, unit_stack.stack


def allow(action, resource, **extra):
    return {"Effect": "Allow", "Action": action, "Resource": resource, **extra}


# --------------------------------------------------------------------------- evaluation rules


@pytest.mark.parametrize(
    ("statement", "request_", "expected"),
    [
        (
            allow("s3:GetObject", "arn:aws:s3:::b/uploads/*"),
            Request("s3:GetObject", "arn:aws:s3:::b/uploads/u/1"),
            "Allow",
        ),
        # Actions match case-insensitively; resources case-sensitively.
        (allow("S3:getobject", "arn:aws:s3:::b/*"), Request("s3:GetObject", "arn:aws:s3:::b/k"), "Allow"),
        (
            allow("s3:GetObject", "arn:aws:s3:::b/Uploads/*"),
            Request("s3:GetObject", "arn:aws:s3:::b/uploads/k"),
            "ImplicitDeny",
        ),
        # `*` spans slashes, `?` is one character.
        (
            allow("s3:Get*", "arn:aws:s3:::b/*/request.json"),
            Request("s3:GetObject", "arn:aws:s3:::b/uploads/u/b/request.json"),
            "Allow",
        ),
        (
            allow("s3:GetObject", "arn:aws:s3:::b/k?"),
            Request("s3:GetObject", "arn:aws:s3:::b/k12"),
            "ImplicitDeny",
        ),
        (allow("s3:GetObject", "arn:aws:s3:::b/k?"), Request("s3:GetObject", "arn:aws:s3:::b/k1"), "Allow"),
        # A bucket-level grant never covers objects, nor the other way round.
        (
            allow("s3:GetObject", "arn:aws:s3:::b"),
            Request("s3:GetObject", "arn:aws:s3:::b/k"),
            "ImplicitDeny",
        ),
        (
            {"Effect": "Allow", "NotAction": "s3:DeleteObject", "Resource": "*"},
            Request("s3:DeleteObject", "arn:aws:s3:::b/k"),
            "ImplicitDeny",
        ),
    ],
)
def test_action_and_resource_matching(statement, request_, expected):
    assert decide([statement], request_) == expected


def test_explicit_deny_beats_any_allow():
    statements = [
        allow("s3:*", "*"),
        {"Effect": "Deny", "Action": "s3:DeleteObject", "Resource": "arn:aws:s3:::b/models/*"},
    ]
    assert decide(statements, Request("s3:DeleteObject", "arn:aws:s3:::b/models/x")) == "ExplicitDeny"
    assert decide(statements, Request("s3:DeleteObject", "arn:aws:s3:::b/uploads/x")) == "Allow"


LIST_DATASETS = allow(
    "s3:ListBucket", "arn:aws:s3:::b", Condition={"StringLike": {"s3:prefix": ["datasets/*"]}}
)


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        ({"s3:prefix": ("datasets/u/b/",)}, "Allow"),
        ({"s3:prefix": ("uploads/u/b/",)}, "ImplicitDeny"),
        ({}, "ImplicitDeny"),  # no prefix at all: the condition key is absent, so it fails
    ],
)
def test_prefix_condition(context, expected):
    assert decide([LIST_DATASETS], Request("s3:ListBucket", "arn:aws:s3:::b", context)) == expected


def test_pass_role_needs_the_service_condition():
    statement = allow(
        "iam:PassRole",
        "arn:aws:iam::1:role/r",
        Condition={"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}},
    )
    to = lambda service: Request("iam:PassRole", "arn:aws:iam::1:role/r", {"iam:PassedToService": (service,)})  # noqa: E731
    assert decide([statement], to("sagemaker.amazonaws.com")) == "Allow"
    assert decide([statement], to("lambda.amazonaws.com")) == "ImplicitDeny"


def test_if_exists_and_unknown_operators():
    exists = allow("s3:ListBucket", "*", Condition={"StringLikeIfExists": {"s3:prefix": ["a/*"]}})
    assert decide([exists], Request("s3:ListBucket", "arn:aws:s3:::b")) == "Allow"
    assert (
        decide([exists], Request("s3:ListBucket", "arn:aws:s3:::b", {"s3:prefix": ("b/",)})) == "ImplicitDeny"
    )
    odd = allow("s3:ListBucket", "*", Condition={"DateGreaterThan": {"aws:CurrentTime": "2020-01-01"}})
    with pytest.raises(KeyError, match="not modelled"):  # fail closed, never a silent allow
        decide([odd], Request("s3:ListBucket", "arn:aws:s3:::b", {"aws:CurrentTime": ("x",)}))


# --------------------------------------------------------------------------- API calls -> IAM requests


@pytest.mark.parametrize(
    ("service", "operation", "params", "expected"),
    [
        ("s3", "HeadObject", {"Bucket": "b", "Key": "k"}, [("s3:GetObject", "arn:aws:s3:::b/k")]),
        (
            "s3",
            "GetObject",
            {"Bucket": "b", "Key": "k", "VersionId": "v"},
            [("s3:GetObjectVersion", "arn:aws:s3:::b/k")],
        ),
        ("s3", "ListObjectsV2", {"Bucket": "b", "Prefix": "p/"}, [("s3:ListBucket", "arn:aws:s3:::b")]),
        ("s3", "ListObjectVersions", {"Bucket": "b"}, [("s3:ListBucketVersions", "arn:aws:s3:::b")]),
        (
            "s3",
            "CopyObject",
            {"Bucket": "b", "Key": "to", "CopySource": "src/from"},
            [("s3:GetObject", "arn:aws:s3:::src/from"), ("s3:PutObject", "arn:aws:s3:::b/to")],
        ),
        (
            "s3",
            "DeleteObjects",
            {"Bucket": "b", "Delete": {"Objects": [{"Key": "x"}, {"Key": "y", "VersionId": "1"}]}},
            [("s3:DeleteObject", "arn:aws:s3:::b/x"), ("s3:DeleteObjectVersion", "arn:aws:s3:::b/y")],
        ),
        (
            "dynamodb",
            "Query",
            {"TableName": "t", "IndexName": "i"},
            [("dynamodb:Query", "arn:aws:dynamodb:us-east-1:1:table/t/index/i")],
        ),
        (
            "dynamodb",
            "TransactWriteItems",
            {"TransactItems": [{"Put": {"TableName": "t"}}]},
            [("dynamodb:PutItem", "arn:aws:dynamodb:us-east-1:1:table/t")],
        ),
        (
            "sqs",
            "DeleteMessageBatch",
            {"QueueUrl": "https://sqs.us-east-1.amazonaws.com/1/q"},
            [("sqs:DeleteMessage", "arn:aws:sqs:us-east-1:1:q")],
        ),
        (
            "sagemaker-runtime",
            "InvokeEndpointAsync",
            {"EndpointName": "My-Endpoint"},
            [("sagemaker:InvokeEndpointAsync", "arn:aws:sagemaker:us-east-1:1:endpoint/my-endpoint")],
        ),
        (
            "lambda",
            "Invoke",
            {"FunctionName": "arn:aws:lambda:us-east-1:1:function:f:live"},
            [("lambda:InvokeFunction", "arn:aws:lambda:us-east-1:1:function:f:live")],  # as invoked
        ),
        (
            "lambda",
            "Invoke",
            {"FunctionName": "f", "Qualifier": "live"},
            [("lambda:InvokeFunction", "arn:aws:lambda:us-east-1:1:function:f:live")],
        ),
    ],
)
def test_calls_map_to_the_actions_aws_evaluates(service, operation, params, expected):
    found = requests_for(service, operation, params, "us-east-1", "1")
    assert [(r.action, r.resource) for r in found] == expected


def test_create_training_job_also_passes_the_role_and_tags():
    found = requests_for(
        "sagemaker",
        "CreateTrainingJob",
        {"TrainingJobName": "Avatar-1", "RoleArn": "arn:aws:iam::1:role/t", "Tags": [{"Key": "k"}]},
        "us-east-1",
        "1",
    )
    assert [(r.action, r.resource) for r in found] == [
        ("sagemaker:CreateTrainingJob", "arn:aws:sagemaker:us-east-1:1:training-job/avatar-1"),
        ("iam:PassRole", "arn:aws:iam::1:role/t"),
        ("sagemaker:AddTags", "arn:aws:sagemaker:us-east-1:1:training-job/avatar-1"),
    ]
    assert found[1].context == {"iam:PassedToService": ("sagemaker.amazonaws.com",)}


def test_an_unmapped_call_fails_closed():
    with pytest.raises(UnmappedCall, match="s3:PutBucketPolicy"):
        requests_for("s3", "PutBucketPolicy", {"Bucket": "b"}, "us-east-1", "1")


# --------------------------------------------------------------------------- the template's roles, enforced


def role_of(stack, function):
    return stack.hook.specs[function].role_arn


def test_every_role_comes_from_the_sam_transform(stack):
    roles = {arn.rsplit("/", 1)[1] for arn in stack.enforcer.roles}
    # SAM-generated function roles, the state machine's, and the template's own two.
    assert {
        "avatarflow-local-OnUploadFunctionRole",
        "avatarflow-local-TrainAvatarStateMachineRole",
        "avatarflow-local-TrainingRole",
        "avatarflow-local-InferenceRole",
    } <= roles
    statements = stack.enforcer.roles[role_of(stack, "on_upload")]
    # SAM attaches AWSLambdaBasicExecutionRole to every function role.
    log_stream = Request(
        "logs:CreateLogStream", "arn:aws:logs:us-east-1:123456789012:log-group:/aws/lambda/x:*"
    )
    assert decide(statements, log_stream) == "Allow"


def test_a_call_outside_the_role_is_denied_as_aws_denies_it(stack):
    table = stack.resources.models_table
    with iam.acting_as(role_of(stack, "on_upload")), pytest.raises(ClientError) as denied:
        boto3.client("dynamodb").put_item(
            TableName=table, Item={"user_id": {"S": "u"}, "version": {"S": "v"}}
        )
    error = denied.value.response
    assert error["Error"]["Code"] == "AccessDeniedException"
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert (
        "dynamodb:PutItem" in error["Error"]["Message"]
        and "OnUploadFunctionRole" in error["Error"]["Message"]
    )
    assert boto3.client("dynamodb").scan(TableName=table)["Count"] == 0  # nothing was written
    # The operator (no role) is not checked: the same call goes through.
    boto3.client("dynamodb").put_item(TableName=table, Item={"user_id": {"S": "u"}, "version": {"S": "v"}})


def test_a_missing_key_is_403_to_a_role_that_cannot_list_the_bucket(stack):
    s3, bucket = boto3.client("s3"), stack.resources.bucket
    with pytest.raises(ClientError) as operator:
        s3.get_object(Bucket=bucket, Key="uploads/u/b/none.jpg")
    assert operator.value.response["Error"]["Code"] == "NoSuchKey"
    with iam.acting_as(role_of(stack, "preprocess_image")):  # may read uploads/*, may not list
        with pytest.raises(ClientError) as denied:
            s3.get_object(Bucket=bucket, Key="uploads/u/b/none.jpg")
        with pytest.raises(ClientError) as head:
            s3.head_object(Bucket=bucket, Key="uploads/u/b/none.jpg")
    assert denied.value.response["Error"]["Code"] == "AccessDenied"
    assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert head.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert ("avatarflow-local-PreprocessImageFunctionRole", "uploads/u/b/none.jpg") in [
        (role.rsplit("/", 1)[1], key) for role, key in stack.enforcer.masked
    ]


def test_a_prefix_conditioned_listing_grant_still_counts_as_lacking(stack):
    """build_dataset may list datasets/* only: S3 decides 403 vs 404 on the bucket-wide
    s3:ListBucket, which a prefix condition does not grant (the stricter reading)."""
    s3, bucket = boto3.client("s3"), stack.resources.bucket
    with iam.acting_as(role_of(stack, "build_dataset")):
        assert s3.list_objects_v2(Bucket=bucket, Prefix="datasets/u/b/")["KeyCount"] == 0
        with pytest.raises(ClientError) as listing:
            s3.list_objects_v2(Bucket=bucket, Prefix="uploads/u/b/")
        with pytest.raises(ClientError) as missing:
            s3.get_object(Bucket=bucket, Key="datasets/u/b/manifest.json")
    assert listing.value.response["Error"]["Code"] == "AccessDenied"
    assert missing.value.response["Error"]["Code"] == "AccessDenied"


def test_state_machine_integrations_run_as_the_state_machine_role(stack):
    """moto's interpreter signs its integration calls with the access key "ak": those calls
    are the state machine role's."""
    client = boto3.client("sns", aws_access_key_id=iam.STATE_MACHINE_ACCESS_KEY, aws_secret_access_key="x")
    client.publish(TopicArn=stack.resources.topic_arn, Message="allowed: NotificationTopic")
    with pytest.raises(ClientError) as denied:
        client.publish(TopicArn=stack.resources.inference_success_topic, Message="not this topic")
    assert denied.value.response["Error"]["Code"] == "AccessDeniedException"
    assert "TrainAvatarStateMachineRole" in denied.value.response["Error"]["Message"]
