"""The training workflow's resources from template.yaml, created against moto.

`template.yaml` is the source of truth: the state machine is the real
statemachines/train_avatar.asl.json, rendered with the template's DefinitionSubstitutions
keys. Only values change: function ARNs point at in-process handlers (lambda_hook), the
training task at the local createTrainingJob.sync stand-in, and tunables (settle time,
steps, resolution) at test/local values."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import boto3
import yaml

from avatarflow_local import atomic_items, iam, moto_strict, training_job
from avatarflow_local import moderation_stand_in as _moderation_stand_in  # noqa: F401 - its botocore hooks
from avatarflow_local.functions import REPO_ROOT
from avatarflow_local.lambda_hook import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S, FunctionSpec, function_name_of

TEMPLATE = REPO_ROOT / "template.yaml"
DEFINITION = REPO_ROOT / "statemachines" / "train_avatar.asl.json"
STATE_MACHINE = "TrainAvatarStateMachine"
REGION = "us-east-1"
ACCOUNT = "123456789012"
SUBSTITUTION = re.compile(r"\$\{([A-Za-z0-9_]+)\}")


class _CfnLoader(yaml.SafeLoader):
    """Reads CloudFormation short-form tags (!Ref, !GetAtt, !Sub ...) as {"Fn::X": value}."""


def _cfn_tag(loader, tag_suffix, node):
    name = "Ref" if tag_suffix == "Ref" else f"Fn::{tag_suffix}"
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if tag_suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


_CfnLoader.add_multi_constructor("!", _cfn_tag)


@cache
def load_template(path: Path = TEMPLATE) -> dict:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_CfnLoader)  # noqa: S506 - SafeLoader subclass


def function_variables(template: dict, logical_id: str) -> dict:
    """A function's environment as SAM deploys it: Globals first, the function's own on top."""
    shared = template.get("Globals", {}).get("Function", {}).get("Environment", {}).get("Variables", {})
    own = template["Resources"][logical_id]["Properties"].get("Environment", {}).get("Variables", {})
    return {**shared, **own}


def function_folder(template: dict, logical_id: str) -> str:
    """functions/<folder> of a template function: from CodeUri, or the image's handler command."""
    props = template["Resources"][logical_id]["Properties"]
    if "CodeUri" in props:
        return Path(props["CodeUri"]).name
    return props["ImageConfig"]["Command"][0].split(".")[0]


def lambda_arn(name: str) -> str:
    return f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}"


def alias_arn(template: dict, logical_id: str) -> str:
    """`!Ref <Function>.Alias`: the ARN of the function's AutoPublishAlias (name:alias)."""
    alias = template["Resources"][logical_id]["Properties"].get("AutoPublishAlias")
    if not alias:
        raise KeyError(f"{logical_id}.Alias: the function has no AutoPublishAlias")
    return f"{lambda_arn(function_folder(template, logical_id))}:{alias}"


def definition_substitution_keys(template: dict | None = None) -> dict:
    template = template or load_template()
    return template["Resources"][STATE_MACHINE]["Properties"]["DefinitionSubstitutions"]


# Template parameters whose AWS services moto does not implement (Rekognition moderation and
# faces, Comprehend toxicity): off locally, so no call is made and the results say so, unless
# a caller turns them on with a stand-in (avatarflow_local.moderation_stand_in).
LOCAL_PARAMETERS = {"PromptToxicityCheck": "off", "OutputModeration": "model", "UploadModeration": "off"}


