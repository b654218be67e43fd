"""Deploy-time contracts that neither moto nor the local runtime enforce, checked on the files
themselves: what SageMaker expects of the images, what CloudFormation and SAM do with
template.yaml and samconfig.toml on a first deploy, an update and a redeploy after `sam delete`.

Each test encodes one documented AWS behaviour (cited in its docstring) and fails on a template,
config, Dockerfile or README that would fail in AWS. The CloudFormation model here is small on
purpose: the intrinsic functions the template uses, and which properties force a replacement
(`createOnlyProperties` in the CloudFormation resource schemas; cross-checked against the copies
cfn-lint ships when .venv-tools exists).
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from avatarflow_local.workflow_stack import ACCOUNT, REGION, load_template
from avatarflow_local.workflow_stack import REPO_ROOT as REPO

DOCKERFILES = [REPO / "containers/training/Dockerfile", REPO / "containers/inference/Dockerfile"]
REQUIRED_PARAMS = {"TrainingImageUri": "x", "InferenceImageUri": "x", "BaseModelS3Uri": "x"}


@pytest.fixture(scope="module")
def template() -> dict:
    return load_template()


@pytest.fixture(scope="module")
def samconfig() -> dict:
    return tomllib.loads((REPO / "samconfig.toml").read_text())


# --------------------------------------------------------------------------- CloudFormation model
class Cfn:
    """Evaluates the intrinsic functions template.yaml uses (Ref, Fn::GetAtt, Fn::Sub, Fn::Join,
    Fn::Select, Fn::Split) for one set of parameters. A resource's Ref/attribute is its physical
    id: an explicit name property when the template sets one, else a name CloudFormation would
    generate, which changes only when the resource is replaced (`generation`)."""

    NAME_PROPERTY = {
        ("AWS::SageMaker::Endpoint", "EndpointName"): "EndpointName",
        ("AWS::SageMaker::EndpointConfig", "EndpointConfigName"): "EndpointConfigName",
        ("AWS::SageMaker::Model", "ModelName"): "ModelName",
    }

    def __init__(self, template: dict, params: dict[str, str], stack: str = "avatarflow-prod"):
        self.template = template
        self.params = {k: str(v.get("Default", "")) for k, v in template["Parameters"].items()}
        self.params.update(params)
        self.pseudo = {
            "AWS::StackName": stack,
            "AWS::AccountId": ACCOUNT,
            "AWS::Region": REGION,
            "AWS::Partition": "aws",
            "AWS::URLSuffix": "amazonaws.com",
        }
        self.generation: dict[str, int] = {}

    def ref(self, name: str) -> str:
        if name in self.pseudo:
            return self.pseudo[name]
        if name in self.params:
            return self.params[name]
        return self.get_att(name, "Ref")

    def get_att(self, lid: str, attr: str) -> str:
        resource = self.template["Resources"][lid]
        prop = self.NAME_PROPERTY.get((resource["Type"], attr))
        if prop and prop in resource.get("Properties", {}):
            return self.eval(resource["Properties"][prop])
        return f"{lid}-{attr}-g{self.generation.get(lid, 1)}"

    def eval(self, node):
        if isinstance(node, list):
            return [self.eval(x) for x in node]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            ((fn, arg),) = node.items()
            if fn == "Ref":
                return self.ref(arg)
            if fn == "Fn::GetAtt":
                lid, attr = arg if isinstance(arg, list) else arg.split(".", 1)
                return self.get_att(lid, attr)
            if fn == "Fn::Sub":
                text, variables = (arg, {}) if isinstance(arg, str) else (arg[0], self.eval(arg[1]))
                return re.sub(r"\$\{([^}]+)\}", lambda m: self._sub(m.group(1), variables), text)
            if fn == "Fn::Join":
                return arg[0].join(str(x) for x in self.eval(arg[1]))
            if fn == "Fn::Select":
                return self.eval(arg[1])[int(self.eval(arg[0]))]
            if fn == "Fn::Split":
                return self.eval(arg[1]).split(arg[0])
        return {k: self.eval(v) for k, v in node.items()}

    def _sub(self, name: str, variables: dict) -> str:
        if name in variables:
            return variables[name]
        if "." in name and name not in self.pseudo:
            return self.get_att(*name.split(".", 1))
        return self.ref(name)


# createOnlyProperties of the CloudFormation resource schemas: a change to any of them
# replaces the resource (a new one is created, then the old one deleted at cleanup).
CREATE_ONLY = {
    "AWS::SageMaker::Model": {
        "ExecutionRoleArn",
        "EnableNetworkIsolation",
        "InferenceExecutionConfig",
        "PrimaryContainer",
        "ModelName",
        "VpcConfig",
        "Containers",
    },
    "AWS::SageMaker::EndpointConfig": {
        "KmsKeyId",
        "AsyncInferenceConfig",
        "ExecutionRoleArn",
        "ShadowProductionVariants",
        "EnableNetworkIsolation",
        "ProductionVariants",
        "DataCaptureConfig",
        "ExplainerConfig",
        "MetricsConfig",
        "EndpointConfigName",
        "VpcConfig",
    },
    "AWS::SageMaker::Endpoint": {"EndpointName"},
    "AWS::ApplicationAutoScaling::ScalableTarget": {"ResourceId", "ScalableDimension", "ServiceNamespace"},
    "AWS::ApplicationAutoScaling::ScalingPolicy": {
        "PolicyName",
        "ServiceNamespace",
        "ResourceId",
        "ScalableDimension",
        "ScalingTargetId",
    },
    "AWS::CloudWatch::Alarm": {"AlarmName"},
}


def _refs(node) -> set[str]:
    """Logical ids a property tree references."""
    found: set[str] = set()
    if isinstance(node, list):
        for x in node:
            found |= _refs(x)
    elif isinstance(node, dict):
        for fn, arg in node.items():
            if fn == "Ref" and isinstance(arg, str):
                found.add(arg)
            elif fn == "Fn::GetAtt":
                found.add(arg[0] if isinstance(arg, list) else arg.split(".", 1)[0])
            elif fn == "Fn::Sub":
                text = arg if isinstance(arg, str) else arg[0]
                found |= {m.split(".", 1)[0] for m in re.findall(r"\$\{([^}]+)\}", text)}
                found |= _refs(arg if isinstance(arg, str) else arg[1:])
            else:
                found |= _refs(arg)
    return found


def plan_update(template: dict, before: dict[str, str], after: dict[str, str]) -> dict:
    """What CloudFormation does to the endpoint's resources when the parameters change from
    `before` to `after`: {logical id: (action, old properties, new properties)}, action one of
    replace / update / none, resources taken in dependency order so a replacement propagates."""
    resources = {lid: r for lid, r in template["Resources"].items() if r["Type"] in CREATE_ONLY}
    old, new = Cfn(template, before), Cfn(template, after)
    done: dict[str, tuple] = {}
    while len(done) < len(resources):
        ready = [
            lid
            for lid, r in resources.items()
            if lid not in done and not ((_refs(r.get("Properties", {})) & resources.keys()) - done.keys())
        ]
        assert ready, "dependency cycle among the endpoint's resources"
        for lid in ready:
            props = resources[lid].get("Properties", {})
            a, b = old.eval(props), new.eval(props)
            if any(a.get(p) != b.get(p) for p in CREATE_ONLY[resources[lid]["Type"]]):
                new.generation[lid] = 2
                done[lid] = ("replace", a, new.eval(props))
            else:
                done[lid] = ("update" if a != b else "none", a, b)
    return done


def sagemaker_update_failures(template: dict, plan: dict) -> list[str]:
    """SageMaker's rule for UpdateEndpoint ("Update endpoints that use auto scaling", SageMaker
    developer guide): if the update would change the instance type of, or remove, a production
    variant that is an Application Auto Scaling target, the update fails. CloudFormation updates
    an endpoint in place when only its EndpointConfigName changes, and does so before it touches
    the scalable target that depends on the endpoint, so that target is still registered."""
    resources = template["Resources"]
    targets = {
        before["ResourceId"]
        for lid, (_action, before, _after) in plan.items()
        if resources[lid]["Type"] == "AWS::ApplicationAutoScaling::ScalableTarget"
    }
    failures = []
    for lid, (action, before, _after) in plan.items():
        if resources[lid]["Type"] != "AWS::SageMaker::Endpoint" or action != "update":
            continue
        (config,) = [c for c in _refs(resources[lid]["Properties"]) if c in plan]
        _act, old_config, new_config = plan[config]
        name = before.get("EndpointName") or Cfn(template, {}).get_att(lid, "EndpointName")
        new_types = {v["VariantName"]: v["InstanceType"] for v in new_config["ProductionVariants"]}
        for variant in old_config["ProductionVariants"]:
            scaled = f"endpoint/{name}/variant/{variant['VariantName']}" in targets
            if scaled and new_types.get(variant["VariantName"]) != variant["InstanceType"]:
                failures.append(
                    f"UpdateEndpoint {name}: variant {variant['VariantName']} is an auto scaling target and "
                    f"its instance type would change {variant['InstanceType']} -> "
                    f"{new_types.get(variant['VariantName'])}"
                )
    return failures


def test_cfn_model_create_only_properties_match_cloudformation_schemas():
    """The replacement table above is CloudFormation's own (cfn-lint ships the schemas)."""
    found = sorted(REPO.glob(".venv-tools/lib/python3*/site-packages/cfnlint/data/schemas"))
    if not found:
        pytest.skip("cfn-lint not installed: run `make tools`")
    schemas = found[0]
    index = json.loads((schemas / "providers/us-east-1.json").read_text())
    for kind, props in CREATE_ONLY.items():
        schema = json.loads((schemas / "resources" / f"{index[kind]}.json").read_text())
        assert {p.removeprefix("/properties/") for p in schema["createOnlyProperties"]} == props, kind


