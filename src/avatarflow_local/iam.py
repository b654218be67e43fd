"""IAM in the loop: every AWS call made locally is evaluated against the caller's role.

moto enforces no IAM, so a role that lacks a permission passes every local test and fails
on the first real deploy. Here each component's role is taken from template.yaml *after*
SAM's transform (`samtranslator`, the code `sam deploy` runs: policy templates expanded,
the managed policies SAM attaches), its intrinsics resolved against the local stack, and
every boto3 call is checked against it with AWS's evaluation rules (action and resource
wildcards, the condition operators the template uses, explicit deny wins, no matching
Allow is an implicit deny). A denied call raises what AWS raises: ClientError
`AccessDenied`/`AccessDeniedException`, HTTP 403.

Who is calling is a context variable (`ROLE`), set by whoever runs the component:
the Lambda runner for a handler, the training-job stand-in (the role the state machine
passed in CreateTrainingJob), the async-inference stand-in (the model's execution role).
moto's Step Functions interpreter makes the state machine's service-integration calls
through clients it creates with the access key "ak" (moto.stepfunctions...boto_client);
those are the state machine role's. Calls with no role (test code, the local runtime
setting things up) are an operator's and are not checked.

S3 quirk, as S3 documents it: GetObject/HeadObject on a missing key answers 403
AccessDenied, not 404, when the caller may not s3:ListBucket the bucket. A grant narrowed
by an `s3:prefix` condition counts as lacking (the stricter reading).

Example:
    >>> statements = [{"Effect": "Allow", "Action": ["s3:GetObject"],
    ...                "Resource": ["arn:aws:s3:::b/uploads/*"]}]
    >>> decide(statements, Request("s3:GetObject", "arn:aws:s3:::b/uploads/u/1.jpg"))
    'Allow'
    >>> decide(statements, Request("s3:GetObject", "arn:aws:s3:::b/models/x"))
    'ImplicitDeny'
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

from botocore import handlers as botocore_handlers
from botocore.exceptions import ClientError

LOG = logging.getLogger(__name__)

ROLE: contextvars.ContextVar[str | None] = contextvars.ContextVar("avatarflow_iam_role", default=None)
# moto's Step Functions interpreter signs its service-integration calls with this key.
STATE_MACHINE_ACCESS_KEY = "ak"

# The AWS managed policies SAM attaches (AWS publishes their documents; copied here as of 2026).
MANAGED_POLICIES = {
    "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole": [
        {"Effect": "Allow", "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
         "Resource": "*"},
    ],
    # SAM's CodeDeployServiceRole (DeploymentPreference): the AWS managed policy, v3 as AWS
    # publishes it (AWS Managed Policy reference, "AWSCodeDeployRoleForLambda").
    "arn:aws:iam::aws:policy/service-role/AWSCodeDeployRoleForLambda": [
        {"Effect": "Allow", "Action": ["cloudwatch:DescribeAlarms", "lambda:UpdateAlias", "lambda:GetAlias",
                                       "lambda:GetProvisionedConcurrencyConfig", "sns:Publish"],
         "Resource": "*"},
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:GetObjectVersion"],
         "Resource": "arn:aws:s3:::*/CodeDeploy/*"},
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:GetObjectVersion"], "Resource": "*",
         "Condition": {"StringEquals": {"s3:ExistingObjectTag/UseWithCodeDeploy": "true"}}},
        {"Effect": "Allow", "Action": ["lambda:InvokeFunction"],
         "Resource": "arn:aws:lambda:*:*:function:CodeDeployHook_*"},
    ],
    "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess": [
        {"Effect": "Allow", "Action": ["xray:PutTraceSegments", "xray:PutTelemetryRecords",
                                       "xray:GetSamplingRules", "xray:GetSamplingTargets",
                                       "xray:GetSamplingStatisticSummaries"], "Resource": "*"},
    ],
}


class UnmappedCall(Exception):
    """An AWS operation this module cannot translate into IAM actions: fail closed, so a new
    call is added here (with its real action and resource) instead of passing unchecked."""


@dataclass(frozen=True)
class Request:
    """One IAM authorization: an action on a resource ARN, with condition-key values."""

    action: str
    resource: str
    context: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)


# --------------------------------------------------------------------------- evaluation


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _wildcard(pattern: str, value: str, *, case: bool) -> bool:
    """IAM's `*` and `?` (fnmatch would also read [ ] as a class: escape it)."""
    pattern = pattern.replace("[", "[[]")
    if not case:
        return fnmatch.fnmatchcase(value.lower(), pattern.lower())
    return fnmatch.fnmatchcase(value, pattern)