def local_substitutions(bucket: str, table: str, topic_arn: str, **overrides: str) -> dict[str, str]:
    """Every DefinitionSubstitutions key of the template, with local values."""
    template = load_template()
    values = {
        "BucketName": bucket,
        "ModelsTableName": table,
        "TopicArn": topic_arn,
        "TrainingJobResource": lambda_arn(training_job.FUNCTION_NAME),
        "TrainingImageUri": f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/avatarflow-training:local",
        "TrainingRoleArn": f"arn:aws:iam::{ACCOUNT}:role/avatarflow-training",
        "BaseModelS3Uri": f"s3://{bucket}/base-models/tiny-sd/",
        "TrainingInstanceType": "ml.m5.large",
        "UseSpotTraining": "false",
        "MaxRuntimeSeconds": "600",
        "MaxWaitSeconds": "1200",
        "TrainingSteps": "2",
        "CheckpointSteps": "100",
        # One scored image per checkpoint keeps the quality loop in every local run at a
        # quarter of its cost (tests/test_quality_loop.py covers the loop itself).
        "ValidationImages": "1",
        "Resolution": "64",
        "MixedPrecision": "no",
        "MinImages": "8",
        "SettleSeconds": "1",
        "CapacityRetrySeconds": "1",
        # The template's minimum: a grant whose delivery failed is handed over within a minute.
        "QueueRecheckSeconds": "60",
        # A small pack keeps local runs short (the template's 10 styles x 4 images are for the cloud).
        "PacksTableName": "avatarflow-local-PacksTable",
        "PackStyles": "2",
        "ImagesPerStyle": "1",
        "KeepPerStyle": "1",
    }
    subs = {}
    for key, source in definition_substitution_keys(template).items():
        if isinstance(source, dict) and "Fn::GetAtt" in source and source["Fn::GetAtt"][1] == "Arn" \
                and template["Resources"][source["Fn::GetAtt"][0]]["Type"] == "AWS::Serverless::Function":
            subs[key] = lambda_arn(function_folder(template, source["Fn::GetAtt"][0]))
        elif isinstance(source, dict) and str(source.get("Ref", "")).endswith(".Alias"):
            subs[key] = alias_arn(template, source["Ref"].removesuffix(".Alias"))
        elif key in values:
            subs[key] = values[key]
        else:
            raise KeyError(f"no local value for DefinitionSubstitutions key {key}")
    unknown = set(overrides) - set(subs)
    if unknown:
        raise KeyError(f"not DefinitionSubstitutions keys of the template: {sorted(unknown)}")
    subs.update({k: str(v) for k, v in overrides.items()})
    return subs


def render_definition(subs: dict[str, str], path: Path = DEFINITION) -> str:
    """The ASL with ${Key} replaced, as CloudFormation does; every key must be provided."""
    text = path.read_text(encoding="utf-8")
    missing = sorted(set(SUBSTITUTION.findall(text)) - set(subs))
    if missing:
        raise KeyError(f"ASL uses substitutions the caller did not provide: {missing}")
    rendered = SUBSTITUTION.sub(lambda m: subs[m.group(1)], text)
    json.loads(rendered)  # must still be JSON
    return rendered


# --------------------------------------------------------------------------- the whole stack
# The local runtime creates every resource the handlers touch from the template's own
# declarations (table keys and indexes, queue redrive, bucket notifications, topics,
# function environments and event sources), so a change to template.yaml shows up locally.

NO_VALUE = {"Ref": "AWS::NoValue"}  # a property or list item CloudFormation drops
_DROPPED = type("NoValue", (), {"__repr__": lambda self: "AWS::NoValue"})()  # what NO_VALUE resolves to
PSEUDO_PARAMETERS = {"AWS::AccountId": ACCOUNT, "AWS::Region": REGION, "AWS::Partition": "aws",
                     "AWS::URLSuffix": "amazonaws.com"}


