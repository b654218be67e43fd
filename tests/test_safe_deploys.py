"""Safe deploys (issue 19): the state machine invokes the functions' `live` aliases
(AutoPublishAlias), never $LATEST; the local runtime resolves alias-qualified ARNs as Lambda
does and IAM checks the ARN as invoked, so a role granting only the unqualified function
cannot invoke its alias. The API function deploys gradually, rolled back by its alarms."""

import json

import boto3
import pytest
import unit_stack
from botocore.exceptions import ClientError

from avatarflow_local import iam
from avatarflow_local.workflow_stack import (
    ACCOUNT,
    DEFINITION,
    REGION,
    STATE_MACHINE,
    definition_substitution_keys,
    load_template,
    render_definition,
)

module_stack, stack = unit_stack.module_stack, unit_stack.stack


def lambda_tasks(definition: dict):
    for name, state in definition["States"].items():
        if state.get("Resource") == "arn:aws:states:::lambda:invoke":
            yield name, state["Parameters"]["FunctionName"]
        for branch in [state.get("ItemProcessor") or state.get("Iterator") or {}, *state.get("Branches", [])]:
            if branch.get("States"):
                yield from lambda_tasks(branch)


def test_every_lambda_task_invokes_a_live_alias(stack):
    """In the template (each FunctionName substitution is `!Ref <Function>.Alias` of a function
    with AutoPublishAlias) and as rendered locally (each ARN ends in :live)."""
    template = load_template()
    subs = definition_substitution_keys(template)
    rendered = json.loads(render_definition(stack.resources.substitutions))
    raw = dict(lambda_tasks(json.loads(DEFINITION.read_text())))
    found = dict(lambda_tasks(rendered))
    assert found and set(found) == set(raw)
    for name, placeholder in raw.items():
        key = placeholder.strip("${}")
        ref = subs[key]["Ref"]
        function = template["Resources"][ref.removesuffix(".Alias")]["Properties"]
        assert ref.endswith(".Alias") and function["AutoPublishAlias"] == "live", name
        assert found[name].split(":")[-1] == "live" and len(found[name].split(":")) == 8, found[name]


def test_state_machine_role_may_invoke_the_aliases_and_nothing_unqualified(stack):
    enforcer = stack.enforcer
    role = enforcer.roles[enforcer.state_machine_role]
    for _name, arn in lambda_tasks(json.loads(render_definition(stack.resources.substitutions))):
        if arn.endswith(":live"):
            assert iam.decide(role, iam.Request("lambda:InvokeFunction", arn)) == "Allow", arn
            unqualified = arn.rsplit(":", 1)[0]
            assert iam.decide(role, iam.Request("lambda:InvokeFunction", unqualified)) != "Allow", unqualified
            assert iam.decide(role, iam.Request("lambda:InvokeFunction", unqualified + ":$LATEST")) != "Allow"


def test_a_grant_on_the_function_does_not_cover_its_alias():
    """IAM evaluates the ARN as invoked (Lambda: Invoke acts on a function, version or alias ARN)."""
    function = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:notify"
    grant = [{"Effect": "Allow", "Action": "lambda:InvokeFunction", "Resource": function}]
    qualified = iam.requests_for("lambda", "Invoke", {"FunctionName": function + ":live"}, REGION, ACCOUNT)
    by_param = iam.requests_for("lambda", "Invoke", {"FunctionName": "notify", "Qualifier": "live"},
                                REGION, ACCOUNT)
    assert qualified == by_param == [iam.Request("lambda:InvokeFunction", function + ":live")]
    assert iam.decide(grant, qualified[0]) != "Allow"
    alias_grant = [{**grant[0], "Resource": function + ":live"}]
    assert iam.decide(alias_grant, qualified[0]) == "Allow"


def test_invoking_resolves_qualifiers_as_lambda_does(stack):
    """`live` (the AutoPublishAlias) and $LATEST run the function; another qualifier is
    ResourceNotFoundException, as Lambda answers an alias that does not exist."""
    hook = stack.hook.install()
    try:
        client = boto3.client("lambda", region_name=REGION)
        event = json.dumps({"event": "MODEL_FAILED", "user_id": "alice", "batch_id": "b1"}).encode()
        arn = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:notify"
        answer = client.invoke(FunctionName=arn + ":live", Payload=event)
        assert answer["ExecutedVersion"] != "$LATEST" and "FunctionError" not in answer
        assert client.invoke(FunctionName="notify", Qualifier="live", Payload=event)["StatusCode"] == 200
        assert client.invoke(FunctionName=arn, Payload=event)["ExecutedVersion"] == "$LATEST"
        with pytest.raises(ClientError) as err:
            client.invoke(FunctionName=arn + ":prod", Payload=event)
        assert err.value.response["Error"]["Code"] == "ResourceNotFoundException"
        assert hook.qualified[("notify", "live")] == 2 and hook.qualified[("notify", None)] == 1
        assert ("notify", "prod") not in hook.qualified
    finally:
        hook.uninstall()


def test_api_function_deploys_gradually_and_rolls_back_on_its_alarms():
    resources = load_template()["Resources"]
    api = resources["ApiFunction"]["Properties"]
    preference = api["DeploymentPreference"]
    assert api["AutoPublishAlias"] == "live"
    assert preference["Type"].startswith(("Canary", "Linear"))  # gradual, not AllAtOnce
    alarms = [a["Ref"] for a in preference["Alarms"]]
    assert {"ApiFunctionAliasErrorsAlarm", "Api5xxAlarm"} <= set(alarms)
    assert all(resources[a]["Type"] == "AWS::CloudWatch::Alarm" for a in alarms)
    invoked = {v["Ref"].removesuffix(".Alias") for v in
               definition_substitution_keys().values() if isinstance(v, dict) and "Ref" in v
               and v["Ref"].endswith(".Alias")}
    assert invoked == {"PreprocessImageFunction", "BuildDatasetFunction", "RegisterModelFunction",
                       "NotifyFunction", "PackFunction", "TrainingQueueFunction"}
    assert resources[STATE_MACHINE]["Type"] == "AWS::Serverless::StateMachine"