# --------------------------------------------------------------------------- 4c: instance type updates
def test_changing_the_inference_instance_type_replaces_the_endpoint_and_its_scaling(template):
    """A new InferenceInstanceType replaces the EndpointConfig (ProductionVariants is create-only).
    Updated in place, the endpoint would fail: its variant is an auto scaling target, and
    SageMaker refuses an UpdateEndpoint that changes such a variant's instance type. The
    endpoint's name carries the instance type, so CloudFormation creates a new endpoint, a new
    scalable target and new policies for it, and deletes the old ones at cleanup."""
    before = {**REQUIRED_PARAMS, "InferenceInstanceType": "ml.g5.xlarge"}
    plan = plan_update(template, before, {**before, "InferenceInstanceType": "ml.g6e.2xlarge"})
    assert sagemaker_update_failures(template, plan) == []
    actions = {lid: action for lid, (action, _b, _a) in plan.items()}
    by_type = {template["Resources"][lid]["Type"]: lid for lid in plan}
    endpoint = by_type["AWS::SageMaker::Endpoint"]
    assert actions[endpoint] == "replace"
    for lid, (action, old, new) in plan.items():
        if template["Resources"][lid]["Type"].startswith("AWS::ApplicationAutoScaling::"):
            assert action == "replace", f"{lid} would stay attached to the old endpoint"
        watches_endpoint = any(d["Name"] == "EndpointName" for d in old.get("Dimensions", []))
        if template["Resources"][lid]["Type"] == "AWS::CloudWatch::Alarm" and watches_endpoint:
            assert old["Dimensions"] != new["Dimensions"], f"{lid} would keep watching the old endpoint"
    # The model did not change: a new image is an in-place update, which SageMaker allows on a
    # scaled variant (blue/green, same endpoint name, no new scaling resources).
    plan = plan_update(template, before, {**before, "InferenceImageUri": "y"})
    assert sagemaker_update_failures(template, plan) == []
    assert plan[endpoint][0] == "update"
    assert all(
        a == "none"
        for lid, (a, _b, _n) in plan.items()
        if "ApplicationAutoScaling" in template["Resources"][lid]["Type"]
    )