class TemplateResolver:
    """Resolves the intrinsic functions the local runtime needs (Ref, Fn::GetAtt, Fn::Sub,
    Fn::If with the template's Conditions) against local physical ids:
    `physical[logical_id]` = {"Ref": ..., "Arn": ..., ...}."""

    def __init__(self, template: dict, stack_name: str, parameters: dict[str, str] | None = None):
        self.template = template
        self.stack_name = stack_name
        self.parameters = {name: str(spec.get("Default", "")) for name, spec in
                           template.get("Parameters", {}).items()}
        self.parameters.update(parameters or {})
        self.physical: dict[str, dict[str, str]] = {}

    def ref(self, name: str) -> str:
        if name == "AWS::NoValue":  # dropped from the list or mapping holding it (also via Fn::If)
            return _DROPPED
        if name == "AWS::StackName":
            return self.stack_name
        if name in PSEUDO_PARAMETERS:
            return PSEUDO_PARAMETERS[name]
        if name in self.parameters:
            return self.parameters[name]
        if name in self.physical and "Ref" in self.physical[name]:
            return self.physical[name]["Ref"]
        raise KeyError(f"no local value for Ref {name}")

    def get_att(self, logical_id: str, attribute: str) -> str:
        try:
            return self.physical[logical_id][attribute]
        except KeyError:
            raise KeyError(f"no local value for {logical_id}.{attribute}") from None

    def condition(self, name: str) -> bool:
        """A template condition, evaluated as CloudFormation does with these parameters."""
        return bool(self._condition(self.template["Conditions"][name]))

    def _condition(self, value):
        if isinstance(value, dict) and len(value) == 1:
            (fn, arg), = value.items()
            if fn == "Fn::Equals":
                return str(self._condition(arg[0])) == str(self._condition(arg[1]))
            if fn == "Fn::Not":
                return not self._condition(arg[0])
            if fn == "Fn::And":
                return all(self._condition(a) for a in arg)
            if fn == "Fn::Or":
                return any(self._condition(a) for a in arg)
            if fn in ("Condition", "Fn::Condition"):  # !Condition reads as Fn::Condition here
                return self.condition(arg)
        return self.resolve(value)

    def _sub(self, text: str, variables: dict) -> str:
        def one(match: re.Match) -> str:
            name = match.group(1)
            if name in variables:
                return str(self.resolve(variables[name]))
            if "." in name and not name.startswith("AWS::"):
                return self.get_att(*name.split(".", 1))
            return self.ref(name)

        return re.sub(r"\$\{([A-Za-z0-9_:.]+)\}", one, text)

    def resolve(self, value):
        if isinstance(value, dict) and len(value) == 1:
            (fn, arg), = value.items()
            if fn == "Ref":
                return self.ref(arg)
            if fn == "Fn::GetAtt":
                return self.get_att(*(arg if isinstance(arg, list) else arg.split(".", 1)))
            if fn == "Fn::Sub":
                text, variables = (arg, {}) if isinstance(arg, str) else (arg[0], arg[1])
                return self._sub(text, variables)
            if fn == "Fn::If":
                name, when_true, when_false = arg
                return self.resolve(when_true if self.condition(name) else when_false)
            if fn == "Fn::Select":
                return self.resolve(arg[1])[int(self.resolve(arg[0]))]
            if fn == "Fn::Split":
                return str(self.resolve(arg[1])).split(arg[0])
            if fn == "Fn::Join":
                return arg[0].join(str(v) for v in self.resolve(arg[1]))
            if fn == "Fn::FindInMap":
                name, first, second = (self.resolve(a) for a in arg)
                return self.template["Mappings"][name][str(first)][str(second)]
        if isinstance(value, dict):
            if any(k.startswith("Fn::") for k in value):
                raise KeyError(f"intrinsic not supported locally: {sorted(value)}")
            resolved = {k: self.resolve(v) for k, v in value.items()}
            return {k: v for k, v in resolved.items() if v is not _DROPPED}
        if isinstance(value, list):
            return [v for v in (self.resolve(v) for v in value) if v is not _DROPPED]
        return value


@dataclass
class EventSource:
    """A function's `Events` entry of type SQS or SNS, resolved (queue URL / topic ARN)."""

    function: str  # functions/<folder>
    kind: str  # "SQS" | "SNS" | "EventBridge"
    source_arn: str
    queue_url: str | None = None
    batch_size: int = 10
    batching_window_s: float = 0.0
    report_batch_item_failures: bool = False
    pattern: dict | None = None  # EventBridge: the rule's event pattern, resolved


@dataclass
class HttpRoute:
    method: str
    path: str  # /users/{user_id}/generations
    authorizer: str | None = None  # the JWT authorizer's name; None: no authorizer (SAM `Authorizer: NONE`)
    scopes: tuple[str, ...] = ()  # AuthorizationScopes: the token must hold at least one


