"""Least privilege, enforced on template.yaml.

Every IAM policy in the template (AWS::IAM::Role/Policy/ManagedPolicy, the Policies of SAM
functions and state machines, SAM policy templates, resource policies) is walked and held
to these rules:

- no wildcard in an allowed action (`*`, `s3:*`, `s3:Get*`); Deny statements may be broad;
- `Resource: "*"` only for the actions AWS grants on `*` alone (RESOURCE_STAR_ONLY, each
  with its reason), and cloudwatch:PutMetricData only with a namespace condition;
- iam:PassRole only on a role of this stack, with an iam:PassedToService condition;
- S3 only on the stack's buckets, object actions under a prefix of the bucket's layout
  (keys.py for the data bucket, avatarflow.webapp.APP_PREFIX for the web app's), the bucket
  itself only for listing with an s3:prefix condition, or for the one configuration action
  each of BUCKET_CONFIG_ACTIONS names (with its reason); the operator's base model
  bucket read-only;
- other resources are this stack's resources (tables, topics, functions, endpoint...) or
  ARNs in this account and region whose name has a fixed stem (`training-job/avatar-*`,
  not `repository/*`);
- no NotAction/NotResource/NotPrincipal; resource policies allow only service principals.

A resource written as Fn::If is checked in both branches. WAF web ACLs are skipped by the
"every Statement visited" sweep: their rules' `Statement` is a WAF match, not a policy.

The walk is fail-closed: a policy shape it does not recognize (a Policies entry of unknown
form, an intrinsic it cannot read, a Statement anywhere it did not visit) is a violation.

The second half runs the SAM translator (workflow_stack.sam_translated, the same transform the
local IAM checks run on) and applies the same rules to the roles SAM generates, including the
AWS managed policies SAM attaches on its own (MANAGED_POLICY_ALLOWLIST)."""

import contextlib
import copy
import json
import re
from importlib import resources

import pytest

from avatarflow import keys, webapp
from avatarflow_local.workflow_stack import TEMPLATE, load_template, sam_translated

# Actions that AWS only grants on Resource "*" (no resource-level permissions), and why we need them.
RESOURCE_STAR_ONLY = {
    "xray:PutTraceSegments": "X-Ray tracing of the state machine/functions; no resource-level permissions",
    "xray:PutTelemetryRecords": "X-Ray tracing; no resource-level permissions",
    "xray:GetSamplingRules": "X-Ray SDK sampling; no resource-level permissions",
    "xray:GetSamplingTargets": "X-Ray SDK sampling; no resource-level permissions",
    "ecr:GetAuthorizationToken": "SageMaker pulls the image; the token is registry-wide, Resource must be *",
    "states:SendTaskSuccess": "task-token callbacks (pack rounds, training-queue grants): no resource-level "
    "permissions, the token is the authorization",
    "cloudwatch:PutMetricData": "SageMaker job/endpoint metrics; Resource must be *, so a namespace "
    "condition scopes it (enforced below)",
    # Step Functions (and API Gateway) vended log delivery: AWS documents Resource "*" for these.
    "logs:CreateLogDelivery": "Step Functions logging to CloudWatch Logs (vended log delivery)",
    "logs:GetLogDelivery": "Step Functions logging (vended log delivery)",
    "logs:UpdateLogDelivery": "Step Functions logging (vended log delivery)",
    "logs:DeleteLogDelivery": "Step Functions logging (vended log delivery)",
    "logs:ListLogDeliveries": "Step Functions logging (vended log delivery)",
    "logs:PutResourcePolicy": "Step Functions logging: the log group's resource policy for delivery",
    "logs:DescribeResourcePolicies": "Step Functions logging (vended log delivery)",
    "logs:DescribeLogGroups": "Step Functions logging: lists log groups to find the destination",
    # Content moderation (docs/security.md): these image/text analysis calls name no resource.
    "rekognition:DetectModerationLabels": "moderation of uploads (preprocess_image) and generated images "
    "(InferenceRole); image bytes in the request, no resource-level permissions",
    "rekognition:DetectFaces": "AGE_RANGE of uploaded faces (preprocess_image); no resource-level "
    "permissions",
    "comprehend:DetectToxicContent": "prompt toxicity (ApiFunction); no resource-level permissions",
}
NEEDS_CONDITION = {"cloudwatch:PutMetricData": "cloudwatch:namespace"}