def test_the_update_model_flags_an_in_place_instance_type_change(template):
    """The check above can fail: without an instance-type-specific endpoint name (the template
    before this fix), the same change is an in-place UpdateEndpoint that SageMaker refuses."""
    unnamed = copy.deepcopy(template)
    endpoint = next(lid for lid, r in unnamed["Resources"].items() if r["Type"] == "AWS::SageMaker::Endpoint")
    unnamed["Resources"][endpoint]["Properties"].pop("EndpointName", None)
    before = {**REQUIRED_PARAMS, "InferenceInstanceType": "ml.g5.xlarge"}
    plan = plan_update(unnamed, before, {**before, "InferenceInstanceType": "ml.g6e.2xlarge"})
    (failure,) = sagemaker_update_failures(unnamed, plan)
    assert "ml.g5.xlarge -> ml.g6e.2xlarge" in failure


def test_endpoint_name_is_valid_for_every_instance_type_and_stack_name(template):
    """SageMaker endpoint names: [a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}. The stack name is at most what
    the bucket name (<stack>-<account>-<region>, 63 characters) leaves."""
    param = template["Parameters"]["InferenceInstanceType"]
    longest_stack = "a" * (63 - len(f"-{ACCOUNT}-ap-southeast-2"))
    for instance_type in (
        "ml.g5.xlarge",
        "ml.g6e.48xlarge",
        "ml.p4de.24xlarge",
        "ml.inf2.48xlarge",
        "ml.trn1n.32xlarge",
        "ml.p5.48xlarge",
    ):
        assert re.fullmatch(param["AllowedPattern"], instance_type), instance_type
        for stack in ("avatarflow-prod", longest_stack):
            cfn = Cfn(template, {**REQUIRED_PARAMS, "InferenceInstanceType": instance_type}, stack=stack)
            endpoint = next(
                lid for lid, r in template["Resources"].items() if r["Type"] == "AWS::SageMaker::Endpoint"
            )
            name = cfn.get_att(endpoint, "EndpointName")
            assert re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}", name), name
    for bad in ("g5.xlarge", "ml.g5", "ml.g5.xlarge ", "ML.G5.XLARGE"):
        assert not re.fullmatch(param["AllowedPattern"], bad), bad
    assert param.get("ConstraintDescription")