@dataclass(frozen=True)
class JwtAuthorizer:
    """An HttpApi JWT authorizer as deployed: its JwtConfiguration resolved."""

    name: str
    issuer: str
    audience: tuple[str, ...]
    identity_source: str = "$request.header.Authorization"
    scopes: tuple[str, ...] = ()  # the authorizer's AuthorizationScopes: its routes' default


@dataclass
class HttpApiAuth:
    authorizers: dict[str, JwtAuthorizer]
    default: str | None  # DefaultAuthorizer


def http_api_auth(template: dict | None = None, parameters: dict[str, str] | None = None,
                  physical: dict | None = None) -> HttpApiAuth:
    """The template's HttpApi `Auth`, resolved with these parameters (and physical ids for
    the Cognito branch of `!If [CreateUserPool, ...]`)."""
    template = template or load_template()
    res = TemplateResolver(template, "auth", parameters)
    res.physical.update(physical or {})
    for spec in _resources_of(template, "AWS::Serverless::HttpApi").values():
        auth = spec["Properties"].get("Auth", {})
        authorizers = {}
        for name, conf in auth.get("Authorizers", {}).items():
            if "JwtConfiguration" not in conf:
                raise KeyError(f"only JWT authorizers run locally: {name}")
            jwt = res.resolve(conf["JwtConfiguration"])
            authorizers[name] = JwtAuthorizer(
                name, jwt["issuer"], tuple(jwt.get("audience", [])),
                conf.get("IdentitySource", "$request.header.Authorization"),
                tuple(res.resolve(conf.get("AuthorizationScopes", []))))
        return HttpApiAuth(authorizers, auth.get("DefaultAuthorizer"))
    return HttpApiAuth({}, None)


def http_route(props: dict, auth: HttpApiAuth) -> HttpRoute:
    """An HttpApi event's route with SAM's rules: the event's `Auth.Authorizer`, else the
    API's DefaultAuthorizer ("NONE": no authorizer); the event's AuthorizationScopes, else
    the authorizer's."""
    route = HttpRoute(props["Method"].upper(), props["Path"])
    event_auth = props.get("Auth", {})
    name = event_auth.get("Authorizer", auth.default)
    if name is None or name == "NONE":
        return route
    if name not in auth.authorizers:
        raise KeyError(f"route {route.method} {route.path}: no authorizer {name} on the HttpApi")
    route.authorizer = name
    route.scopes = tuple(event_auth.get("AuthorizationScopes") or auth.authorizers[name].scopes)
    return route


@dataclass
class Throttle:
    """An HTTP API stage's route throttling: steady requests/s and burst from
    DefaultRouteSettings, and `routes`: the RouteSettings overrides by route key
    ("POST /users/{user_id}/generations"). API Gateway keeps one token bucket per route."""

    rate: float
    burst: int
    routes: dict[str, Throttle] = field(default_factory=dict)

    def for_route(self, route_key: str) -> Throttle:
        """The limit a route gets: its own RouteSettings, else the stage's default."""
        return self.routes.get(route_key, self)


def http_api_throttle(template: dict | None = None,
                      parameters: dict[str, str] | None = None) -> Throttle | None:
    """The template's HttpApi throttling (parameters resolved: their defaults unless given):
    DefaultRouteSettings' rate and burst, with each RouteSettings entry that sets a limit as
    a route override; None when the API declares no default limit."""
    template = template or load_template()
    res = TemplateResolver(template, "throttle", parameters)
    for spec in _resources_of(template, "AWS::Serverless::HttpApi").values():
        default = res.resolve(spec["Properties"].get("DefaultRouteSettings", {}))
        if "ThrottlingRateLimit" not in default and "ThrottlingBurstLimit" not in default:
            continue
        throttle = Throttle(float(default["ThrottlingRateLimit"]), int(default["ThrottlingBurstLimit"]))
        for key, settings in res.resolve(spec["Properties"].get("RouteSettings", {})).items():
            if "ThrottlingRateLimit" in settings or "ThrottlingBurstLimit" in settings:
                # Both or neither: what AWS applies for the one left out is not modelled here.
                throttle.routes[key] = Throttle(float(settings["ThrottlingRateLimit"]),
                                                int(settings["ThrottlingBurstLimit"]))
        return throttle
    return None


