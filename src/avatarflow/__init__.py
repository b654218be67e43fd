"""avatarflow: shared code for the Lambda functions, containers and local runtime."""

__version__ = "0.1.0"