# --------------------------------------------------------------------------- 2: images run as root
def _instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per Dockerfile instruction, continuation lines joined."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, args = current.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
            current = ""
    return out


def test_sagemaker_images_run_as_root():
    """SageMaker "expects all containers to run with root users" (developer guide, "Custom
    Inference Code with Hosting Services": users without root-level access can cause permission
    problems); it also mounts /opt/ml root-owned for training. Any USER other than root fails."""
    for path in DOCKERFILES:
        instructions = _instructions(path)
        assert instructions and instructions[0][0] == "FROM", path
        users = [args for keyword, args in instructions if keyword == "USER"]
        non_root = [u for u in users if u.split(":")[0] not in ("root", "0")]
        assert not non_root, (
            f"{path.relative_to(REPO)} sets USER {non_root}: SageMaker runs containers as root"
        )


def test_user_check_sees_a_user_instruction(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM python:3.11-slim\nRUN useradd -u 10001 app \\\n    && true\nUSER 10001\n")
    assert ("USER", "10001") in _instructions(dockerfile)


# --------------------------------------------------------------------------- 3: BaseModelS3Uri
def test_base_model_uri_must_be_a_prefix_ending_in_slash(template):
    """A SageMaker S3Prefix data source "always ends with a forward slash" (S3ModelDataSource);
    s3://bucket/sd15 would also match s3://bucket/sd15-old/. CloudFormation matches
    AllowedPattern against the whole value, as re.fullmatch does."""
    param = template["Parameters"]["BaseModelS3Uri"]
    pattern = param["AllowedPattern"]
    for good in ("s3://my-models/sd15/", "s3://my.models-1/stable-diffusion/v1-5/", "s3://abc/x/"):
        assert re.fullmatch(pattern, good), good
    for bad in (
        "s3://my-models/sd15",
        "s3://my-models/",
        "s3://my-models",
        "s3://my-models//",
        "s3://my-models/sd15//",
        "https://my-models.s3.amazonaws.com/sd15/",
        "my-models/sd15/",
        "s3://My_Models/sd15/",
        "s3://ab/sd15/",
        " s3://my-models/sd15/",
        "s3://my-models/sd 15/",
    ):
        assert not re.fullmatch(pattern, bad), bad
    assert "/" in param.get("ConstraintDescription", "")


def _iam_resources_using(node, parameter: str):
    """Every IAM statement Resource value (one ARN expression) that reads `parameter`."""
    if isinstance(node, dict):
        if "Effect" in node and "Resource" in node:
            values = node["Resource"] if isinstance(node["Resource"], list) else [node["Resource"]]
            yield from (v for v in values if parameter in json.dumps(v))
        for value in node.values():
            yield from _iam_resources_using(value, parameter)
    elif isinstance(node, list):
        for value in node:
            yield from _iam_resources_using(value, parameter)


def test_iam_resources_built_from_base_model_uri_are_valid_arns(template):
    """The roles that read the base model get ARNs cut out of BaseModelS3Uri; with the trailing
    slash they must still name the bucket (ListBucket) and cover the model's objects (GetObject)."""
    arns = [
        Cfn(template, {**REQUIRED_PARAMS, "BaseModelS3Uri": "s3://my-models/sd15/"}).eval(v)
        for v in _iam_resources_using(template["Resources"], "BaseModelS3Uri")
    ]
    assert len(arns) >= 4, arns  # training and inference roles: the bucket and its objects each
    for arn in arns:
        assert re.fullmatch(r"arn:aws:s3:::my-models(/[^/]\S*)?", arn) and "//" not in arn[6:], arn
    assert "arn:aws:s3:::my-models" in arns
    assert any(fnmatch.fnmatchcase("arn:aws:s3:::my-models/sd15/unet/model.safetensors", a) for a in arns)


# --------------------------------------------------------------------------- 4a: function timeouts
def _task_timeouts(template: dict) -> dict[str, list[int | None]]:
    """Function logical id -> TimeoutSeconds of each state machine task that invokes it."""
    asl = json.loads((REPO / "statemachines/train_avatar.asl.json").read_text())
    machine = next(r for r in template["Resources"].values() if r["Type"] == "AWS::Serverless::StateMachine")
    subs = machine["Properties"]["DefinitionSubstitutions"]
    by_placeholder = {
        f"${{{k}}}": v["Fn::GetAtt"][0] for k, v in subs.items() if isinstance(v, dict) and "Fn::GetAtt" in v
    }
    by_placeholder.update({  # `!Ref <Function>.Alias`: the function's published alias
        f"${{{k}}}": v["Ref"].removesuffix(".Alias") for k, v in subs.items()
        if isinstance(v, dict) and str(v.get("Ref", "")).endswith(".Alias")
    })
    out: dict[str, list[int | None]] = {}
    scopes = [asl]
    while scopes:
        scope = scopes.pop()
        for state in scope["States"].values():
            if state["Type"] == "Map":
                scopes.append(state.get("ItemProcessor") or state["Iterator"])
            scopes.extend(state.get("Branches", []))
            function = (state.get("Parameters") or state.get("Arguments") or {}).get("FunctionName")
            if state["Type"] == "Task" and function in by_placeholder:
                out.setdefault(by_placeholder[function], []).append(state.get("TimeoutSeconds"))
    return out


def test_every_function_has_a_timeout_that_fits_what_it_does(template):
    """Lambda's default timeout is 3 s. Each function needs an explicit one (its own or Globals)
    with room for what it does: at least 10 s, and 30 s for container-image functions (an image
    cold start with OpenCV takes seconds; Lambda re-runs an init that overran its 10 s inside the
    invoke, against this timeout). Upper bounds that AWS enforces: 900 s; 30 s behind an HTTP
    API (its integration timeout); the SQS queue's visibility timeout must be >= the function
    timeout (CreateEventSourceMapping refuses it); and below a state machine task's
    TimeoutSeconds when it has one, so the function times out (and is retried) first."""
    resources = template["Resources"]
    shared = template.get("Globals", {}).get("Function", {})
    tasks = _task_timeouts(template)
    assert {"PreprocessImageFunction", "BuildDatasetFunction"} <= tasks.keys()
    problems = []
    for lid, r in resources.items():
        if r["Type"] != "AWS::Serverless::Function":
            continue
        props = r["Properties"]
        timeout = props.get("Timeout", shared.get("Timeout"))
        if timeout is None:
            problems.append(f"{lid}: no Timeout, so Lambda's 3 s default")
            continue
        floor = 30 if props.get("PackageType") == "Image" else 10
        if not floor <= timeout <= 900:
            problems.append(f"{lid}: Timeout {timeout} s outside [{floor}, 900]")
        if any(e.get("Type") == "HttpApi" for e in (props.get("Events") or {}).values()) and timeout > 30:
            problems.append(f"{lid}: Timeout {timeout} s behind an HTTP API (30 s integration timeout)")
        for mapping in resources.values():
            mp = mapping.get("Properties", {})
            if mapping["Type"] == "AWS::Lambda::EventSourceMapping" and mp.get("FunctionName") == {
                "Ref": lid
            }:
                queue = mp["EventSourceArn"]["Fn::GetAtt"][0]
                visibility = resources[queue]["Properties"].get("VisibilityTimeout", 30)
                if visibility < timeout:
                    problems.append(f"{lid}: {queue} VisibilityTimeout {visibility} < Timeout {timeout}")
        for task_timeout in tasks.get(lid, []):
            if task_timeout is not None and timeout >= task_timeout:
                problems.append(f"{lid}: Timeout {timeout} s >= its task's TimeoutSeconds {task_timeout}")
        if (
            props.get("PackageType") == "Image"
            and props.get("MemorySize", shared.get("MemorySize", 128)) < 1024
        ):
            problems.append(f"{lid}: an OpenCV image and a 12 MP decode need >= 1024 MB")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- 1: server threads
def test_endpoint_concurrency_leaves_a_thread_for_ping(template):
    """The async endpoint sends at most MaxConcurrentInvocationsPerInstance requests at once; if
    they all land on one gunicorn worker, a thread must remain free for GET /ping."""
    import inference_gunicorn_conf as conf  # containers/inference is on the test path (pyproject)

    (config,) = [
        r["Properties"]
        for r in template["Resources"].values()
        if r["Type"] == "AWS::SageMaker::EndpointConfig"
    ]
    concurrent = config["AsyncInferenceConfig"]["ClientConfig"]["MaxConcurrentInvocationsPerInstance"]
    assert conf.worker_class == "gthread"
    assert concurrent < conf.threads, (concurrent, conf.threads)


# --------------------------------------------------------------------------- 4b: samconfig + README
def parse_overrides(text: str) -> dict[str, str]:
    """samconfig's parameter_overrides (`Key="value" Key2=value`) as SAM reads them."""
    pairs = dict(item.split("=", 1) for item in shlex.split(text))
    return {key.strip(): value for key, value in pairs.items()}


def _violation(spec: dict, value: str) -> str | None:
    """Why CloudFormation would refuse `value` for a parameter, or None."""
    if spec.get("AllowedValues") and value not in [str(v) for v in spec["AllowedValues"]]:
        return f"not one of {spec['AllowedValues']}"
    if spec["Type"] == "Number":
        try:
            number = float(value)
        except ValueError:
            return "not a number"
        if "MinValue" in spec and number < float(spec["MinValue"]):
            return f"below {spec['MinValue']}"
        if "MaxValue" in spec and number > float(spec["MaxValue"]):
            return f"above {spec['MaxValue']}"
    if spec.get("AllowedPattern") and not re.fullmatch(spec["AllowedPattern"], value):
        return f"does not match {spec['AllowedPattern']}"
    return None


def test_samconfig_overrides_name_template_parameters_with_allowed_values(template, samconfig):
    params = template["Parameters"]
    problems = []
    for env, commands in samconfig.items():
        if not isinstance(commands, dict):
            continue
        text = commands.get("deploy", {}).get("parameters", {}).get("parameter_overrides", "")
        for key, value in parse_overrides(text).items():
            if key not in params:
                problems.append(f"[{env}] {key}: no such template parameter")
            elif why := _violation(params[key], value):
                problems.append(f"[{env}] {key}={value!r}: {why}")
    assert not problems, "\n".join(problems)
    assert parse_overrides('A="1" B=two C="x y"') == {"A": "1", "B": "two", "C": "x y"}


def deploy_section(readme: str) -> str:
    start = readme.index("## Deploy to AWS")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end > 0 else None]