@dataclass
class LocalStackResources:
    stack_name: str
    bucket: str
    models_table: str
    generations_table: str
    topic_arn: str
    inference_success_topic: str
    inference_error_topic: str
    upload_queue_url: str
    state_machine_arn: str
    endpoint_name: str
    substitutions: dict
    event_sources: list[EventSource]
    http_routes: list[HttpRoute]
    cors: dict
    physical: dict
    throttle: Throttle | None = None
    authorizers: dict[str, JwtAuthorizer] = field(default_factory=dict)
    # How Lambda runs each function (environment, Timeout, MemorySize, role) and the IAM
    # roles every local AWS call is checked against (iam.enforcing(resources.enforcer)).
    function_specs: dict[str, FunctionSpec] = field(default_factory=dict)
    enforcer: iam.Enforcer | None = None
    inference_role_arn: str | None = None
    # The inference container's environment (InferenceModel's PrimaryContainer Environment).
    inference_environment: dict[str, str] = field(default_factory=dict)


def _resources_of(template: dict, kind: str) -> dict[str, dict]:
    return {lid: res for lid, res in template["Resources"].items() if res["Type"] == kind and
            "Condition" not in res}


def create_table(ddb, name: str, props: dict) -> None:
    """A DynamoDB table as the template's Properties describe it (keys, indexes, TTL)."""
    args = {"TableName": name, "BillingMode": props.get("BillingMode", "PAY_PER_REQUEST"),
            "KeySchema": props["KeySchema"], "AttributeDefinitions": props["AttributeDefinitions"]}
    if props.get("GlobalSecondaryIndexes"):
        args["GlobalSecondaryIndexes"] = props["GlobalSecondaryIndexes"]
    ddb.create_table(**args)
    ttl = props.get("TimeToLiveSpecification")
    if ttl and ttl.get("Enabled"):
        ddb.update_time_to_live(TableName=name, TimeToLiveSpecification={
            "AttributeName": ttl["AttributeName"], "Enabled": True})