def _condition_holds(operator: str, key: str, wanted, context: dict) -> bool:
    """The condition operators template.yaml uses. Any other fails closed (KeyError)."""
    wanted = [str(w).lower() if isinstance(w, bool) else str(w) for w in _as_list(wanted)]
    if_exists = operator.endswith("IfExists")
    base = operator.removesuffix("IfExists")
    values = context.get(key)
    if values is None:
        # A missing key: a Null check tests it; any other operator is false (true with IfExists).
        if base == "Null":
            return "true" in wanted
        return if_exists
    if base == "Null":
        return "false" in wanted
    tests: dict[str, Callable[[str, str], bool]] = {
        "StringEquals": lambda v, w: v == w,
        "StringNotEquals": lambda v, w: v != w,
        "StringLike": lambda v, w: _wildcard(w, v, case=True),
        "StringEqualsIgnoreCase": lambda v, w: v.lower() == w.lower(),
        "ArnEquals": lambda v, w: _wildcard(w, v, case=True),
        "ArnLike": lambda v, w: _wildcard(w, v, case=True),
        "Bool": lambda v, w: v.lower() == w.lower(),
    }
    if base not in tests:
        raise KeyError(f"condition operator {operator} is not modelled locally")
    test = tests[base]
    if base.startswith("StringNot"):
        return all(all(test(v, w) for w in wanted) for v in values)
    # Single-valued keys: the value matches any of the wanted values.
    return all(any(test(v, w) for w in wanted) for v in values)


def _statement_matches(statement: dict, request: Request) -> bool:
    if "Action" in statement:
        if not any(_wildcard(a, request.action, case=False) for a in _as_list(statement["Action"])):
            return False
    elif any(_wildcard(a, request.action, case=False) for a in _as_list(statement["NotAction"])):
        return False
    if "Resource" in statement:
        if not any(_wildcard(r, request.resource, case=True) for r in _as_list(statement["Resource"])):
            return False
    elif any(_wildcard(r, request.resource, case=True) for r in _as_list(statement["NotResource"])):
        return False
    for operator, pairs in statement.get("Condition", {}).items():
        for key, wanted in pairs.items():
            if not _condition_holds(operator, key, wanted, request.context):
                return False
    return True


def decide(statements: list[dict], request: Request) -> str:
    """'Allow', 'ExplicitDeny' or 'ImplicitDeny' (AWS: an explicit Deny beats any Allow)."""
    allowed = False
    for statement in statements:
        if _statement_matches(statement, request):
            if statement["Effect"] == "Deny":
                return "ExplicitDeny"
            allowed = True
    return "Allow" if allowed else "ImplicitDeny"


# --------------------------------------------------------------------------- roles from the template


def role_statements(translated: dict, resolve: Callable[[object], object]) -> dict[str, list[dict]]:
    """{role logical id: its statements} of every AWS::IAM::Role in a SAM-translated
    template: inline policies plus the managed policies it names, intrinsics resolved."""
    roles = {}
    for logical_id, resource in translated["Resources"].items():
        if resource["Type"] != "AWS::IAM::Role":
            continue
        props = resource["Properties"]
        statements = []
        for policy in props.get("Policies", []):
            document = resolve(policy["PolicyDocument"])
            statements += _as_list(document["Statement"])
        for arn in props.get("ManagedPolicyArns", []):
            arn = resolve(arn)
            if arn not in MANAGED_POLICIES:
                raise KeyError(f"{logical_id}: managed policy {arn} has no local copy (MANAGED_POLICIES)")
            statements += MANAGED_POLICIES[arn]
        roles[logical_id] = statements
    return roles