# AWS managed policies SAM attaches by itself (not written in the template), and why each is kept.
MANAGED_POLICY_ALLOWLIST = {
    "service-role/AWSLambdaBasicExecutionRole": "SAM attaches it to every function role: logs:CreateLogGroup/"
    "CreateLogStream/PutLogEvents only (write-only to CloudWatch Logs)",
    "AWSXrayWriteOnlyAccess": "SAM attaches it with Tracing: Active; X-Ray write actions have no "
    "resource-level permissions",
    "service-role/AWSCodeDeployRoleForLambda": "SAM attaches it to CodeDeployServiceRole for a "
    "DeploymentPreference: CodeDeploy shifts the alias and reads the rollback alarms (its InvokeFunction "
    "is limited to CodeDeployHook_* functions; this stack has none); a role only CodeDeploy assumes",
}

# Where each S3 prefix of the layout comes from (avatarflow.keys is the one place they are spelled).
LAYOUT_PREFIXES = (
    keys.UPLOADS, keys.DATASETS, keys.TRAINING, keys.MODELS, keys.REQUESTS, keys.GENERATIONS,
    keys.ASYNC_OUTPUT, keys.ASYNC_FAILURES, keys.PACKS,
    keys.STYLES_OBJECT,  # one object: the operator's pack styles (avatarflow.styles)
)
# Each bucket's layout: where objects may be granted and which s3:prefix a listing may name.
BUCKET_LAYOUTS = {"DataBucket": LAYOUT_PREFIXES, "WebBucket": (webapp.APP_PREFIX,)}
BUCKET_LIST_ACTIONS = {"s3:ListBucket", "s3:ListBucketVersions"}
# Bucket configuration a function may change, and why.
BUCKET_CONFIG_ACTIONS = {
    "s3:PutBucketCORS": "functions/publish_web sets the data bucket's CORS rules to the web app's origin "
    "at deploy time (CloudFormation cannot: the distribution depends on the API, the API on the bucket)",
}
BASE_MODEL_READ_ACTIONS = {"s3:GetObject", "s3:ListBucket"}
BASE_MODEL_BUCKET = "${select(2,split(/,${BaseModelS3Uri}))}"

# What a `${Resource}` or `${Resource.Arn}` of this template may be the target of, per action service.
SERVICE_RESOURCE_TYPES = {
    "dynamodb": {"AWS::DynamoDB::Table"},
    "sns": {"AWS::SNS::Topic"},
    "sqs": {"AWS::SQS::Queue"},
    "lambda": {"AWS::Serverless::Function", "AWS::Lambda::Function", "AWS::Lambda::Alias"},
    "states": {"AWS::Serverless::StateMachine", "AWS::StepFunctions::StateMachine"},
    "sagemaker": {"AWS::SageMaker::Endpoint", "AWS::SageMaker::Model"},
    "logs": {"AWS::Logs::LogGroup"},
    "iam": {"AWS::IAM::Role"},
    "kms": {"AWS::KMS::Key"},
    "cognito-idp": {"AWS::Cognito::UserPool"},
}
STATEMENT_KEYS = {"Sid", "Effect", "Action", "Resource", "Condition"}
ARN = re.compile(r"^arn:(?:PARTITION|aws):([a-z0-9-]+):([^:]*):([^:]*):(.+)$")
PSEUDO = {"${AWS::Partition}": "PARTITION", "${AWS::Region}": "REGION", "${AWS::AccountId}": "ACCOUNT",
          "${AWS::StackName}": "STACK"}
ACTION = re.compile(r"^[a-z0-9-]+:[A-Za-z0-9]+$")


class Unrecognized(Exception):
    """A policy shape the walk does not understand (fail closed)."""


def as_list(value):
    return value if isinstance(value, list) else [value]


def branches(value) -> list:
    """Both values of an Fn::If (recursively); any other value as itself."""
    if isinstance(value, dict) and list(value) == ["Fn::If"]:
        arg = value["Fn::If"]
        if not (isinstance(arg, list) and len(arg) == 3):
            raise Unrecognized(f"cannot read {json.dumps(value)[:200]}")
        return branches(arg[1]) + branches(arg[2])
    return [value]