def create_local_stack(stack_name: str = "avatarflow-local", parameters: dict[str, str] | None = None,
                       **substitution_overrides: str) -> LocalStackResources:
    """Every resource of template.yaml that the handlers, the state machine and the local
    stand-ins use, created against the AWS endpoint boto3 is pointed at (moto)."""
    template = load_template()
    atomic_items.install()  # conditional writes as atomic as DynamoDB's (moto's are not)
    res = TemplateResolver(template, stack_name, {**LOCAL_PARAMETERS, **(parameters or {})})
    phys = res.physical
    arn = f"{REGION}:{ACCOUNT}"
    moto_strict.install()  # DynamoDB requests atomic, as on AWS (the queue's semaphore relies on it)

    ddb = boto3.client("dynamodb", region_name=REGION)
    for lid, spec in _resources_of(template, "AWS::DynamoDB::Table").items():
        name = f"{stack_name}-{lid}"
        create_table(ddb, name, spec["Properties"])
        phys[lid] = {"Ref": name, "Arn": f"arn:aws:dynamodb:{arn}:table/{name}"}

    sns = boto3.client("sns", region_name=REGION)
    for lid in _resources_of(template, "AWS::SNS::Topic"):
        topic = sns.create_topic(Name=f"{stack_name}-{lid}")["TopicArn"]
        phys[lid] = {"Ref": topic, "TopicArn": topic, "TopicName": topic.rsplit(":", 1)[1]}

    sqs = boto3.client("sqs", region_name=REGION)
    queues = _resources_of(template, "AWS::SQS::Queue")
    # Dead-letter queues first: the others name them in their RedrivePolicy.
    for lid, spec in sorted(queues.items(), key=lambda kv: "RedrivePolicy" in kv[1].get("Properties", {})):
        props = spec.get("Properties", {})
        attrs = {k: str(props[k]) for k in ("VisibilityTimeout", "MessageRetentionPeriod") if k in props}
        if "RedrivePolicy" in props:
            attrs["RedrivePolicy"] = json.dumps(res.resolve(props["RedrivePolicy"]))
        url = sqs.create_queue(QueueName=f"{stack_name}-{lid}", Attributes=attrs)["QueueUrl"]
        qarn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        phys[lid] = {"Ref": url, "Arn": qarn, "QueueName": f"{stack_name}-{lid}"}

    # The data bucket is the one with a fixed name; the others (the web app's bucket) are
    # named by CloudFormation, here after the stack and their logical id.
    buckets = _resources_of(template, "AWS::S3::Bucket")
    (bucket_lid, bucket_spec), = ((k, v) for k, v in buckets.items() if "BucketName" in v["Properties"])
    bprops = bucket_spec["Properties"]
    bucket = res.resolve(bprops["BucketName"])
    phys[bucket_lid] = {"Ref": bucket, "Arn": f"arn:aws:s3:::{bucket}"}
    for lid in set(buckets) - {bucket_lid}:
        name = f"{stack_name}-{lid.lower()}"
        phys[lid] = {"Ref": name, "Arn": f"arn:aws:s3:::{name}", "RegionalDomainName":
                     f"{name}.s3.{REGION}.amazonaws.com"}

    for lid, spec in template["Resources"].items():
        kind = spec["Type"]
        if kind == "AWS::Serverless::Function":
            folder = function_folder(template, lid)
            phys[lid] = {"Ref": folder, "Arn": lambda_arn(folder)}
        elif kind == "AWS::IAM::Role":
            phys[lid] = {"Arn": f"arn:aws:iam::{ACCOUNT}:role/{stack_name}-{lid}"}
        elif kind == "AWS::SageMaker::Endpoint":
            name = f"{stack_name}-{lid}"
            phys[lid] = {"Ref": f"arn:aws:sagemaker:{arn}:endpoint/{name.lower()}", "EndpointName": name}
        elif kind == "AWS::Cognito::UserPool":  # no pool locally: its issuer URL names no JWKS (all 401)
            phys[lid] = {"Ref": f"{REGION}_local",
                         "Arn": f"arn:aws:cognito-idp:{REGION}:{ACCOUNT}:userpool/{REGION}_local"}
        elif kind == "AWS::Cognito::UserPoolClient":
            phys[lid] = {"Ref": "local"}

    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket=bucket)
    for lid in set(buckets) - {bucket_lid}:
        s3.create_bucket(Bucket=phys[lid]["Ref"])
    if bprops.get("VersioningConfiguration", {}).get("Status") == "Enabled":
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    queue_configs = []
    for conf in bprops.get("NotificationConfiguration", {}).get("QueueConfigurations", []):
        rules = conf.get("Filter", {}).get("S3Key", {}).get("Rules", [])
        entry = {"QueueArn": res.resolve(conf["Queue"]), "Events": [conf["Event"]]}
        if rules:
            filter_rules = [{"Name": r["Name"], "Value": r["Value"]} for r in rules]
            entry["Filter"] = {"Key": {"FilterRules": filter_rules}}
        queue_configs.append(entry)
    if queue_configs:
        s3.put_bucket_notification_configuration(
            Bucket=bucket, NotificationConfiguration={"QueueConfigurations": queue_configs})

    machine = template["Resources"][STATE_MACHINE]["Properties"]
    machine_name = res.resolve(machine["Name"])
    subs = local_substitutions(bucket, phys["ModelsTable"]["Ref"], phys["NotificationTopic"]["Ref"],
                               **{"TrainingRoleArn": phys["TrainingRole"]["Arn"],
                                  "PacksTableName": phys["PacksTable"]["Ref"], **substitution_overrides})
    machine_arn = boto3.client("stepfunctions", region_name=REGION).create_state_machine(
        name=machine_name, definition=render_definition(subs),
        roleArn=f"arn:aws:iam::{ACCOUNT}:role/{stack_name}-{STATE_MACHINE}",
    )["stateMachineArn"]
    phys[STATE_MACHINE] = {"Ref": machine_arn, "Name": machine_name}

    function_env, sources, routes, cors = {}, [], [], {}
    api_auth = http_api_auth(template, parameters, phys)
    for lid, spec in _resources_of(template, "AWS::Serverless::Function").items():
        folder = function_folder(template, lid)
        variables = function_variables(template, lid)
        function_env[folder] = {k: str(res.resolve(v)) for k, v in variables.items()}
        for event in spec["Properties"].get("Events", {}).values():
            props = event.get("Properties", {})
            if event["Type"] == "SQS":
                queue_arn = res.resolve(props["Queue"])
                url = next(p["Ref"] for p in phys.values() if p.get("Arn") == queue_arn)
                sources.append(EventSource(
                    folder, "SQS", queue_arn, url, int(props.get("BatchSize", 10)),
                    float(props.get("MaximumBatchingWindowInSeconds", 0)),
                    "ReportBatchItemFailures" in props.get("FunctionResponseTypes", [])))
            elif event["Type"] == "SNS":
                sources.append(EventSource(folder, "SNS", res.resolve(props["Topic"])))
            elif event["Type"] == "HttpApi":
                routes.append(http_route(props, api_auth))
            elif event["Type"] in ("EventBridgeRule", "CloudWatchEvent"):
                # The rule's bus is the account's default bus (no EventBusName locally).
                sources.append(EventSource(folder, "EventBridge", "default",
                                           pattern=res.resolve(props["Pattern"])))
    for spec in _resources_of(template, "AWS::Lambda::EventSourceMapping").values():
        props = res.resolve(spec["Properties"])
        url = next((p["Ref"] for p in phys.values() if p.get("Arn") == props["EventSourceArn"]), None)
        if url is None or not url.startswith("http"):
            raise KeyError(f"only SQS event source mappings run locally: {props['EventSourceArn']}")
        sources.append(EventSource(
            function_name_of(props["FunctionName"]), "SQS", props["EventSourceArn"], url,
            int(props.get("BatchSize", 10)), float(props.get("MaximumBatchingWindowInSeconds", 0)),
            "ReportBatchItemFailures" in props.get("FunctionResponseTypes", [])))
    for spec in _resources_of(template, "AWS::Serverless::HttpApi").values():
        cors = res.resolve(spec["Properties"].get("CorsConfiguration", {}))

    roles, enforcer = _stack_roles(template, res, subs)
    specs = function_specs(template, function_env, roles)
    return LocalStackResources(
        function_specs=specs, enforcer=enforcer, inference_role_arn=res.resolve(
            template["Resources"]["InferenceModel"]["Properties"]["ExecutionRoleArn"]),
        inference_environment={k: str(v) for k, v in res.resolve(
            template["Resources"]["InferenceModel"]["Properties"]["PrimaryContainer"].get("Environment", {})
        ).items()},
        stack_name=stack_name, bucket=bucket, models_table=phys["ModelsTable"]["Ref"],
        generations_table=phys["GenerationsTable"]["Ref"], topic_arn=phys["NotificationTopic"]["Ref"],
        inference_success_topic=phys["InferenceSuccessTopic"]["Ref"],
        inference_error_topic=phys["InferenceErrorTopic"]["Ref"],
        upload_queue_url=phys["UploadQueue"]["Ref"], state_machine_arn=machine_arn,
        endpoint_name=phys["InferenceEndpoint"]["EndpointName"], substitutions=subs,
        event_sources=sources, http_routes=routes, cors=cors, physical=phys,
        throttle=http_api_throttle(template, parameters), authorizers=api_auth.authorizers,
    )


