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

from avatarflow_local import training_job
from avatarflow_local.functions import REPO_ROOT

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


def function_folder(template: dict, logical_id: str) -> str:
    """functions/<folder> of a template function: from CodeUri, or the image's handler command."""
    props = template["Resources"][logical_id]["Properties"]
    if "CodeUri" in props:
        return Path(props["CodeUri"]).name
    return props["ImageConfig"]["Command"][0].split(".")[0]


def lambda_arn(name: str) -> str:
    return f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}"


def definition_substitution_keys(template: dict | None = None) -> dict:
    template = template or load_template()
    return template["Resources"][STATE_MACHINE]["Properties"]["DefinitionSubstitutions"]


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
        "StoppingConditionJson": '{\\"MaxRuntimeInSeconds\\": 600}',
        "TrainingSteps": "2",
        "Resolution": "64",
        "MixedPrecision": "no",
        "MinImages": "8",
        "SettleSeconds": "1",
    }
    subs = {}
    for key, source in definition_substitution_keys(template).items():
        if isinstance(source, dict) and "Fn::GetAtt" in source and source["Fn::GetAtt"][1] == "Arn" \
                and template["Resources"][source["Fn::GetAtt"][0]]["Type"] == "AWS::Serverless::Function":
            subs[key] = lambda_arn(function_folder(template, source["Fn::GetAtt"][0]))
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


@dataclass
class TrainingStack:
    bucket: str
    table: str
    topic_arn: str
    state_machine_arn: str
    substitutions: dict = field(default_factory=dict)


def create_training_stack(bucket: str = "avatarflow-local", name: str = "avatarflow-train-avatar",
                          **overrides: str) -> TrainingStack:
    """Bucket, registry table, topic and the state machine, like the template's (inside a moto mock)."""
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket=bucket)
    table = f"{name}-models"
    boto3.client("dynamodb", region_name=REGION).create_table(
        TableName=table, BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "user_id", "KeyType": "HASH"},
                   {"AttributeName": "version", "KeyType": "RANGE"}],
        AttributeDefinitions=[{"AttributeName": "user_id", "AttributeType": "S"},
                              {"AttributeName": "version", "AttributeType": "S"}],
    )
    topic_arn = boto3.client("sns", region_name=REGION).create_topic(Name=f"{name}-notifications")["TopicArn"]
    subs = local_substitutions(bucket, table, topic_arn, **overrides)
    arn = boto3.client("stepfunctions", region_name=REGION).create_state_machine(
        name=name, definition=render_definition(subs), roleArn=f"arn:aws:iam::{ACCOUNT}:role/{name}",
    )["stateMachineArn"]
    return TrainingStack(bucket, table, topic_arn, arn, subs)