# --------------------------------------------------------------------------- calls -> requests


def _s3_requests(operation: str, params: dict) -> list[Request]:
    bucket = params.get("Bucket", "")
    bucket_arn = f"arn:aws:s3:::{bucket}"
    key = params.get("Key")
    versioned = "VersionId" in params
    objects = {
        "GetObject": "s3:GetObjectVersion" if versioned else "s3:GetObject",
        "HeadObject": "s3:GetObjectVersion" if versioned else "s3:GetObject",
        "PutObject": "s3:PutObject",
        "CreateMultipartUpload": "s3:PutObject",
        "UploadPart": "s3:PutObject",
        "CompleteMultipartUpload": "s3:PutObject",
        "AbortMultipartUpload": "s3:AbortMultipartUpload",
        "DeleteObject": "s3:DeleteObjectVersion" if versioned else "s3:DeleteObject",
        "GetObjectTagging": "s3:GetObjectTagging",
        "PutObjectTagging": "s3:PutObjectTagging",
    }
    if operation in objects and key is not None:
        return [Request(objects[operation], f"{bucket_arn}/{key}")]
    if operation == "CopyObject":
        source = params["CopySource"]
        if isinstance(source, dict):
            source = f"{source['Bucket']}/{source['Key']}"
        source = unquote(source.lstrip("/").split("?versionId=")[0])
        return [Request("s3:GetObject", f"arn:aws:s3:::{source}"),
                Request("s3:PutObject", f"{bucket_arn}/{key}")]
    if operation == "DeleteObjects":
        return [
            Request("s3:DeleteObjectVersion" if "VersionId" in o else "s3:DeleteObject",
                    f"{bucket_arn}/{o['Key']}")
            for o in params["Delete"]["Objects"]
        ]
    # Bucket configuration: DeleteBucketCors is authorized as s3:PutBucketCORS (AWS's
    # "Actions, resources, and condition keys for Amazon S3" lists no action of its own).
    configuration = {"PutBucketCors": "s3:PutBucketCORS", "DeleteBucketCors": "s3:PutBucketCORS",
                     "GetBucketCors": "s3:GetBucketCORS"}
    if operation in configuration:
        return [Request(configuration[operation], bucket_arn)]
    listing = {"ListObjectsV2": "s3:ListBucket", "ListObjects": "s3:ListBucket",
               "HeadBucket": "s3:ListBucket", "ListObjectVersions": "s3:ListBucketVersions"}
    if operation in listing:
        context = {"s3:prefix": (params["Prefix"],)} if "Prefix" in params else {}
        return [Request(listing[operation], bucket_arn, context)]
    raise UnmappedCall(f"s3:{operation}")


def _arn(service: str, region: str, account: str, resource: str) -> str:
    return f"arn:aws:{service}:{region}:{account}:{resource}"


def _queue_arn(url: str) -> str:
    # https://sqs.<region>.amazonaws.com/<account>/<name> or a local endpoint of that shape.
    parts = urlparse(url).path.strip("/").split("/")
    host = urlparse(url).hostname or ""
    region = host.split(".")[1] if host.startswith("sqs.") else "us-east-1"
    return _arn("sqs", region, parts[-2], parts[-1])