def readme_sam_deploys(section: str) -> list[list[str]]:
    """Every `sam deploy` command line inside the section's code blocks, as argv."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:2] == ["sam", "deploy"]:
                commands.append(argv)
    return commands


def simulate_deploys(template: dict, samconfig: dict, commands: list[list[str]]) -> list[str]:
    """Follow the README's `sam deploy` commands in order, as SAM CLI and CloudFormation would
    (samcli/lib/deploy/deployer.py): a parameter without an override is sent as
    UsePreviousValue, which CloudFormation accepts only on an existing stack, so the first deploy
    of a stack needs every parameter that has no Default; `--guided` asks for all of them;
    `--parameter-overrides` on the command line replaces samconfig's, it is not merged."""
    required = {k for k, v in template["Parameters"].items() if "Default" not in v}
    created: set[str] = set()
    failures = []
    for argv in commands:
        env = argv[argv.index("--config-env") + 1] if "--config-env" in argv else "default"
        if env not in samconfig:
            failures.append(f"{shlex.join(argv)}: no [{env}] in samconfig.toml")
            continue
        config = samconfig[env]
        stack = config.get("global", {}).get("parameters", {}).get("stack_name") or config.get(
            "deploy", {}
        ).get("parameters", {}).get("stack_name")
        given = set(
            parse_overrides(config.get("deploy", {}).get("parameters", {}).get("parameter_overrides", ""))
        )
        if "--parameter-overrides" in argv:
            values = list(
                itertools.takewhile(
                    lambda a: not a.startswith("--"), argv[argv.index("--parameter-overrides") + 1 :]
                )
            )
            given = set(parse_overrides(shlex.join(values)))
        if "--guided" in argv:
            given = set(template["Parameters"])
        if stack not in created and (missing := sorted(required - given)):
            failures.append(f"{shlex.join(argv)}: first deploy of stack {stack} lacks {missing}")
        created.add(stack)
    return failures


