"""The unit tier's stack: every resource of template.yaml in moto (`create_local_stack`, nothing
hand-built), each handler run as Lambda runs it (its own environment, Timeout and role) and
every AWS call it makes checked against its role, as the `stack` fixture of
tests/workflow_harness.py does; here the stack is built once per test module.

Why per module: create_local_stack costs ~0.6 s in moto, and a module of sixty one-handler
tests would spend most of its time building identical stacks. Those tests share no data, so
after each test `reset` empties what they write (every object version in the bucket, every
table row) and the IAM counters, and each test gets a new LambdaHook (a test may replace a
function's spec without the next test seeing it). The state machine is not executed: the unit
tier runs one handler at a time; tests/test_workflow.py runs the workflow.

A test module opts in by naming the fixtures at its top level:

    module_stack, stack = unit_stack.module_stack, unit_stack.stack

which shadows the per-test `stack` fixture registered in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from types import ModuleType

import boto3
import pytest
from moto import mock_aws

from avatarflow_local import iam
from avatarflow_local.functions import load_fresh_handler
from avatarflow_local.lambda_hook import LambdaHook, run_as_lambda
from avatarflow_local.workflow_stack import LocalStackResources, create_local_stack


@contextlib.contextmanager
def local_stack() -> Iterator[LocalStackResources]:
    """template.yaml's resources in a fresh moto world, with IAM enforced for the duration."""
    with mock_aws():
        resources = create_local_stack()
        with iam.enforcing(resources.enforcer):
            yield resources


def _nothing(_event, _context) -> None:
    return None


class UnitStack:
    """What a test drives: `resources` (names from the template), `call(name, event)` (the
    handler's result, or its exception raised here), `with_environment` (a per-test change
    to one function's variables, through its spec), `module(name)` (the loaded app.py, for
    stubbing a client) and `enforcer` (`allowed`, `denied`, `masked`)."""

    def __init__(self, resources: LocalStackResources, modules: dict[str, ModuleType]):
        self.resources = resources
        self.enforcer = resources.enforcer
        # One fresh functions/<name>/app.py per stack, like a new execution environment:
        # its own module globals and cached clients, imported in the function's environment.
        self.modules = modules
        self.hook = LambdaHook(resources.function_specs, loader=self._load)
        self.call = self.hook.call
        self.invoke = self.hook.invoke

    def _load(self, name: str):
        if name not in self.modules:
            handler = load_fresh_handler(name)
            self.modules[name] = sys.modules[handler.__module__]
        return self.modules[name].handler

    def module(self, name: str) -> ModuleType:
        """functions/<name>/app.py as this stack runs it; loaded, if no invocation has yet, as
        Lambda's init phase loads it: in the function's own environment, as its role."""
        if name not in self.modules:
            hidden = frozenset(k for spec in self.hook.specs.values() for k in spec.environment)
            run_as_lambda(self.hook.specs[name], lambda: (self._load(name), _nothing)[1], None, hidden,
                          raise_errors=True)
        return self.modules[name]

    def with_environment(self, name: str, **variables: str) -> None:
        """Give function `name` these variables on top of the template's, for this test only.
        Only for a knob the template leaves unset (the test says why). A variable app.py reads
        at import needs a module loaded after this: `UnitStack(resources, {})` loads its own."""
        spec = self.hook.specs[name]
        self.hook.specs[name] = dataclasses.replace(spec, environment={**spec.environment, **variables})


def reset(resources: LocalStackResources) -> None:
    """Back to the empty stack: no object version or delete marker in the bucket, no table
    row, no IAM counts (as the operator: these calls are not checked)."""
    s3 = boto3.client("s3")
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=resources.bucket):
        victims = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                   for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
        if victims:
            s3.delete_objects(Bucket=resources.bucket, Delete={"Objects": victims, "Quiet": True})
    ddb = boto3.resource("dynamodb")
    for name in boto3.client("dynamodb").list_tables()["TableNames"]:  # every table of the stack
        table = ddb.Table(name)
        key = [k["AttributeName"] for k in table.key_schema]
        with table.batch_writer() as batch:
            for item in table.scan()["Items"]:
                batch.delete_item(Key={k: item[k] for k in key})
    enforcer = resources.enforcer
    enforcer.denied.clear()
    enforcer.allowed.clear()
    enforcer.masked.clear()


@pytest.fixture(scope="module")
def module_stack():
    with local_stack() as resources:
        yield resources, {}


@pytest.fixture
def stack(module_stack):
    resources, modules = module_stack
    yield UnitStack(resources, modules)
    reset(resources)