def requests_for(service: str, operation: str, params: dict, region: str, account: str) -> list[Request]:
    """The IAM authorizations AWS evaluates for one API call (service = botocore's name)."""
    here = (region, account)
    if service == "s3":
        return _s3_requests(operation, params)
    if service == "cognito-idp" and operation in ("DescribeUserPoolClient", "UpdateUserPoolClient"):
        pool = _arn("cognito-idp", *here, f"userpool/{params['UserPoolId']}")
        return [Request(f"cognito-idp:{operation}", pool)]
    if service == "dynamodb":
        def table(name: str, index: str | None = None) -> str:
            return _arn("dynamodb", *here, f"table/{name}" + (f"/index/{index}" if index else ""))

        if operation in ("BatchWriteItem", "BatchGetItem"):
            return [Request(f"dynamodb:{operation}", table(name)) for name in params["RequestItems"]]
        if operation == "TransactWriteItems":
            kinds = {"Put": "PutItem", "Update": "UpdateItem", "Delete": "DeleteItem",
                     "ConditionCheck": "ConditionCheckItem"}
            return [Request(f"dynamodb:{kinds[kind]}", table(body["TableName"]))
                    for item in params["TransactItems"] for kind, body in item.items()]
        if operation == "TransactGetItems":
            return [Request("dynamodb:GetItem", table(item["Get"]["TableName"]))
                    for item in params["TransactItems"]]
        return [Request(f"dynamodb:{operation}", table(params["TableName"], params.get("IndexName")))]
    if service == "sns":
        if operation in ("Publish",):
            return [Request("sns:Publish", params.get("TopicArn") or params["TargetArn"])]
        if operation in ("Subscribe", "ListSubscriptionsByTopic", "GetTopicAttributes"):
            return [Request(f"sns:{operation}", params["TopicArn"])]
        if operation in ("Unsubscribe", "GetSubscriptionAttributes"):
            # Evaluated against the subscription's topic (its ARN without the subscription id).
            return [Request(f"sns:{operation}", params["SubscriptionArn"].rsplit(":", 1)[0])]
        raise UnmappedCall(f"sns:{operation}")
    if service == "sqs":
        single = operation.removesuffix("Batch")
        return [Request(f"sqs:{single}", _queue_arn(params["QueueUrl"]))]
    if service == "stepfunctions":
        if operation in ("StartExecution", "ListExecutions", "DescribeStateMachine"):
            return [Request(f"states:{operation}", params["stateMachineArn"])]
        if operation in ("DescribeExecution", "StopExecution", "GetExecutionHistory"):
            return [Request(f"states:{operation}", params["executionArn"])]
        if operation in ("SendTaskSuccess", "SendTaskFailure", "SendTaskHeartbeat"):
            # No resource-level permissions: the task token is the authorization.
            return [Request(f"states:{operation}", "*")]
        raise UnmappedCall(f"states:{operation}")
    if service == "sagemaker":
        if operation in ("CreateTrainingJob", "DescribeTrainingJob", "StopTrainingJob"):
            job = _arn("sagemaker", *here, f"training-job/{params['TrainingJobName'].lower()}")
            found = [Request(f"sagemaker:{operation}", job)]
            if operation == "CreateTrainingJob":
                found.append(Request("iam:PassRole", params["RoleArn"],
                                     {"iam:PassedToService": ("sagemaker.amazonaws.com",)}))
                if params.get("Tags"):
                    found.append(Request("sagemaker:AddTags", job))
            return found
        raise UnmappedCall(f"sagemaker:{operation}")
    if service == "sagemaker-runtime":
        endpoint = _arn("sagemaker", *here, f"endpoint/{params['EndpointName'].lower()}")
        return [Request(f"sagemaker:{operation}", endpoint)]
    if service == "lambda" and operation == "Invoke":
        # IAM authorizes the ARN as invoked: an alias or version is part of it
        # (function:NAME:live), and a grant on the unqualified ARN does not cover it (Lambda
        # guide, "Resources and conditions for Lambda actions": Invoke acts on a function,
        # version or alias ARN; `function:NAME:*` is how a policy names every qualifier).
        name = params["FunctionName"]
        if not name.startswith("arn:"):
            name = _arn("lambda", *here, f"function:{name}")
        qualifier = params.get("Qualifier")
        if qualifier and len(name.split(":")) == 7:
            name = f"{name}:{qualifier}"
        return [Request("lambda:InvokeFunction", name)]
    if service == "events" and operation in ("PutRule", "PutTargets", "DescribeRule"):
        rule = params.get("Name") or params["Rule"]
        return [Request(f"events:{operation}", _arn("events", *here, f"rule/{rule}"))]
    # Content moderation: AWS evaluates these on Resource "*" (no resource-level permissions).
    if service == "rekognition" and operation in ("DetectModerationLabels", "DetectFaces"):
        return [Request(f"rekognition:{operation}", "*")]
    if service == "comprehend" and operation == "DetectToxicContent":
        return [Request("comprehend:DetectToxicContent", "*")]
    if service == "cloudwatch" and operation == "PutMetricData":
        return [Request("cloudwatch:PutMetricData", "*", {"cloudwatch:namespace": (params["Namespace"],)})]
    raise UnmappedCall(f"{service}:{operation}")