def test_readme_deploy_steps_give_every_required_parameter_on_a_first_deploy(template, samconfig):
    """An operator who types the README's deploy commands in order never meets "Parameters:
    [...] must have values": each stack's first deploy supplies every parameter without a
    Default (the image URIs and BaseModelS3Uri, which only the operator knows)."""
    commands = readme_sam_deploys(deploy_section((REPO / "README.md").read_text()))
    envs = {argv[argv.index("--config-env") + 1] for argv in commands if "--config-env" in argv}
    assert "prod" in envs, commands
    assert simulate_deploys(template, samconfig, commands) == []


def test_deploy_simulation_catches_a_first_deploy_without_the_required_parameters(template, samconfig):
    """The simulation can fail: `sam deploy --config-env prod` as a stack's first deploy."""
    (failure,) = simulate_deploys(template, samconfig, [["sam", "deploy", "--config-env", "prod"]])
    assert "BaseModelS3Uri" in failure and "InferenceImageUri" in failure
    assert (
        simulate_deploys(
            template,
            samconfig,
            [
                ["sam", "deploy", "--guided", "--config-env", "prod"],
                ["sam", "deploy", "--config-env", "prod"],
            ],
        )
        == []
    )
    # Command-line overrides replace samconfig's: naming only the three still works on a first
    # deploy, and dropping one of them does not.
    argv = [
        "sam",
        "deploy",
        "--config-env",
        "prod",
        "--parameter-overrides",
        "TrainingImageUri=a",
        "InferenceImageUri=b",
    ]
    assert "BaseModelS3Uri" in simulate_deploys(template, samconfig, [argv])[0]


