"""Rules of the Amazon States Language that AWS enforces and moto does not, checked on
statemachines/train_avatar.asl.json as CloudFormation deploys it (every ${...} filled from
template.yaml's DefinitionSubstitutions, for every MaxTrainingMinutes value, spot on and off).

- Intrinsic string literals: ' { } and \\ are reserved and must be escaped with a backslash;
  only States.Format's first argument may hold {} placeholders. (AWS Step Functions Developer
  Guide, "Intrinsic functions" > "Reserved characters in intrinsic functions"; an open escape
  is a runtime error.) moto and AWS's language service both accept unescaped braces.
- Retry/Catch names: only error names the integration raises (sources next to ALLOWED_ERRORS);
  a name nobody raises never matches, so its retry silently never happens. Retries only for
  transient errors: a ValidationException is never retried.
- Timeouts: every Task has one, bounded by the template (a Lambda's own timeout, SageMaker's
  stopping condition), never AWS's default of 99999999 s; no HeartbeatSeconds where nothing
  sends heartbeats.
- ListObjectsV2 omits Contents when nothing is listed: Contents is only projected with [*]
  and never handed to an intrinsic; the local emulation answers an empty listing the same way.
- SageMaker MetricDefinitions match the trainer's metric line and the documented table.
- AWS's own ASL language service (tools/asl, npm amazon-states-language-service) finds no
  error in the rendered definition and does find them in a known-bad one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import train_dreambooth_lora as tdl
from moto import mock_aws

from avatarflow_local.lambda_hook import DEFAULT_TIMEOUT_S  # a function without Timeout
from avatarflow_local.workflow_stack import (
    ACCOUNT,
    DEFINITION,
    REGION,
    STATE_MACHINE,
    TemplateResolver,
    load_template,
    render_definition,
)

REPO = Path(__file__).resolve().parents[1]
ASL_TOOL = REPO / "tools" / "asl"
REQUEST_RESPONSE_BOUND_S = 300  # one API call (S3 list, DynamoDB update, SNS publish)
TRAIN_TIMEOUT_MARGIN_S = 3600  # provisioning, data download and model upload around the stopping condition
RESERVED_IN_LITERALS = "'{}\\"

# Error names per Task resource, as AWS reports them. Sources:
# - lambda:invoke: Step Functions Developer Guide, "Handle transient Lambda service exceptions"
#   (Lambda.ClientExecutionTimeoutException, .ServiceException, .AWSLambdaException,
#   .SdkClientException; Lambda.TooManyRequestsException at the invocation limit; unhandled
#   function errors are Lambda.Unknown).
# - sagemaker:createTrainingJob.sync: the Developer Guide's SageMaker example retries
#   SageMaker.AmazonSageMakerException and SageMaker.ResourceLimitExceededException; the other
#   names are CreateTrainingJob's modelled errors (SageMaker API reference). Unmodelled errors,
#   ValidationException and ThrottlingException included, all arrive as AmazonSageMakerException.
# - dynamodb:updateItem (optimized): prefix "DynamoDB" (Developer Guide, "Exception prefix
#   differences"), then the SDK exception class: ResourceNotFoundException as is,
#   ValidationException as DynamoDB.AmazonDynamoDBException (both recorded against AWS in
#   LocalStack's validated snapshots, tests/aws/services/stepfunctions/v2/error_handling/
#   test_task_service_dynamodb.snapshot.json); UpdateItem's other modelled errors by their
#   class names (InternalServerError -> InternalServerErrorException, RequestLimitExceeded ->
#   RequestLimitExceededException).
# - sns:publish (optimized): "SNS." + error code + "Exception" (SNS.NotFoundException and
#   SNS.InvalidParameterException recorded against AWS, LocalStack test_task_service_sns);
#   codes from the SNS Publish API reference (Throttled, KMSThrottling, InternalError, ...).
# - aws-sdk:s3:* : "S3." + the AWS SDK for Java 2.x exception class (Developer Guide, "AWS SDK
#   service integrations": ServiceName.ErrorName; S3.NoSuchBucketException recorded against
#   AWS by LocalStack); S3Exception is that SDK's class for every unmodelled S3 error
#   (SlowDown, InternalError, AccessDenied).
# - SdkClientException (a client-side failure inside Step Functions' SDK call) is documented for
#   Lambda; the same client raises it for the other integrations (by analogy, not documented).
# - Sandbox.Timedout: the errorType Lambda returns for a function past its Timeout (Lambda
#   Developer Guide, "Troubleshoot invocation issues"); Step Functions names an unhandled
#   function error by its errorType (as it does UserErased). Older runtimes gave no errorType:
#   Lambda.Unknown (Step Functions best practices). The local hook answers Sandbox.Timedout.
ALLOWED_ERRORS = {
    "arn:aws:states:::lambda:invoke": {
        "Lambda.ClientExecutionTimeoutException", "Lambda.ServiceException", "Lambda.AWSLambdaException",
        "Lambda.SdkClientException", "Lambda.TooManyRequestsException", "Lambda.Unknown", "Sandbox.Timedout",
    },
    # The pack round (task token): the same Lambda errors, plus what the function raises itself:
    # an unhandled exception arrives under its errorType, the class name (PACK_FUNCTION_ERRORS).
    "arn:aws:states:::lambda:invoke.waitForTaskToken": {
        "Lambda.ClientExecutionTimeoutException", "Lambda.ServiceException", "Lambda.AWSLambdaException",
        "Lambda.SdkClientException", "Lambda.TooManyRequestsException", "Lambda.Unknown", "Sandbox.Timedout",
        "UserErased",
    },
    "arn:aws:states:::sagemaker:createTrainingJob.sync": {
        "SageMaker.AmazonSageMakerException", "SageMaker.ResourceLimitExceededException",
        "SageMaker.ResourceInUseException", "SageMaker.ResourceNotFoundException",
    },
    "arn:aws:states:::dynamodb:updateItem": {
        "DynamoDB.ConditionalCheckFailedException", "DynamoDB.ProvisionedThroughputExceededException",
        "DynamoDB.RequestLimitExceededException", "DynamoDB.InternalServerErrorException",
        "DynamoDB.ResourceNotFoundException", "DynamoDB.TransactionConflictException",
        "DynamoDB.ItemCollectionSizeLimitExceededException", "DynamoDB.AmazonDynamoDBException",
        "DynamoDB.SdkClientException",
    },
    "arn:aws:states:::sns:publish": {
        "SNS.ThrottledException", "SNS.KMSThrottlingException", "SNS.InternalErrorException",
        "SNS.NotFoundException", "SNS.InvalidParameterException", "SNS.AuthorizationErrorException",
        "SNS.KMSAccessDeniedException", "SNS.KMSDisabledException", "SNS.SdkClientException",
    },
    "arn:aws:states:::aws-sdk:s3:listObjectsV2": {
        "S3.S3Exception", "S3.NoSuchBucketException", "S3.SdkClientException",
    },
}
# Exceptions functions/pack/app.py raises by name for the state machine to catch.
PACK_FUNCTION_ERRORS = ("UserErased",)
# The longest a pack round may wait for its generations (queue, scale from zero, 10 styles x 8 images).
PACK_ROUND_BOUND_S = 2 * 3600
# Step Functions' own names (Developer Guide, "Error names"); valid after any state.
STATES_ERRORS = {"States.ALL", "States.TaskFailed", "States.Timeout", "States.HeartbeatTimeout",
                 "States.Permissions", "States.IntrinsicFailure", "States.ResultPathMatchFailure",
                 "States.ParameterPathFailure", "States.BranchFailed", "States.NoChoiceMatched",
                 "States.ExceedToleratedFailureThreshold", "States.ItemReaderFailed",
                 "States.ResultWriterFailed"}
# Deterministic errors: retrying only delays the failure. AmazonSageMakerException and
# AmazonDynamoDBException are what a ValidationException arrives as.
NOT_TRANSIENT = {"SageMaker.AmazonSageMakerException", "SageMaker.ResourceInUseException",
                 "SageMaker.ResourceNotFoundException", "DynamoDB.AmazonDynamoDBException",
                 "DynamoDB.ConditionalCheckFailedException", "DynamoDB.ResourceNotFoundException",
                 "SNS.NotFoundException", "SNS.InvalidParameterException", "SNS.AuthorizationErrorException",
                 "S3.NoSuchBucketException", "States.ALL", "States.TaskFailed", "States.Permissions"}


# --------------------------------------------------------------------------- rendering
def _cloud_physical(template: dict, stack: str) -> dict[str, dict[str, str]]:
    """Physical ids shaped like CloudFormation's, for the resources the substitutions name."""
    physical = {}
    for lid, res in template["Resources"].items():
        kind = res["Type"]
        if kind in ("AWS::Serverless::Function", "AWS::Lambda::Function"):
            physical[lid] = {"Ref": f"{stack}-{lid}-A1B2C3", "Arn":
                             f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{stack}-{lid}-A1B2C3"}
            alias = res.get("Properties", {}).get("AutoPublishAlias")
            if alias:  # SAM's `!Ref Function.Alias`: the alias ARN
                physical[f"{lid}.Alias"] = {"Ref": f"{physical[lid]['Arn']}:{alias}"}
        elif kind == "AWS::IAM::Role":
            physical[lid] = {"Arn": f"arn:aws:iam::{ACCOUNT}:role/{stack}-{lid}-A1B2C3"}
        elif kind == "AWS::SNS::Topic":
            physical[lid] = {"Ref": f"arn:aws:sns:{REGION}:{ACCOUNT}:{stack}-{lid}-A1B2C3"}
        elif kind == "AWS::DynamoDB::Table":
            physical[lid] = {"Ref": f"{stack}-{lid}-A1B2C3"}
    return physical


def cloud_substitutions(minutes: str = "60", spot: str = "true") -> dict[str, str]:
    """DefinitionSubstitutions resolved as CloudFormation would for these parameters."""
    template = load_template()
    stack = "avatarflow"
    resolver = TemplateResolver(template, stack, {
        "TrainingImageUri": f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/avatarflow-training:1",
        "BaseModelS3Uri": "s3://avatarflow-base-models/sd15/",
        "InferenceImageUri": f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/avatarflow-inference:1",
        "MaxTrainingMinutes": minutes, "UseSpotTraining": spot,
    })
    resolver.physical.update(_cloud_physical(template, stack))
    bucket = template["Resources"]["DataBucket"]["Properties"]["BucketName"]
    resolver.physical["DataBucket"] = {"Ref": resolver.resolve(bucket)}

    def condition(value) -> bool:
        (fn, arg), = value.items()
        if fn == "Fn::Equals":
            return str(resolver.resolve(arg[0])) == str(resolver.resolve(arg[1]))
        if fn == "Fn::Not":
            return not condition(arg[0])
        return condition(template["Conditions"][arg])  # {"Condition": name}

    def value_of(value):
        """Fn::FindInMap and Fn::If here; Ref, Fn::GetAtt and Fn::Sub by the local resolver."""
        if isinstance(value, dict) and "Fn::FindInMap" in value:
            name, first, second = (value_of(a) for a in value["Fn::FindInMap"])
            return template["Mappings"][name][str(first)][str(second)]
        if isinstance(value, dict) and "Fn::If" in value:
            name, when_true, when_false = value["Fn::If"]
            return value_of(when_true if condition(template["Conditions"][name]) else when_false)
        return resolver.resolve(value)

    subs = template["Resources"][STATE_MACHINE]["Properties"]["DefinitionSubstitutions"]
    return {key: str(value_of(value)) for key, value in subs.items()}


def minutes_values() -> list[str]:
    return [str(v) for v in load_template()["Parameters"]["MaxTrainingMinutes"]["AllowedValues"]]


def deployments() -> list[tuple[str, str]]:
    return [(m, spot) for m in minutes_values() for spot in ("true", "false")]


def tasks(definition: dict):
    """Every (name, Task state), descending into Map item processors."""
    scopes = [definition]
    while scopes:
        scope = scopes.pop()
        for name, state in scope["States"].items():
            if state["Type"] == "Map":
                scopes.append(state.get("ItemProcessor") or state["Iterator"])
            scopes.extend(state.get("Branches", []))
            if state["Type"] == "Task":
                yield name, state


def payload_fields(value, where=""):
    """Every (location, key, string) of a payload template whose key ends in `.$`."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key.endswith(".$") and isinstance(item, str):
                yield f"{where}.{key}", key, item
            else:
                yield from payload_fields(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from payload_fields(item, f"{where}[{i}]")


def intrinsic_fields(definition: dict):
    """Every (location, expression) that is an intrinsic function call."""
    def walk(scope, prefix):
        for name, state in scope["States"].items():
            for part in ("Parameters", "ResultSelector", "ItemSelector"):
                for where, _key, text in payload_fields(state.get(part, {}), f"{prefix}{name}.{part}"):
                    if text.startswith("States."):
                        yield where, text
            inner = state.get("ItemProcessor") or state.get("Iterator")
            if inner:
                yield from walk(inner, f"{prefix}{name}/")
            for i, branch in enumerate(state.get("Branches", [])):
                yield from walk(branch, f"{prefix}{name}[{i}]/")
    yield from walk(definition, "")


# --------------------------------------------------------------------------- intrinsics
@dataclass
class Literal:
    function: str
    index: int  # argument position
    raw: str  # between the quotes, escapes untouched


def parse_intrinsic(text: str) -> list[Literal]:
    """Parses one intrinsic call (nested calls, paths, numbers, 'literals') and returns its
    string literals with the function and argument position each belongs to. Raises
    ValueError on a malformed call (unbalanced parentheses, unterminated literal)."""
    literals: list[Literal] = []
    pos = 0

    def call() -> None:
        nonlocal pos
        match = re.compile(r"States\.[A-Za-z]+").match(text, pos)
        if not match or text[match.end():match.end() + 1] != "(":
            raise ValueError(f"not a function call at {pos}: {text!r}")
        function, pos = match.group(), match.end() + 1
        index = 0
        while True:
            while pos < len(text) and text[pos] == " ":
                pos += 1
            if text[pos] == ")":
                pos += 1
                return
            argument(function, index)
            while pos < len(text) and text[pos] == " ":
                pos += 1
            if text[pos] == ",":
                pos, index = pos + 1, index + 1
            elif text[pos] != ")":
                raise ValueError(f"expected , or ) at {pos}: {text!r}")

    def argument(function: str, index: int) -> None:
        nonlocal pos
        if text.startswith("States.", pos):
            call()
        elif text[pos] == "'":
            start = pos = pos + 1
            while pos < len(text) and text[pos] != "'":
                pos += 2 if text[pos] == "\\" else 1
            if pos >= len(text):
                raise ValueError(f"unterminated string literal: {text!r}")
            literals.append(Literal(function, index, text[start:pos]))
            pos += 1
        else:  # a path, number, true/false/null: up to the next , or ) outside brackets
            depth = 0
            while pos < len(text) and (depth or text[pos] not in ",)"):
                depth += {"[": 1, "]": -1}.get(text[pos], 0)
                pos += 1

    call()
    if text[pos:].strip():
        raise ValueError(f"text after the call: {text!r}")
    return literals


def reserved_character_problems(text: str) -> list[str]:
    """Unescaped ' { } \\ inside the intrinsic's string literals (States.Format's first
    argument may hold {} placeholders); an escape of anything else is an open escape."""
    problems = []
    for lit in parse_intrinsic(text):
        placeholders = lit.function == "States.Format" and lit.index == 0
        i = 0
        while i < len(lit.raw):
            char = lit.raw[i]
            if char == "\\":
                if i + 1 >= len(lit.raw) or lit.raw[i + 1] not in RESERVED_IN_LITERALS:
                    problems.append(f"open escape in {lit.raw!r}")
                i += 2
                continue
            if placeholders and lit.raw.startswith("{}", i):
                i += 2
                continue
            if char in "{}":
                problems.append(f"unescaped {char!r} in {lit.function} literal {lit.raw!r}")
            i += 1
    return problems


@pytest.mark.parametrize(("text", "expected"), [
    ("States.Format('uploads/{}/{}/', $.user_id, $.batch_id)", []),
    ("States.Format('s3://bucket/{}', $.key)", []),
    ("States.Format('a \\{literal\\} {}', $.x)", []),  # \{ is a literal brace
    ("States.Format('a \\\\{}', $.x)", []),  # \\ is a literal backslash, then a placeholder
    ("States.Hash(States.Format('{}:{}', $.a, States.JsonToString($.b[*].c)), 'SHA-256')", []),
    ("States.StringToJson('1800')", []),
    ("States.StringToJson('{\"MaxRuntimeInSeconds\": 1800}')",
     ["unescaped '{' in States.StringToJson literal", "unescaped '}' in States.StringToJson literal"]),
    ("States.Format('{x}', $.a)", ["unescaped '{'", "unescaped '}'"]),
    ("States.Format('c:\\d', $.a)", ["open escape"]),
    ("States.Format('\\\\{x}', $.a)", ["unescaped '{'", "unescaped '}'"]),
])
def test_the_reserved_character_check_itself(text, expected):
    found = reserved_character_problems(text)
    assert len(found) == len(expected), found
    for problem, start in zip(found, expected, strict=True):
        assert problem.startswith(start), found


def test_intrinsic_literals_escape_reserved_characters_in_every_deployment():
    """The ASL's intrinsics as CloudFormation renders them (the ${...} placeholders are gone
    by then) for every MaxTrainingMinutes value with spot on and off: the old
    StoppingConditionJson splice put a JSON object with raw braces into States.StringToJson."""
    definition = json.loads(DEFINITION.read_text())
    renderings = {}
    for minutes, spot in deployments():
        rendered = render_definition(cloud_substitutions(minutes, spot))
        renderings[f"{minutes} min, spot={spot}"] = json.loads(rendered)
    problems = {}
    for label, rendered in renderings.items():
        for where, text in intrinsic_fields(rendered):
            found = reserved_character_problems(text)
            if found:
                problems[f"{label}: {where}"] = found
    assert not problems, json.dumps(problems, indent=1)
    assert sum(1 for _ in intrinsic_fields(definition)) >= 10  # the walk really finds the intrinsics


# --------------------------------------------------------------------------- Retry / Catch
def test_retry_and_catch_name_only_errors_the_integration_raises():
    definition = json.loads(render_definition(cloud_substitutions()))
    seen = set()
    for name, state in tasks(definition):
        resource = state["Resource"]
        assert resource in ALLOWED_ERRORS, f"{name}: no documented error names for {resource}"
        allowed = ALLOWED_ERRORS[resource] | STATES_ERRORS
        for rule in state.get("Retry", []) + state.get("Catch", []):
            unknown = set(rule["ErrorEquals"]) - allowed
            assert not unknown, f"{name} ({resource}): AWS never raises {sorted(unknown)}"
            seen |= set(rule["ErrorEquals"])
    assert "SageMaker.ResourceLimitExceededException" in seen and "Lambda.ServiceException" in seen
    source = (REPO / "functions/pack/app.py").read_text()
    for error in PACK_FUNCTION_ERRORS:  # the name caught is a class the function raises
        assert error in seen and f"class {error}(Exception)" in source and f"raise {error}(" in source


def test_no_catch_leads_back_into_its_own_state():
    """Legal ASL, but moto's interpreter follows such a Catch to the state's Next instead (the
    queue's AcquireSlot once did: a timed-out wait went on to train without a slot), so the
    local proof could not check it. A loop goes through a state of its own (AskAgain)."""
    definition = json.loads(DEFINITION.read_text())
    looped = [(name, catch["Next"]) for name, state in tasks(definition) for catch in state.get("Catch", [])
              if catch["Next"] == name]
    assert looped == []
    assert definition["States"]["AskAgain"]["Next"] == "AcquireSlot"
    catches = definition["States"]["AcquireSlot"]["Catch"]
    assert {c["Next"] for c in catches} == {"AskAgain", "ReleaseAfterFailure"}


def test_retries_are_for_transient_errors_only():
    definition = json.loads(render_definition(cloud_substitutions()))
    for name, state in tasks(definition):
        for rule in state.get("Retry", []):
            bad = set(rule["ErrorEquals"]) & NOT_TRANSIENT
            bad |= {e for e in rule["ErrorEquals"] if "Validation" in e}
            assert not bad, f"{name} retries deterministic errors {sorted(bad)}"
            assert rule.get("MaxAttempts", 3) <= 5, f"{name}: unbounded retries"


# --------------------------------------------------------------------------- timeouts
def _function_timeouts(template: dict, subs_template: dict) -> dict[str, int]:
    """DefinitionSubstitutions key -> the Timeout of the function its ARN names (own,
    Globals, or Lambda's default)."""
    default = template.get("Globals", {}).get("Function", {}).get("Timeout", DEFAULT_TIMEOUT_S)
    out = {}
    for key, value in subs_template.items():
        if isinstance(value, dict) and "Fn::GetAtt" in value:
            lid, attribute = value["Fn::GetAtt"]
            res = template["Resources"][lid]
            if attribute == "Arn" and res["Type"] == "AWS::Serverless::Function":
                out[key] = int(res["Properties"].get("Timeout", default))
        elif isinstance(value, dict) and str(value.get("Ref", "")).endswith(".Alias"):  # the live alias
            res = template["Resources"][value["Ref"].removesuffix(".Alias")]
            out[key] = int(res["Properties"].get("Timeout", default))
    return out


def _train_limits(minutes_and_spot: list[tuple[str, str]]) -> dict[tuple[str, str], dict]:
    """Runs the states between MarkTraining and Train (the real ASL, rendered for each
    deployment) on moto's interpreter and returns what they leave in the state: the
    StoppingCondition sent to SageMaker and the Train task's timeout."""
    out = {}
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        sfn = boto3.client("stepfunctions", region_name=REGION)
        runs = {}
        for minutes, spot in minutes_and_spot:
            states = json.loads(render_definition(cloud_substitutions(minutes, spot)))["States"]
            start = states["MarkTraining"]["Next"]
            assert start != "Train", "no state computes the stopping condition and timeout per deployment"
            picked, todo = {}, [start]
            while todo:
                name = todo.pop()
                if name in picked or name == "Train":
                    continue
                state = json.loads(json.dumps(states[name]))
                for target in [state.get("Next"), state.get("Default")] + [c["Next"] for c in
                                                                           state.get("Choices", [])]:
                    if target:
                        todo.append(target)
                if state.get("Next") == "Train":
                    del state["Next"]
                    state["End"] = True
                picked[name] = state
            arn = sfn.create_state_machine(
                name=f"limits-{minutes}-{spot}", roleArn=f"arn:aws:iam::{ACCOUNT}:role/r",
                definition=json.dumps({"StartAt": start, "States": picked}))["stateMachineArn"]
            spot_value = json.loads(spot)
            runs[(minutes, spot)] = sfn.start_execution(stateMachineArn=arn, input=json.dumps(
                {"spot": spot_value}))["executionArn"]
        deadline = time.time() + 60
        for key, execution in runs.items():
            while (desc := sfn.describe_execution(executionArn=execution))["status"] == "RUNNING":
                assert time.time() < deadline, f"{key} still running"
                time.sleep(0.05)
            assert desc["status"] == "SUCCEEDED", (key, desc.get("error"), desc.get("cause"))
            out[key] = json.loads(desc["output"])
    return out


def test_every_task_has_a_timeout_bounded_by_the_template():
    """No Task waits AWS's default 99999999 s. Lambda tasks: longer than the function's own
    timeout (Lambda stops first and says why), at most a minute more. One-call integrations:
    at most REQUEST_RESPONSE_BOUND_S. The training job: checked per deployment below."""
    template = load_template()
    subs_template = template["Resources"][STATE_MACHINE]["Properties"]["DefinitionSubstitutions"]
    function_timeouts = _function_timeouts(template, subs_template)
    raw = {name: state for name, state in tasks(json.loads(DEFINITION.read_text()))}
    for name, state in tasks(json.loads(render_definition(cloud_substitutions()))):
        resource = state["Resource"]
        assert ("TimeoutSeconds" in state) != ("TimeoutSecondsPath" in state), \
            f"{name}: needs exactly one of TimeoutSeconds / TimeoutSecondsPath"
        waits_for_heartbeats = resource.endswith(".waitForTaskToken") or ":activity:" in resource
        if not waits_for_heartbeats:
            assert "HeartbeatSeconds" not in state and "HeartbeatSecondsPath" not in state, \
                f"{name}: {resource} sends no heartbeats"
        if resource == "arn:aws:states:::lambda:invoke.waitForTaskToken" and "TimeoutSecondsPath" in state:
            # The training queue's wait: the deployment's QueueRecheckSeconds (Init reads it), which
            # must outlast the function's own run (its invocation is part of the task) and a day at most.
            assert state["TimeoutSecondsPath"] == "$.queue_recheck", name
            init = json.loads(DEFINITION.read_text())["States"]["Init"]["Parameters"]
            assert init["queue_recheck.$"] == "States.StringToJson('${QueueRecheckSeconds}')"
            bounds = template["Parameters"]["QueueRecheckSeconds"]
            key = re.fullmatch(r"\$\{(\w+)\}", raw[name]["Parameters"]["FunctionName"]).group(1)
            low, high = bounds["MinValue"], bounds["MaxValue"]
            assert function_timeouts[key] + 30 <= low <= bounds["Default"] <= high <= 86400, name
        elif resource == "arn:aws:states:::lambda:invoke.waitForTaskToken":
            # Bounded by the wait for the callback, not by the function's run.
            assert 0 < state["TimeoutSeconds"] <= PACK_ROUND_BOUND_S, name
        elif resource == "arn:aws:states:::lambda:invoke":
            key = re.fullmatch(r"\$\{(\w+)\}", raw[name]["Parameters"]["FunctionName"]).group(1)
            limit = function_timeouts[key]
            assert limit < state["TimeoutSeconds"] <= limit + 60, \
                f"{name}: TimeoutSeconds {state['TimeoutSeconds']} vs the function's Timeout {limit}"
        elif resource.endswith(".sync"):
            assert state.get("TimeoutSecondsPath"), f"{name}: the job's limit depends on the deployment"
        else:
            assert state["TimeoutSeconds"] <= REQUEST_RESPONSE_BOUND_S, name


def test_training_task_timeout_follows_the_stopping_condition():
    """For every MaxTrainingMinutes value, spot on and off: SageMaker gets MaxRuntimeInSeconds
    = minutes x 60, MaxWaitTimeInSeconds (>= runtime) only with spot, and the Train task
    times out after the job's own limit (SageMaker stops first and says why) but within
    TRAIN_TIMEOUT_MARGIN_S of it."""
    template = load_template()
    mapping = template["Mappings"]["StoppingCondition"]
    results = _train_limits(deployments())
    for (minutes, spot), state in results.items():
        runtime = int(minutes) * 60
        row = {k: int(v) for k, v in mapping[minutes].items()}
        condition = state["limits"]["stopping_condition"]
        timeout = state["limits"]["task_timeout_seconds"]
        assert condition["MaxRuntimeInSeconds"] == runtime == row["MaxRuntime"]
        if spot == "true":
            assert condition["MaxWaitTimeInSeconds"] == row["SpotMaxWait"] >= runtime
            job_limit = condition["MaxWaitTimeInSeconds"]
        else:
            assert "MaxWaitTimeInSeconds" not in condition, (minutes, condition)
            job_limit = runtime
        assert job_limit < timeout <= job_limit + TRAIN_TIMEOUT_MARGIN_S, (minutes, spot, timeout)
    train = json.loads(DEFINITION.read_text())["States"]["Train"]
    assert train["TimeoutSecondsPath"] == "$.limits.task_timeout_seconds"
    assert train["Parameters"]["StoppingCondition.$"] == "$.limits.stopping_condition"
    assert train["Parameters"]["EnableManagedSpotTraining.$"] == "$.spot"


# --------------------------------------------------------------------------- empty listings
def test_list_objects_contents_is_only_projected_never_read_by_an_intrinsic():
    """AWS omits Contents from ListObjectsV2 when nothing is listed. A [*] projection over the
    missing member gives [] (recorded against AWS: LocalStack's validated snapshot
    test_base::test_json_path_array_wildcard_or_slice_with_no_input, "$.items[*].itemValue"
    on {}); a definite path ($.Contents) fails with States.Runtime, which no Catch catches;
    what an intrinsic's path argument does over a missing member is not documented, so none
    may read it."""
    definition = json.loads(DEFINITION.read_text())
    for name, state in tasks(definition):
        if not state["Resource"].endswith(":s3:listObjectsV2"):
            continue
        for where, _key, text in payload_fields(state.get("ResultSelector", {}), name):
            if "Contents" not in text:
                continue
            assert not text.startswith("States."), f"{where}: {text} hands Contents to an intrinsic"
            assert re.fullmatch(r"\$\.Contents\[\*\](\.\w+)?", text), f"{where}: {text} is a definite path"


def test_an_empty_listing_is_aws_shaped_locally():
    """The local emulation must answer like S3 for the ASL to meet the empty case: no
    Contents key at all, KeyCount 0; and the real ListUploads state turns that into empty
    lists and a zero count on moto's interpreter."""
    definition = json.loads(DEFINITION.read_text())
    state = json.loads(json.dumps(definition["States"]["ListUploads"]))
    for field in ("Next", "Catch", "Retry"):
        state.pop(field, None)
    state["End"] = True
    state["Parameters"]["Bucket"] = "avatarflow-empty"
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket="avatarflow-empty")
        s3.put_object(Bucket="avatarflow-empty", Key="uploads/ada/other/a.jpg", Body=b"x")
        listed = s3.list_objects_v2(Bucket="avatarflow-empty", Prefix="uploads/ada/b1/")
        assert "Contents" not in listed and listed["KeyCount"] == 0
        sfn = boto3.client("stepfunctions", region_name=REGION)
        arn = sfn.create_state_machine(name="list", roleArn=f"arn:aws:iam::{ACCOUNT}:role/r",
                                       definition=json.dumps({"StartAt": "L", "States": {"L": state}}))
        run = sfn.start_execution(stateMachineArn=arn["stateMachineArn"],
                                  input=json.dumps({"prefix": "uploads/ada/b1/"}))["executionArn"]
        deadline = time.time() + 30
        while (desc := sfn.describe_execution(executionArn=run))["status"] == "RUNNING":
            assert time.time() < deadline
            time.sleep(0.05)
    assert desc["status"] == "SUCCEEDED", desc.get("cause")
    assert json.loads(desc["output"])["listing"] == {"keys": [], "etags": [], "count": 0, "truncated": False}


# --------------------------------------------------------------------------- metrics
def _documented_metrics() -> dict[str, str]:
    """The MetricDefinitions table in docs/architecture.md (| `name` | `regex` |)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    return dict(re.findall(r"^\s*\| `(train:[a-z_:]+)` \| `([^`]+)` \|", text, flags=re.MULTILINE))


def test_metric_definitions_match_the_trainer_output_and_the_docs():
    train = json.loads(DEFINITION.read_text())["States"]["Train"]["Parameters"]
    definitions = train["AlgorithmSpecification"]["MetricDefinitions"]
    asl = {d["Name"]: d["Regex"] for d in definitions}
    assert asl == _documented_metrics()
    # SageMaker's limits (API reference, MetricDefinition): <= 40, Name <= 255, Regex <= 500.
    assert len(definitions) <= 40 and all(len(n) <= 255 and len(r) <= 500 for n, r in asl.items())
    # The lines the trainer prints after each step (containers/training, metric_line) and after
    # each checkpoint's quality check (validation_line): each metric is read from its own line.
    line = tdl.metric_line(12, 0.1234567, 0.05612)
    check = tdl.validation_line({"step": 200, "identity": -0.0123456, "faces_found": 3}, 4)
    expected = {"train:loss": (line, 0.123457), "train:step_time": (line, 0.0561), "train:step": (line, 12.0),
                "train:identity": (check, -0.012346)}
    assert set(asl) == set(expected)
    for name, regex in asl.items():
        for text in (line, check):
            match = re.search(regex, text)
            if text is not expected[name][0]:
                assert not match, f"{name}: {regex} also matches {text!r}"
                continue
            assert match, f"{name}: {regex} does not match {text!r}"
            assert float(match.group(1)) == pytest.approx(expected[name][1]), (name, text)
    # Other stdout lines of a run must not be read as a metric.
    for other in ("resumed from checkpoint-2 at step 2", "final_loss_mean=0.123456 steps=4",
                  "publishing checkpoint 4 (identity 0.7500), not the last step"):
        assert not any(re.search(r, other) for r in asl.values()), other


# --------------------------------------------------------------------------- AWS's validator
def _validate(*paths: Path) -> tuple[int, dict]:
    node = shutil.which("node")
    if node is None or not (ASL_TOOL / "node_modules" / "amazon-states-language-service").is_dir():
        pytest.fail("the ASL validator is not installed: run `make tools` (npm ci in tools/asl)")
    proc = subprocess.run([node, str(ASL_TOOL / "validate.js"), *map(str, paths)], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.e2e
def test_aws_language_service_accepts_the_definition_and_rejects_a_bad_one(tmp_path):
    rendered = {}
    for spot in ("true", "false"):
        path = tmp_path / f"train_avatar.spot-{spot}.asl.json"
        path.write_text(render_definition(cloud_substitutions("60", spot)))
        rendered[spot] = path
    code, report = _validate(DEFINITION, *rendered.values())
    errors = {p: [d for d in found if d["severity"] == 1] for p, found in report.items()}
    assert code == 0 and not any(errors.values()), json.dumps(errors, indent=1)
    assert len(report) == 3

    bad = ASL_TOOL / "known_bad.asl.json"
    code, report = _validate(bad)
    messages = [d["message"] for d in report[str(bad)] if d["severity"] == 1]
    assert code == 1
    assert any("existing state" in m for m in messages), messages  # Next to a missing state
    assert any("cannot be reached" in m for m in messages), messages  # an unreachable state