# --------------------------------------------------------------------------- enforcement


def access_denied(service: str, operation: str, role: str, request: Request) -> ClientError:
    """What AWS answers a call its role does not allow."""
    code = "AccessDenied" if service == "s3" else "AccessDeniedException"
    message = (f"User: {role} is not authorized to perform: {request.action} on resource: "
               f"{request.resource} because no identity-based policy allows the {request.action} action")
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": 403, "RequestId": "local-iam"}}, operation)


class Enforcer:
    """The roles of one local stack, by role ARN, and the checks the botocore hooks run.

    `stand_ins` map a Lambda function name to what invoking it stands for: the training-job
    stand-in is invoked where AWS would run createTrainingJob.sync, so the state machine
    is checked for what that integration needs, not for lambda:InvokeFunction."""

    def __init__(self, roles: dict[str, list[dict]], state_machine_role: str, region: str, account: str,
                 stand_ins: dict[str, Callable[[dict, str, str], list[Request]]] | None = None):
        self.roles = roles
        self.state_machine_role = state_machine_role
        self.region = region
        self.account = account
        self.stand_ins = stand_ins or {}
        self.denied: list[tuple[str, Request]] = []
        self.allowed: Counter[tuple[str, str]] = Counter()  # (role, action) -> calls
        self.masked: list[tuple[str, str]] = []  # (role, key): a missing key answered 403
        self._lock = threading.Lock()

    def role_of_call(self, request_signer) -> str | None:
        role = ROLE.get()
        if role is not None:
            return role
        credentials = getattr(request_signer, "_credentials", None)
        if getattr(credentials, "access_key", None) == STATE_MACHINE_ACCESS_KEY:
            return self.state_machine_role
        return None

    def requests(self, service: str, operation: str, params: dict) -> list[Request]:
        if service == "lambda" and operation == "Invoke":
            name = params["FunctionName"].split(":function:")[-1].split(":")[0]
            if name in self.stand_ins:
                payload = params.get("Payload") or b"{}"
                return self.stand_ins[name](json.loads(payload), self.region, self.account)
        return requests_for(service, operation, params, self.region, self.account)

    def check(self, role: str, service: str, operation: str, requests: list[Request]) -> None:
        if role not in self.roles:
            raise KeyError(f"no local role {role} (known: {sorted(self.roles)})")
        for request in requests:
            if decide(self.roles[role], request) != "Allow":
                with self._lock:
                    self.denied.append((role, request))
                LOG.info("IAM denied %s %s on %s", role, request.action, request.resource)
                raise access_denied(service, operation, role, request)
            with self._lock:
                self.allowed[(role.rsplit("/", 1)[-1], request.action)] += 1

    def may_list(self, role: str, bucket: str) -> bool:
        """s3:ListBucket on the bucket with no prefix condition met (the stricter reading)."""
        return decide(self.roles[role], Request("s3:ListBucket", f"arn:aws:s3:::{bucket}")) == "Allow"


_ACTIVE: Enforcer | None = None
_PARAMS_KEY = "avatarflow_iam_params"
_MASK_KEY = "avatarflow_iam_missing_key_is_403"
_CHECKED_KEY = "avatarflow_iam_checked"
# Local stand-ins answer these calls from their own before-call handlers (lambda_hook,
# async_inference); botocore runs handlers of a more specific event first, so the check
# is also registered first on exactly these events.
INTERCEPTED = ("before-call.lambda.Invoke", "before-call.sagemaker-runtime.InvokeEndpointAsync",
               "before-call.rekognition.DetectModerationLabels", "before-call.rekognition.DetectFaces",
               "before-call.comprehend.DetectToxicContent")