# --------------------------------------------------------------------------- 4d: redeploy after delete
def test_bucket_outlives_the_stack_but_not_a_failed_first_deploy(template):
    """DeletionPolicy RetainExceptOnCreate: `sam delete` keeps users' data; a first deploy that
    rolls back deletes the (empty) bucket, so the retry does not collide with its fixed name."""
    bucket = template["Resources"]["DataBucket"]
    assert bucket["Type"] == "AWS::S3::Bucket"
    assert bucket["DeletionPolicy"] == "RetainExceptOnCreate"
    assert bucket["UpdateReplacePolicy"] == "Retain"


@pytest.mark.e2e
def test_readme_empties_and_removes_the_retained_bucket_so_the_stack_can_be_recreated(template, samconfig):
    """After `sam delete` the bucket stays, named <stack>-<account>-<region>: creating the stack
    again fails on that name. The README's commands (real AWS CLI, against moto) must empty it,
    every version and delete marker included (versioning is on), and remove it, so that the
    name is free again."""
    import boto3
    from moto.server import ThreadedMotoServer

    section = deploy_section((REPO / "README.md").read_text())
    match = re.search(r"<!-- empty-retained-bucket -->\s*```bash\n(.*?)```", section, flags=re.S)
    assert match, "README: no <!-- empty-retained-bucket --> bash block in the Deploy section"
    stack = samconfig["prod"]["global"]["parameters"]["stack_name"]
    bucket_spec = template["Resources"]["DataBucket"]
    name = Cfn(template, REQUIRED_PARAMS, stack=stack).eval(bucket_spec["Properties"]["BucketName"])

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
        s3.create_bucket(Bucket=name)
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        for key in ("uploads/u/b/1.jpg", "models/u/v/adapter.json", "generations/u/g/000.png"):
            s3.put_object(Bucket=name, Key=key, Body=b"1")
        s3.put_object(Bucket=name, Key="models/u/v/adapter.json", Body=b"2")  # a second version
        s3.delete_object(Bucket=name, Key="uploads/u/b/1.jpg")  # a delete marker
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": REGION,
            "STACK": stack,
            "ACCOUNT": ACCOUNT,
            "REGION": REGION,
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        }
        script = "sam() { :; }\nset -euo pipefail\n" + match.group(1)  # `sam delete` needs a real stack
        proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert name not in [b["Name"] for b in s3.list_buckets()["Buckets"]]
        s3.create_bucket(Bucket=name)  # what the next deploy of the stack does
    finally:
        server.stop()
