"""Read a CloudFormation/SAM template as plain data: the short tags (!Ref, !Sub, !GetAtt,
!If, !Join, ...) become their long forms ({"Ref": ...}, {"Fn::Sub": ...}), so tests can walk
the template without a CloudFormation engine."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "template.yaml"


class CfnLoader(yaml.SafeLoader):
    """SafeLoader plus the CloudFormation intrinsic-function tags."""


def _construct(loader: CfnLoader, tag_suffix: str, node: yaml.Node):
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


CfnLoader.add_multi_constructor("!", _construct)


def load_template(path: Path | str = TEMPLATE) -> dict:
    with open(path, encoding="utf-8") as handle:
        return yaml.load(handle, Loader=CfnLoader)  # noqa: S506 - SafeLoader subclass


def dump_template(template: dict, path: Path | str) -> None:
    """Write long-form data back as YAML (CloudFormation reads the long forms too)."""
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(template, handle, sort_keys=False)