def _keep_params(params: dict, context: dict, **_kwargs) -> None:
    context[_PARAMS_KEY] = dict(params)


def _before_call(model, params, request_signer, context, **_kwargs):
    enforcer = _ACTIVE
    if enforcer is None or context.get(_CHECKED_KEY):
        return None
    context[_CHECKED_KEY] = True
    role = enforcer.role_of_call(request_signer)
    if role is None:
        return None
    service = model.service_model.service_name
    api_params = context.get(_PARAMS_KEY, {})
    enforcer.check(role, service, model.name, enforcer.requests(service, model.name, api_params))
    if service == "s3" and model.name in ("GetObject", "HeadObject"):
        context[_MASK_KEY] = (role, api_params.get("Key", ""))
        if enforcer.may_list(role, api_params.get("Bucket", "")):
            del context[_MASK_KEY]
    return None


def _after_call(http_response, parsed, model, context, **_kwargs) -> None:
    if context.get(_MASK_KEY) and http_response.status_code == 404:
        if _ACTIVE is not None:
            _ACTIVE.masked.append(context[_MASK_KEY])
        http_response.status_code = 403
        context["error_code_override"] = "AccessDenied"
        parsed["Error"] = {"Code": "AccessDenied" if model.name == "GetObject" else "403",
                           "Message": "Access Denied" if model.name == "GetObject" else "Forbidden"}
        parsed.setdefault("ResponseMetadata", {})["HTTPStatusCode"] = 403


_HOOKS = [
    ("before-parameter-build", _keep_params),
    ("before-call", _before_call),
    *((event, _before_call, botocore_handlers.REGISTER_FIRST) for event in INTERCEPTED),
    ("after-call", _after_call),
]


def register_everywhere(hooks: list[tuple]) -> None:
    """Every botocore session made from now on carries the hooks (as moto's own stubber
    does); the current default session gets them too. A hook is (event, handler) or
    (event, handler, botocore.handlers.REGISTER_FIRST)."""
    for spec in hooks:
        if spec not in botocore_handlers.BUILTIN_HANDLERS:
            botocore_handlers.BUILTIN_HANDLERS.append(spec)
    import boto3

    if boto3.DEFAULT_SESSION is not None:
        events = boto3.DEFAULT_SESSION._session.get_component("event_emitter")
        for name, hook, *first in hooks:
            register = events.register_first if first else events.register
            register(name, hook, unique_id=f"avatarflow-{hook.__name__}-{name}")


def _carry_context_into_s3transfer() -> None:
    """boto3's upload_file/download_file run their GetObject/PutObject calls on s3transfer's
    worker threads, which start with an empty context: without this, those calls would run
    with no role (unchecked). Each task now runs in a copy of the context it was made in."""
    from s3transfer.tasks import Task

    if getattr(Task.__call__, "carries_context", False):
        return
    original_init, original_call = Task.__init__, Task.__call__

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._made_in = contextvars.copy_context()

    def __call__(self, *args, **kwargs):
        return self._made_in.run(original_call, self, *args, **kwargs)

    __call__.carries_context = True
    Task.__init__, Task.__call__ = __init__, __call__


register_everywhere(_HOOKS)
_carry_context_into_s3transfer()


@contextlib.contextmanager
def enforcing(enforcer: Enforcer) -> Iterator[Enforcer]:
    """Turn enforcement on for the duration (one stack at a time per process)."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, enforcer
    try:
        yield enforcer
    finally:
        _ACTIVE = previous


@contextlib.contextmanager
def acting_as(role_arn: str | None) -> Iterator[None]:
    """Run the body as a role: every AWS call in this thread is checked against it."""
    token = ROLE.set(role_arn)
    try:
        yield
    finally:
        ROLE.reset(token)