def render(value) -> str:
    """A policy string with intrinsics written as ${...}: !GetAtt X.Arn -> ${X.Arn}, !Ref X -> ${X}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and len(value) == 1:
        (fn, arg), = value.items()
        if fn == "Ref" and isinstance(arg, str):
            return f"${{{arg}}}"
        if fn == "Fn::GetAtt":
            parts = arg.split(".", 1) if isinstance(arg, str) else arg
            if isinstance(parts, list) and len(parts) == 2 and all(isinstance(p, str) for p in parts):
                return f"${{{parts[0]}.{parts[1]}}}"
        if fn == "Fn::Sub":
            if isinstance(arg, str):
                return arg
            if isinstance(arg, list) and len(arg) == 2 and isinstance(arg[1], dict):
                text = arg[0]
                for name, sub in arg[1].items():
                    text = text.replace(f"${{{name}}}", render(sub))
                return text
        if fn == "Fn::Select" and isinstance(arg, list) and len(arg) == 2:
            inner = arg[1]
            if isinstance(inner, dict) and list(inner) == ["Fn::Split"]:
                delimiter, source = inner["Fn::Split"]
                return f"${{select({arg[0]},split({delimiter},{render(source)}))}}"
        if fn == "Fn::Join" and isinstance(arg, list) and len(arg) == 2 and isinstance(arg[1], list):
            return arg[0].join(render(part) for part in arg[1])
    raise Unrecognized(f"cannot read {json.dumps(value)[:200]} as a policy string")


class Checker:
    def __init__(self, template: dict):
        self.template = template
        self.resources = template.get("Resources", {})
        self.violations: list[str] = []
        self.visited: set[int] = set()
        self.bucket_arns = self._stack_bucket_arns()

    # ------------------------------------------------------------------ the stack bucket

    def _stack_bucket_arns(self) -> dict[str, tuple[str, ...]]:
        """Every way a policy may spell a stack bucket's ARN -> that bucket's layout prefixes
        (a bucket BUCKET_LAYOUTS does not name has none: no object may be granted)."""
        forms = {}
        for name, res in self.resources.items():
            if res.get("Type") != "AWS::S3::Bucket":
                continue
            layout = BUCKET_LAYOUTS.get(name, ())
            spellings = {f"${{{name}.Arn}}", f"arn:${{AWS::Partition}}:s3:::${{{name}}}"}
            bucket_name = (res.get("Properties") or {}).get("BucketName")
            if bucket_name is not None:
                with contextlib.suppress(Unrecognized):
                    spellings.add(f"arn:${{AWS::Partition}}:s3:::{render(bucket_name)}")
            forms.update(dict.fromkeys(spellings, layout))
        return forms

    def fail(self, where: str, message: str) -> None:
        self.violations.append(f"{where}: {message}")

    # ------------------------------------------------------------------ the walk

    def check(self) -> list[str]:
        for name, res in self.resources.items():
            try:
                self.check_resource(name, res)
            except Unrecognized as err:
                self.fail(name, f"unrecognized policy shape: {err}")
        policies = {k: v for k, v in self.resources.items()
                    if not str(v.get("Type", "")).startswith("AWS::WAFv2::")}
        for path, node in find_statements(policies, "Resources"):
            if id(node) not in self.visited:
                self.fail(path, "a policy document the IAM test does not know how to check (fail closed)")
        return self.violations

    def check_resource(self, name: str, res: dict) -> None:
        kind = res.get("Type", "")
        props = res.get("Properties") or {}
        if kind == "AWS::IAM::Role":
            self.check_trust(name, props.get("AssumeRolePolicyDocument"))
            for i, policy in enumerate(props.get("Policies", [])):
                if not isinstance(policy, dict) or set(policy) != {"PolicyName", "PolicyDocument"}:
                    raise Unrecognized(f"Policies[{i}] of a role is not {{PolicyName, PolicyDocument}}")
                self.check_document(f"{name}.Policies[{policy['PolicyName']}]", policy["PolicyDocument"])
            for arn in props.get("ManagedPolicyArns", []):
                self.check_managed(name, render(arn))
            if "PermissionsBoundary" in props:
                render(props["PermissionsBoundary"])
        elif kind in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            self.check_document(f"{name}.PolicyDocument", props.get("PolicyDocument"))
        elif kind in ("AWS::Serverless::Function", "AWS::Serverless::StateMachine"):
            if "Role" in props:
                role = render(props["Role"])
                target = re.fullmatch(r"\$\{(\w+)\.Arn\}", role)
                if not target or self.resources.get(target.group(1), {}).get("Type") != "AWS::IAM::Role":
                    self.fail(name, f"Role {role} is not a role of this template (cannot be checked)")
            for i, entry in enumerate(as_list(props.get("Policies", []))):
                self.check_sam_policy(f"{name}.Policies[{i}]", entry)
        elif kind in ("AWS::S3::BucketPolicy", "AWS::SQS::QueuePolicy", "AWS::SNS::TopicPolicy"):
            self.check_resource_policy(name, props.get("PolicyDocument"))

    def check_sam_policy(self, where: str, entry) -> None:
        if isinstance(entry, str) or (isinstance(entry, dict) and set(entry) <= {"Ref", "Fn::Sub"}):
            self.check_managed(where, render(entry))
        elif isinstance(entry, dict) and "Statement" in entry:
            self.check_document(where, entry)
        elif isinstance(entry, dict) and len(entry) == 1:
            (template_name, params), = entry.items()
            expanded = expand_sam_policy_template(template_name, params)
            self.check_document(f"{where}<{template_name}>", expanded)
        else:
            raise Unrecognized(f"{where}: not a managed policy, a policy document or a SAM policy template")

    def check_managed(self, where: str, arn: str) -> None:
        name = arn.split(":policy/", 1)[-1] if ":iam::aws:policy/" in arn else None
        if name not in MANAGED_POLICY_ALLOWLIST:
            self.fail(where, f"managed policy {arn} is not in MANAGED_POLICY_ALLOWLIST (its content is not "
                             "in the template; write the statements inline instead)")

    def check_trust(self, where: str, document) -> None:
        trust = self.statements(f"{where}.AssumeRolePolicyDocument", document, principal=True)
        for i, st in enumerate(trust):
            at = f"{where}.AssumeRolePolicyDocument.Statement[{i}]"
            principal = st.get("Principal")
            services = as_list(principal.get("Service", [])) if isinstance(principal, dict) else []
            if st.get("Effect") != "Allow" or not services or set(principal) != {"Service"}:
                self.fail(at, f"a role may only be assumed by AWS services, got {principal!r}")
            if as_list(st.get("Action")) != ["sts:AssumeRole"]:
                self.fail(at, f"trust action {st.get('Action')!r} is not sts:AssumeRole")

    def check_resource_policy(self, where: str, document) -> None:
        for i, st in enumerate(self.statements(f"{where}.PolicyDocument", document, principal=True)):
            at = f"{where}.Statement[{st.get('Sid', i)}]"
            if st.get("Effect") == "Deny":
                continue
            principal = st.get("Principal")
            if not isinstance(principal, dict) or set(principal) != {"Service"}:
                self.fail(at, f"a resource policy may only allow AWS service principals, got {principal!r}")
            elif not any(k in json.dumps(st.get("Condition", {})) for k in ("SourceArn", "SourceAccount")):
                self.fail(at, "a service principal without an aws:SourceArn/aws:SourceAccount condition")
            self.check_actions(at, st)

    def statements(self, where: str, document, *, principal: bool = False) -> list[dict]:
        if not isinstance(document, dict) or "Statement" not in document:
            raise Unrecognized(f"{where} is not a policy document")
        if set(document) - {"Version", "Statement", "Id"}:
            raise Unrecognized(f"{where} has keys {sorted(set(document) - {'Version', 'Statement', 'Id'})}")
        self.visited.add(id(document))
        statements = as_list(document["Statement"])
        allowed = STATEMENT_KEYS | ({"Principal"} if principal else set())
        for i, st in enumerate(statements):
            if not isinstance(st, dict):
                raise Unrecognized(f"{where}.Statement[{i}] is not a mapping")
            extra = set(st) - allowed
            if extra:
                self.fail(f"{where}.Statement[{i}]", f"unsupported statement keys {sorted(extra)} "
                                                     "(NotAction/NotResource/NotPrincipal widen silently)")
            if st.get("Effect") not in ("Allow", "Deny"):
                self.fail(f"{where}.Statement[{i}]", f"Effect {st.get('Effect')!r}")
        return statements

    # ------------------------------------------------------------------ identity policies

    def check_document(self, where: str, document) -> None:
        for i, st in enumerate(self.statements(where, document)):
            at = f"{where}.Statement[{st.get('Sid', i)}]"
            if st.get("Effect") != "Allow":
                continue
            actions = self.check_actions(at, st)
            if "Resource" not in st:
                self.fail(at, "no Resource")
                continue
            for resource in as_list(st["Resource"]):
                for branch in branches(resource):
                    self.check_resource_arn(at, st, actions, render(branch))
            if "iam:PassRole" in actions:
                passed = (st.get("Condition") or {}).get("StringEquals", {}).get("iam:PassedToService")
                if not passed:
                    self.fail(at, "iam:PassRole without a StringEquals iam:PassedToService condition")

    def check_actions(self, at: str, st: dict) -> list[str]:
        actions = [render(a) for a in as_list(st.get("Action", []))]
        if not actions:
            self.fail(at, "no Action")
        for action in actions:
            if not ACTION.fullmatch(action):
                self.fail(at, f"action {action!r} is a wildcard or malformed (name each action)")
        return actions

    def check_resource_arn(self, at: str, st: dict, actions: list[str], resource: str) -> None:
        services = {a.split(":", 1)[0] for a in actions}
        if resource == "*":
            for action in actions:
                if action not in RESOURCE_STAR_ONLY:
                    self.fail(at, f"{action} on Resource '*' (only {sorted(RESOURCE_STAR_ONLY)} may be)")
                key = NEEDS_CONDITION.get(action)
                if key and key not in json.dumps(st.get("Condition", {})):
                    self.fail(at, f"{action} on '*' needs a {key} condition")
            return
        if "s3" in services or resource.startswith(("arn:${AWS::Partition}:s3:::", "arn:aws:s3:::")) or any(
            resource.startswith(form) for form in self.bucket_arns
        ):
            self.check_s3(at, st, actions, resource)
            return
        own = re.fullmatch(r"\$\{(\w+)(?:\.Arn|(\.Alias))?\}(/index/[A-Za-z0-9_.-]+)?", resource)
        if own:
            target = own.group(1)
            kind = self.resources.get(target, {}).get("Type")
            if own.group(2):  # SAM's `!Ref Function.Alias`: the function's AutoPublishAlias
                if not self.resources.get(target, {}).get("Properties", {}).get("AutoPublishAlias"):
                    self.fail(at, f"{resource}: {target} has no AutoPublishAlias")
                    return
                kind = "AWS::Lambda::Alias"
            if kind is None:
                self.fail(at, f"{resource}: {target} is not a resource of this template")
                return
            for service in services:
                if kind not in SERVICE_RESOURCE_TYPES.get(service, set()):
                    self.fail(at, f"{service} actions on {resource} ({kind})")
            if "iam" in services and set(actions) != {"iam:PassRole"}:
                self.fail(at, f"iam actions other than PassRole: {actions}")
            return
        plain = resource
        for pseudo, token in PSEUDO.items():
            plain = plain.replace(pseudo, token)
        match = ARN.fullmatch(plain)
        if not match:
            self.fail(at, f"resource {resource!r} is neither '*', a resource of this stack nor an ARN")
            return
        service, region, account, name = match.groups()
        if service == "iam":
            self.fail(at, f"IAM resource {resource}: only roles of this template may be passed")
            return
        if region not in ("REGION", "") or account != "ACCOUNT":
            self.fail(at, f"{resource}: region and account must be the stack's own")
        if services != {service}:
            self.fail(at, f"actions {sorted(services)} on a {service} ARN")
        stem = re.split(r"[:/]", name, maxsplit=1)[-1] if re.search(r"[:/]", name) else name
        if not stem or stem.startswith("*"):
            self.fail(at, f"{resource}: names every {service} resource of the account; give it a fixed "
                          "name or prefix from this stack")

    def check_s3(self, at: str, st: dict, actions: list[str], resource: str) -> None:
        if {a.split(":", 1)[0] for a in actions} != {"s3"}:
            self.fail(at, f"non-S3 actions {actions} on S3 resource {resource}")
        for form, layout in self.bucket_arns.items():
            if resource == form:
                if set(actions) <= set(BUCKET_CONFIG_ACTIONS):
                    return
                if not set(actions) <= BUCKET_LIST_ACTIONS:
                    self.fail(at, f"bucket-level actions {actions}: only {sorted(BUCKET_LIST_ACTIONS)} "
                                  f"or one of {sorted(BUCKET_CONFIG_ACTIONS)} alone")
                prefixes = [
                    p
                    for op in ("StringLike", "StringEquals")
                    for p in as_list((st.get("Condition") or {}).get(op, {}).get("s3:prefix", []))
                ]
                if not prefixes:
                    self.fail(at, "listing the stack bucket without an s3:prefix condition")
                for prefix in prefixes:
                    if not layout or not prefix.startswith(layout):
                        self.fail(at, f"s3:prefix {prefix!r} is outside the layout {layout}")
                return
            if resource.startswith(form + "/"):
                key = resource[len(form) + 1 :]
                if not layout or not key.startswith(layout):
                    self.fail(at, f"{resource}: objects outside the layout prefixes {layout}")
                if set(actions) & BUCKET_LIST_ACTIONS:
                    self.fail(at, f"list actions on object ARN {resource}")
                return
        base = f"arn:${{AWS::Partition}}:s3:::{BASE_MODEL_BUCKET}"
        if resource in (base, base + "/*"):
            if not set(actions) <= BASE_MODEL_READ_ACTIONS:
                self.fail(at, f"base model bucket is read-only ({sorted(BASE_MODEL_READ_ACTIONS)}): "
                              f"{actions}")
            return
        self.fail(at, f"S3 resource {resource} is not the stack bucket or the base model bucket")


def find_statements(node, path: str):
    """Every mapping with a Statement key (a policy document), wherever it sits."""
    if isinstance(node, dict):
        if "Statement" in node:
            yield path, node
        for key, value in node.items():
            yield from find_statements(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from find_statements(value, f"{path}[{i}]")


def expand_sam_policy_template(name: str, params) -> dict:
    """A SAM policy template (e.g. S3ReadPolicy: {BucketName: ...}) as its policy document,
    from the SAM translator's own definitions (aws-sam-translator, in the dev lock)."""
    data = resources.files("samtranslator") / "policy_templates_data" / "policy_templates.json"
    templates = json.loads(data.read_text())["Templates"]
    if name not in templates:
        raise Unrecognized(f"{name} is not a SAM policy template")
    definition = templates[name]["Definition"]
    values = params or {}

    def substitute(node):
        if isinstance(node, dict):
            if list(node) == ["Ref"] and node["Ref"] in templates[name].get("Parameters", {}):
                return copy.deepcopy(values[node["Ref"]])
            return {k: substitute(v) for k, v in node.items()}
        if isinstance(node, list):
            return [substitute(v) for v in node]
        return node

    return substitute(definition)


