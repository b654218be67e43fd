"""template.yaml and the ASL: sam validate --lint, cfn-lint, hadolint, and checks on the
state machine beyond what cfn-lint reads (targets exist, every state reachable, moto's
parser accepts it, every ${Substitution} provided, least-privilege IAM)."""

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from avatarflow_local.workflow_stack import (
    DEFINITION,
    STATE_MACHINE,
    SUBSTITUTION,
    definition_substitution_keys,
    load_template,
    local_substitutions,
    render_definition,
)

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / ".venv-tools" / "bin"


def tool(name):
    path = TOOLS / name
    if not path.exists():
        found = shutil.which(name)
        if not found:
            pytest.skip(f"{name} not installed: run `make tools` (creates .venv-tools)")
        return found
    return str(path)


def run_tool(*args):
    env = dict(os.environ, AWS_DEFAULT_REGION="us-east-1", SAM_CLI_TELEMETRY="0")
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.e2e
def test_sam_validate_lint_is_clean():
    proc = run_tool(tool("sam"), "validate", "--lint", "--template-file", "template.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.e2e
def test_cfn_lint_is_clean():
    proc = run_tool(tool("cfn-lint"), "template.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_faces_dockerfile_passes_hadolint():
    proc = run_tool(tool("hadolint"), "functions/faces.Dockerfile")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _states(definition):
    """Every (name, state) pair, descending into Map/Parallel, grouped by scope."""
    scopes = [definition]
    out = []
    while scopes:
        scope = scopes.pop()
        out.append(scope)
        for state in scope["States"].values():
            if state["Type"] == "Map":
                scopes.append(state.get("ItemProcessor") or state["Iterator"])
            for branch in state.get("Branches", []):
                scopes.append(branch)
    return out


def _targets(state):
    targets = [state.get("Next"), state.get("Default")]
    targets += [c["Next"] for c in state.get("Choices", [])]
    targets += [c["Next"] for c in state.get("Catch", [])]
    return [t for t in targets if t]


def test_every_target_exists_and_every_state_is_reachable():
    definition = json.loads(DEFINITION.read_text())
    for scope in _states(definition):
        names = set(scope["States"])
        assert scope["StartAt"] in names
        seen, todo = set(), [scope["StartAt"]]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            state = scope["States"][name]
            for target in _targets(state):
                assert target in names, f"{name} -> {target}: no such state"
                todo.append(target)
            terminal = state["Type"] in ("Succeed", "Fail", "Choice") or state.get("End")
            assert terminal or state.get("Next"), f"{name} neither ends nor continues"
        assert seen == names, f"unreachable states: {sorted(names - seen)}"


def test_retries_and_catches_are_well_formed():
    definition = json.loads(DEFINITION.read_text())
    for scope in _states(definition):
        for name, state in scope["States"].items():
            for rule in state.get("Retry", []) + state.get("Catch", []):
                if "States.ALL" in rule["ErrorEquals"]:
                    assert rule["ErrorEquals"] == ["States.ALL"], name
            catches = state.get("Catch", [])
            if any("States.ALL" in c["ErrorEquals"] for c in catches):
                assert "States.ALL" in catches[-1]["ErrorEquals"], f"{name}: States.ALL must be last"
    # Every task that can fail after training starts routes to the failure path; from the
    # queue on, through the slot's release first (which itself goes on to RecordFailure).
    for name in ("ListUploads", "PrepareImages", "BuildDataset", "RegisterModel", "ReleaseAfterFailure"):
        assert definition["States"][name]["Catch"][-1]["Next"] == "RecordFailure"
    assert definition["States"]["ReleaseAfterFailure"]["Next"] == "RecordFailure"
    for name in ("AcquireSlot", "MarkTraining", "Train"):
        assert definition["States"][name]["Catch"][-1]["Next"] == "ReleaseAfterFailure"


def test_every_substitution_is_provided_by_the_template_and_none_is_unused():
    used = set(SUBSTITUTION.findall(DEFINITION.read_text()))
    provided = set(definition_substitution_keys())
    assert used == provided
    template = load_template()
    props = template["Resources"][STATE_MACHINE]["Properties"]
    assert props["DefinitionUri"] == "statemachines/train_avatar.asl.json"
    assert props["DefinitionSubstitutions"]["TrainingJobResource"] == {
        "Fn::Sub": "arn:${AWS::Partition}:states:::sagemaker:createTrainingJob.sync"
    }
    assert props["Tracing"]["Enabled"] is True and props["Logging"]["Level"] != "OFF"


def test_moto_parser_accepts_the_rendered_definition():
    with mock_aws():
        subs = local_substitutions("bucket", "table", "arn:aws:sns:us-east-1:123456789012:topic")
        sfn = boto3.client("stepfunctions")
        arn = sfn.create_state_machine(
            name="check", definition=render_definition(subs), roleArn="arn:aws:iam::123456789012:role/r"
        )["stateMachineArn"]
        assert sfn.describe_state_machine(stateMachineArn=arn)["status"] == "ACTIVE"
    # The cloud values (every MaxTrainingMinutes, spot or not): tests/test_asl_rules.py.


def _statements(template):
    for name, res in template["Resources"].items():
        props = res.get("Properties", {})
        docs = [p["PolicyDocument"] for p in props.get("Policies", []) if "PolicyDocument" in p]
        docs += [p for p in props.get("Policies", []) if isinstance(p, dict) and "Statement" in p]
        if "PolicyDocument" in props:
            docs.append(props["PolicyDocument"])
        for doc in docs:
            for st in doc["Statement"]:
                yield name, st


def test_iam_has_no_wildcard_actions_and_sagemaker_is_scoped():
    template = load_template()
    for name, st in _statements(template):
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        for action in actions:
            if st["Effect"] == "Allow":
                assert "*" not in action, f"{name}: wildcard action {action}"
    sm = [st for n, st in _statements(template) if n == STATE_MACHINE]
    by_action = {
        a: st for st in sm for a in (st["Action"] if isinstance(st["Action"], list) else [st["Action"]])
    }
    for action in (
        "sagemaker:CreateTrainingJob",
        "sagemaker:DescribeTrainingJob",
        "sagemaker:StopTrainingJob",
    ):
        assert "training-job/avatar-" in by_action[action]["Resource"]["Fn::Sub"]
    assert by_action["iam:PassRole"]["Condition"] == {
        "StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}
    }
    assert by_action["events:PutRule"]["Resource"]["Fn::Sub"].endswith(
        "rule/StepFunctionsGetEventsForSageMakerTrainingJobsRule"
    )


def test_bucket_and_trigger_settings():
    res = load_template()["Resources"]
    bucket = res["DataBucket"]["Properties"]
    assert bucket["VersioningConfiguration"]["Status"] == "Enabled"
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    prefixes = {r.get("Prefix") for r in bucket["LifecycleConfiguration"]["Rules"]}
    assert {"uploads/", "requests/"} <= prefixes
    (deny,) = res["DataBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert deny["Effect"] == "Deny" and deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    # An explicit event source mapping (not SAM `Events: SQS`, which attaches a managed policy
    # with receive/delete on every queue; see tests/test_iam_policy.py).
    event = res["OnUploadEventSource"]["Properties"]
    assert event["FunctionName"] == {"Ref": "OnUploadFunction"}
    assert event["EventSourceArn"] == {"Fn::GetAtt": ["UploadQueue", "Arn"]}
    assert (
        event["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
        and event["MaximumBatchingWindowInSeconds"]
    )
    assert "deadLetterTargetArn" in res["UploadQueue"]["Properties"]["RedrivePolicy"]
    assert res["NotificationTopic"]["Properties"]["KmsMasterKeyId"]
    for name in ("PreprocessImageFunction", "BuildDatasetFunction"):
        assert res[name]["Properties"]["PackageType"] == "Image"
        assert res[name]["Metadata"]["Dockerfile"] == "functions/faces.Dockerfile"
    params = load_template()["Parameters"]
    for p in (
        "TrainingImageUri",
        "BaseModelS3Uri",
        "TrainingInstanceType",
        "UseSpotTraining",
        "MaxTrainingMinutes",
        "MinImages",
        "SettleSeconds",
        "NotificationEmail",
    ):
        assert p in params
    assert (
        params["TrainingInstanceType"]["Default"] == "ml.g5.2xlarge" and params["MinImages"]["Default"] == 8
    )


def test_samconfig_has_dev_and_prod_with_lowercase_stack_names():
    config = tomllib.loads((REPO / "samconfig.toml").read_text())
    for env in ("default", "prod"):
        name = config[env]["global"]["parameters"]["stack_name"]
        assert re.fullmatch(r"[a-z0-9-]+", name)  # the stack name is part of the bucket name
        assert "CAPABILITY_IAM" in config[env]["deploy"]["parameters"]["capabilities"]


# A variable a handler requires (os.environ["X"], or the API's _env("X")) that the template
# does not set only fails once deployed: the local runtime sets its own environment.
_REQUIRED_ENV = re.compile(r'os\.environ\["([A-Z0-9_]+)"\]|\b_env\("([A-Z0-9_]+)"\)')


def test_every_function_gets_the_environment_its_code_requires():
    from avatarflow_local.workflow_stack import function_folder, function_variables

    template = load_template()
    functions = [lid for lid, r in template["Resources"].items() if r["Type"] == "AWS::Serverless::Function"]
    assert len(functions) >= 7
    for lid in functions:
        source = (REPO / "functions" / function_folder(template, lid) / "app.py").read_text()
        required = {a or b for a, b in _REQUIRED_ENV.findall(source)}
        provided = set(function_variables(template, lid))
        # Powertools: metrics fail to flush without a namespace; logs need a service name.
        required |= {"POWERTOOLS_SERVICE_NAME", "POWERTOOLS_METRICS_NAMESPACE"}
        missing = sorted(required - provided)
        assert not missing, f"{lid} reads {missing} but the template does not set them"


def test_functions_match_the_architecture_of_the_shared_layer():
    template = load_template()
    shared = template.get("Globals", {}).get("Function", {})
    layer_arch = template["Resources"]["SharedLayer"]["Properties"]["CompatibleArchitectures"]
    for lid, r in template["Resources"].items():
        if r["Type"] == "AWS::Serverless::Function":
            arch = r["Properties"].get("Architectures", shared.get("Architectures", ["x86_64"]))
            assert arch == layer_arch, f"{lid} runs on {arch}, the shared layer on {layer_arch}"
            assert r["Properties"].get("Tracing", shared.get("Tracing")) == "Active", lid


# ---------------------------------------------------------------- alarms and the dashboard

# What each alarm dimension must name: (resource type, how the value refers to it).
ALARM_DIMENSIONS = {
    "FunctionName": ("AWS::Serverless::Function", "Ref"),
    "QueueName": ("AWS::SQS::Queue", "QueueName"),
    "StateMachineArn": ("AWS::Serverless::StateMachine", "Ref"),
    "EndpointName": ("AWS::SageMaker::Endpoint", "EndpointName"),
    "ApiId": ("AWS::Serverless::HttpApi", "Ref"),
}
# Metric names as AWS documents them per namespace (a typo publishes nothing and never alarms).
KNOWN_METRICS = {
    "AWS/Lambda": {"Errors", "Throttles", "Invocations", "Duration"},
    "AWS/SQS": {"ApproximateNumberOfMessagesVisible", "ApproximateAgeOfOldestMessage"},
    "AWS/States": {"ExecutionsFailed", "ExecutionsTimedOut", "ExecutionsAborted",
                   "ServiceIntegrationsFailed", "ServiceIntegrationsTimedOut"},
    "AWS/SageMaker": {"ApproximateAgeOfOldestRequest", "HasBacklogWithoutCapacity", "ApproximateBacklogSize",
                      "ApproximateBacklogSizePerInstance"},
    "AWS/ApiGateway": {"5xx", "4xx", "Count"},
}


def alarm_metrics(props):
    """Every metric an alarm reads: its own, or each MetricStat of its metric math."""
    if "MetricName" in props:
        return [{"Namespace": props["Namespace"], "MetricName": props["MetricName"],
                 "Dimensions": props.get("Dimensions", [])}]
    return [m["MetricStat"]["Metric"] for m in props["Metrics"] if "MetricStat" in m]


def named_resource(value, attribute, resources):
    """The logical id `value` refers to with `attribute` (Ref or a GetAtt attribute), else None."""
    if attribute == "Ref" and isinstance(value, dict) and "Ref" in value:
        return value["Ref"] if value["Ref"] in resources else None
    if isinstance(value, dict) and "Fn::GetAtt" in value and value["Fn::GetAtt"][1] == attribute:
        return value["Fn::GetAtt"][0]
    return None


def test_every_alarm_metric_and_dimension_names_a_resource_of_the_stack():
    template = load_template()
    resources = template["Resources"]
    alarms = {n: r["Properties"] for n, r in resources.items() if r["Type"] == "AWS::CloudWatch::Alarm"}
    training = definition_substitution_keys(template)["TrainingJobResource"]
    alias = resources["ApiFunction"]["Properties"].get("AutoPublishAlias")
    watched = {}
    for name, props in alarms.items():
        metrics = alarm_metrics(props)
        assert metrics, name
        for metric in metrics:
            assert metric["MetricName"] in KNOWN_METRICS[metric["Namespace"]], (name, metric["MetricName"])
            assert metric["Dimensions"], f"{name}: a metric without dimensions watches the whole account"
            for dim in metric["Dimensions"]:
                key, value = dim["Name"], dim["Value"]
                if key == "Stage":  # SAM's HttpApi deploys its default stage, $default
                    assert value == "$default" and "StageName" not in resources["GenerationApi"]["Properties"]
                elif key == "ServiceIntegrationResourceArn":  # the state machine's training task
                    assert value == training, name
                    watched.setdefault("training", set()).add(name)
                elif key == "Resource":  # a Lambda alias: <function>:<alias>
                    assert alias and value == {"Fn::Sub": f"${{ApiFunction}}:{alias}"}, (name, value)
                else:
                    kind, attribute = ALARM_DIMENSIONS[key]
                    target = named_resource(value, attribute, resources)
                    assert target and resources[target]["Type"] == kind, (name, key, value)
                    watched.setdefault(kind, set()).add(target)
        # Every alarm but the scale-out trigger tells the operators.
        if name != "InferenceBacklogWithoutCapacityAlarm":
            assert props["AlarmActions"] == [{"Ref": "OperationsTopic"}], name
    functions = {n for n, r in resources.items() if r["Type"] == "AWS::Serverless::Function"}
    assert watched["AWS::Serverless::Function"] == functions  # errors and throttles of every function
    dlqs = {r["Properties"]["RedrivePolicy"]["deadLetterTargetArn"]["Fn::GetAtt"][0]
            for r in resources.values() if "RedrivePolicy" in r.get("Properties", {})}
    dlqs |= {r["Properties"]["DeadLetterQueue"]["TargetArn"]["Fn::GetAtt"][0]
             for r in resources.values() if "DeadLetterQueue" in r.get("Properties", {})}
    assert dlqs and dlqs <= watched["AWS::SQS::Queue"]  # every dead-letter queue's depth
    assert watched["AWS::Serverless::StateMachine"] == {STATE_MACHINE}
    assert watched["AWS::SageMaker::Endpoint"] == {"InferenceEndpoint"}
    assert watched["AWS::Serverless::HttpApi"] == {"GenerationApi"} and watched["training"]
    subscription = resources["OperationsSubscription"]
    assert subscription["Condition"] == "HasNotificationEmail"
    assert subscription["Properties"]["Endpoint"] == {"Ref": "NotificationEmail"}


def test_dashboard_is_json_and_shows_every_alarm_and_function():
    template = load_template()
    resources = template["Resources"]
    (body, variables), = [r["Properties"]["DashboardBody"]["Fn::Sub"] for r in resources.values()
                          if r["Type"] == "AWS::CloudWatch::Dashboard"]
    names = set(re.findall(r"\$\{([A-Za-z0-9_:.]+)\}", body))
    for name in names:
        assert name.startswith("AWS::") or name.split(".")[0] in resources or name in variables, name
    dashboard = json.loads(re.sub(r"\$\{[A-Za-z0-9_:.]+\}", "x", body))
    assert len(dashboard["widgets"]) >= 6
    alarms = {n for n, r in resources.items() if r["Type"] == "AWS::CloudWatch::Alarm"}
    assert {n.removesuffix(".Arn") for n in names if n.endswith("Alarm.Arn")} >= alarms - {
        "InferenceBacklogWithoutCapacityAlarm"}
    functions = {n for n, r in resources.items() if r["Type"] == "AWS::Serverless::Function"}
    assert functions <= names
