"""Operator tooling for a deployed avatarflow stack (`python -m avatarflow_ops --help`).

Runs from the operator's machine with the operator's credentials, in its own venv
(.venv-ops, lock/ops.txt: the SageMaker Python SDK's modular core package, sagemaker-core
2.x); never shipped in a Lambda or the layer."""