def violations_of(template: dict) -> list[str]:
    return Checker(template).check()


def report(violations: list[str]) -> str:
    return f"{len(violations)} IAM violations:\n" + "\n".join(f"  - {v}" for v in violations)


# --------------------------------------------------------------------------- the template


def test_template_policies_are_least_privilege():
    violations = violations_of(load_template())
    assert not violations, report(violations)


def test_roles_generated_by_sam_are_least_privilege():
    """The same rules on the roles SAM writes for functions and the state machine, with the
    managed policies SAM attaches by itself (event sources, tracing)."""
    translated = copy.deepcopy(sam_translated(TEMPLATE))  # what the local IAM checks run on too
    roles = [n for n, r in translated["Resources"].items() if r["Type"] == "AWS::IAM::Role"]
    assert len(roles) >= 3, f"expected SAM-generated roles, found {roles}"
    violations = violations_of(translated)
    assert not violations, report(violations)


# --------------------------------------------------------------------------- the gate can fail

BASE = {
    "Resources": {
        "DataBucket": {"Type": "AWS::S3::Bucket", "Properties": {}},
        "Table": {"Type": "AWS::DynamoDB::Table", "Properties": {}},
        "Role": {"Type": "AWS::IAM::Role", "Properties": {"AssumeRolePolicyDocument": {"Statement": [
            {"Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"},
             "Action": "sts:AssumeRole"}
        ]}}},
    }
}