# --------------------------------------------------------------------------- Lambda and IAM as deployed

SAM_CODE_PLACEHOLDERS = {
    # What `sam validate` does before translating: local code paths become S3 locations.
    "AWS::Serverless::Function": "CodeUri",
    "AWS::Serverless::LayerVersion": "ContentUri",
    "AWS::Serverless::StateMachine": "DefinitionUri",
}


@cache
def sam_translated(path: Path = TEMPLATE) -> dict:
    """template.yaml as `sam deploy` sends it to CloudFormation: SAM's own transform
    (generated roles, policy templates expanded, the managed policies SAM attaches)."""
    from samtranslator.translator.transform import transform
    from samtranslator.yaml_helper import yaml_parse

    class NoManagedPolicyLookup:
        def load(self):
            return {}

    template = yaml_parse(path.read_text(encoding="utf-8"))
    for name, resource in template["Resources"].items():
        props, field_name = resource.get("Properties", {}), SAM_CODE_PLACEHOLDERS.get(resource["Type"])
        if resource["Type"] == "AWS::Serverless::Function" and props.get("PackageType") == "Image":
            props.setdefault("ImageUri", f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/avatarflow:local")
        elif field_name and isinstance(props.get(field_name), str):
            props[field_name] = f"s3://local-artifacts/{name}"
    return transform(template, {}, NoManagedPolicyLookup())


def _stack_roles(template: dict, res: TemplateResolver, subs: dict) -> tuple[dict[str, str], iam.Enforcer]:
    """({function logical id: role ARN}, the enforcer holding every role of the stack)."""
    translated = sam_translated()
    parameters = {**res.parameters, "BaseModelS3Uri": subs["BaseModelS3Uri"],
                  "TrainingImageUri": subs["TrainingImageUri"]}
    if not parameters.get("InferenceImageUri"):
        parameters["InferenceImageUri"] = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/avatarflow-infer:local"
    deployed = TemplateResolver(translated, res.stack_name, parameters)
    deployed.physical.update(res.physical)
    for lid, resource in translated["Resources"].items():
        if resource["Type"] == "AWS::IAM::Role" and lid not in deployed.physical:
            deployed.physical[lid] = {"Arn": f"arn:aws:iam::{ACCOUNT}:role/{res.stack_name}-{lid}"}
        elif resource["Type"] == "AWS::Lambda::Alias":  # SAM's <Function>Alias<name>: Ref is its ARN
            function = resource["Properties"]["FunctionName"]["Ref"]
            deployed.physical[lid] = {"Ref": alias_arn(template, function)}
    statements = iam.role_statements(translated, deployed.resolve)
    by_arn = {deployed.physical[lid]["Arn"]: s for lid, s in statements.items()}
    function_roles = {
        lid: deployed.resolve(resource["Properties"]["Role"])
        for lid, resource in translated["Resources"].items() if resource["Type"] == "AWS::Lambda::Function"
    }
    machine_role = deployed.resolve(translated["Resources"][STATE_MACHINE]["Properties"]["RoleArn"])
    enforcer = iam.Enforcer(by_arn, machine_role, REGION, ACCOUNT,
                            stand_ins={training_job.FUNCTION_NAME: training_job.iam_requests})
    return {lid: arn for lid, arn in function_roles.items() if lid in template["Resources"]}, enforcer


def function_specs(template: dict, function_env: dict[str, dict[str, str]],
                   roles: dict[str, str]) -> dict[str, FunctionSpec]:
    """{functions/<folder>: FunctionSpec}: environment, Timeout (Lambda's 3 s when neither
    the function nor Globals set one), MemorySize (128 MB likewise) and role, as deployed."""
    shared = template.get("Globals", {}).get("Function", {})
    specs = {}
    for lid, resource in _resources_of(template, "AWS::Serverless::Function").items():
        props = resource["Properties"]
        folder = function_folder(template, lid)
        specs[folder] = FunctionSpec(
            name=folder,
            environment=dict(function_env[folder]),
            timeout_s=float(props.get("Timeout", shared.get("Timeout", DEFAULT_TIMEOUT_S))),
            memory_mb=int(props.get("MemorySize", shared.get("MemorySize", DEFAULT_MEMORY_MB))),
            role_arn=roles[lid],
            aliases=(props["AutoPublishAlias"],) if props.get("AutoPublishAlias") else (),
        )
    return specs