def with_statement(statement, *, kind="AWS::Serverless::Function") -> dict:
    template = copy.deepcopy(BASE)
    template["Resources"]["Fn"] = {
        "Type": kind,
        "Properties": {"Policies": [{"Version": "2012-10-17", "Statement": [statement]}]},
    }
    return template


def allow(action, resource, **extra) -> dict:
    return {"Effect": "Allow", "Action": action, "Resource": resource, **extra}


OBJECTS = {"Fn::Sub": "${DataBucket.Arn}/uploads/*"}
BAD = {
    "star action": allow("*", OBJECTS),
    "service star action": allow("s3:*", OBJECTS),
    "prefix star action": allow("s3:Get*", OBJECTS),
    "resource star": allow("s3:GetObject", "*"),
    "dynamodb on star": allow("dynamodb:GetItem", "*"),
    "metrics without namespace": allow("cloudwatch:PutMetricData", "*"),
    "passrole without condition": allow("iam:PassRole", {"Fn::GetAtt": ["Role", "Arn"]}),
    "passrole on star": allow("iam:PassRole", "*", Condition={"StringEquals": {"iam:PassedToService": "x"}}),
    "whole bucket": allow("s3:GetObject", {"Fn::Sub": "${DataBucket.Arn}/*"}),
    "other bucket": allow("s3:GetObject", "arn:aws:s3:::someone-else/*"),
    "unconditioned listing": allow("s3:ListBucket", {"Fn::GetAtt": ["DataBucket", "Arn"]}),
    "write on the bucket": allow("s3:PutBucketPolicy", {"Fn::GetAtt": ["DataBucket", "Arn"]}),
    "every repository": allow("ecr:BatchGetImage", {"Fn::Sub": "arn:${AWS::Partition}:ecr:${AWS::Region}:"
                                                                "${AWS::AccountId}:repository/*"}),
    "any account": allow("states:StartExecution", "arn:aws:states:*:*:stateMachine:x"),
    "table action on a bucket": allow("dynamodb:GetItem", {"Fn::GetAtt": ["DataBucket", "Arn"]}),
    "not action": {"Effect": "Allow", "NotAction": "s3:DeleteObject", "Resource": OBJECTS},
    "unknown resource ref": allow("dynamodb:GetItem", {"Fn::GetAtt": ["Nope", "Arn"]}),
    "unreadable intrinsic": allow("dynamodb:GetItem", {"Fn::If": ["C", "a", "b"]}),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_statement_is_caught(case):
    assert violations_of(with_statement(BAD[case])), f"the IAM gate let {case!r} through"


GOOD = {
    "prefix objects": allow(["s3:GetObject", "s3:PutObject"], OBJECTS),
    "conditioned listing": allow("s3:ListBucket", {"Fn::GetAtt": ["DataBucket", "Arn"]},
                                 Condition={"StringLike": {"s3:prefix": ["datasets/*"]}}),
    "own table": allow("dynamodb:GetItem", {"Fn::GetAtt": ["Table", "Arn"]}),
    "passrole with condition": allow("iam:PassRole", {"Fn::GetAtt": ["Role", "Arn"]},
                                     Condition={"StringEquals": {"iam:PassedToService": "sagemaker.com"}}),
    "xray": allow(["xray:PutTraceSegments", "xray:PutTelemetryRecords"], "*"),
    "job prefix": allow("sagemaker:DescribeTrainingJob", {"Fn::Sub": "arn:${AWS::Partition}:sagemaker:"
                        "${AWS::Region}:${AWS::AccountId}:training-job/avatar-*"}),
}


@pytest.mark.parametrize("case", sorted(GOOD))
def test_a_scoped_statement_passes(case):
    assert violations_of(with_statement(GOOD[case])) == []


@pytest.mark.parametrize(
    "policies",
    [
        ["arn:aws:iam::aws:policy/AdministratorAccess"],  # managed policy not in the allowlist
        [{"SomethingUnknown": {"X": 1}}],  # neither document nor SAM policy template
        [{"Statement": [allow("s3:GetObject", OBJECTS)], "Extra": 1}],  # unknown document keys
    ],
)
def test_unrecognized_or_unlisted_policies_fail_closed(policies):
    template = copy.deepcopy(BASE)
    template["Resources"]["Fn"] = {"Type": "AWS::Serverless::Function", "Properties": {"Policies": policies}}
    assert violations_of(template)


def test_a_policy_document_in_an_unknown_place_fails_closed():
    template = copy.deepcopy(BASE)
    template["Resources"]["Odd"] = {
        "Type": "AWS::Some::Thing",
        "Properties": {"Doc": {"Version": "2012-10-17", "Statement": [allow("s3:GetObject", OBJECTS)]}},
    }
    assert any("does not know how to check" in v for v in violations_of(template))


def test_resource_policy_may_not_allow_everyone():
    template = copy.deepcopy(BASE)
    template["Resources"]["BucketPolicy"] = {
        "Type": "AWS::S3::BucketPolicy",
        "Properties": {"PolicyDocument": {"Statement": [
            {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": OBJECTS}]}},
    }
    assert violations_of(template)
