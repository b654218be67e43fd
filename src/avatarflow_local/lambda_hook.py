"""Run Lambda handlers in process whenever boto3 calls lambda:Invoke.

moto's Step Functions interpreter invokes Lambda tasks through a boto3 Lambda client, and
moto cannot run Lambda code without Docker. A botocore `before-call.lambda.Invoke`
handler answers that call instead of the HTTP layer: it maps the function name (or ARN)
to a handler (functions/<name>/app.py, or a local stand-in such as the training job) and
returns what the Lambda Invoke API would: the JSON payload, and `FunctionError:
Unhandled` with `{"errorType", "errorMessage"}` when the handler raises.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

import boto3
from botocore.exceptions import ClientError
from botocore.response import StreamingBody

from avatarflow_local.functions import load_handler

LOG = logging.getLogger(__name__)

Handler = Callable[[dict, object], object]


@dataclass
class _Response:
    """The two attributes botocore reads from an HTTP response it did not send."""

    status_code: int = 200
    headers: dict | None = None


class LocalContext:
    """A Lambda context for in-process invocations (Powertools reads these)."""

    memory_limit_in_mb = 1024
    aws_request_id = "00000000-0000-0000-0000-000000000000"

    def __init__(self, function_name: str):
        self.function_name = function_name
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:123456789012:function:{function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return 900_000


def function_name_of(name_or_arn: str) -> str:
    """`arn:aws:lambda:r:a:function:NAME[:qualifier]` or `NAME` -> NAME."""
    parts = name_or_arn.split(":")
    if len(parts) >= 7 and parts[5] == "function":
        return parts[6]
    return name_or_arn


class LambdaHook:
    """Serves lambda:Invoke from in-process handlers.

    `handlers` maps function names to callables; a name not listed is looked up as a
    folder under functions/. `fail_next(name, code)` makes the next invocation of `name`
    fail at the API level (e.g. TooManyRequestsException), to test Retry.
    """

    def __init__(self, handlers: dict[str, Handler] | None = None):
        from avatarflow_local import training_job

        self.handlers = {training_job.FUNCTION_NAME: training_job.handler, **(handlers or {})}
        self.calls: Counter[str] = Counter()
        self._failures: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._session = None

    def handler_for(self, name: str) -> Handler:
        if name in self.handlers:
            return self.handlers[name]
        return load_handler(name)

    def fail_next(self, name: str, code: str = "TooManyRequestsException", times: int = 1) -> None:
        with self._lock:
            self._failures.setdefault(name, []).extend([code] * times)

    def install(self, session: boto3.Session | None = None) -> LambdaHook:
        """Register on `session` (default: boto3's default session, created if needed).
        Inside mock_aws, call this after the mock started: moto resets the default session."""
        if session is None:
            if boto3.DEFAULT_SESSION is None:
                boto3.setup_default_session()
            session = boto3.DEFAULT_SESSION
        session.events.register("before-call.lambda.Invoke", self._on_invoke)
        self._session = session
        return self

    def uninstall(self) -> None:
        if self._session is not None:
            self._session.events.unregister("before-call.lambda.Invoke", self._on_invoke)
            self._session = None

    def invoke(self, name: str, event: object) -> tuple[object, str | None]:
        """Run one handler: (payload, function_error or None)."""
        with self._lock:
            self.calls[name] += 1
            pending = self._failures.get(name)
            code = pending.pop(0) if pending else None
        if code:
            raise ClientError(
                {"Error": {"Code": code, "Message": f"injected {code}"},
                 "ResponseMetadata": {"HTTPStatusCode": 429, "RequestId": "local"}},
                "Invoke",
            )
        handler = self.handler_for(name)
        try:
            return handler(event, LocalContext(name)), None
        except Exception as err:  # noqa: BLE001 - an unhandled error is a Lambda result, not a crash
            LOG.info("function %s raised %s: %s", name, type(err).__name__, err)
            return {
                "errorType": type(err).__name__,
                "errorMessage": str(err),
                "stackTrace": traceback.format_exception(err)[-3:],
            }, "Unhandled"

    def _on_invoke(self, params: dict, **_kwargs):
        # params is the serialized request: the function name sits in the URL path.
        path = params["url_path"].split("?")[0]
        name = function_name_of(unquote(path.split("/functions/", 1)[1].rsplit("/invocations", 1)[0]))
        body = params.get("body") or b"{}"
        if isinstance(body, bytes | bytearray):
            body = body.decode("utf-8")
        event = json.loads(body) if body else {}
        payload, function_error = self.invoke(name, event)
        raw = json.dumps(payload, default=str).encode("utf-8")
        parsed = {
            "StatusCode": 200,
            "ExecutedVersion": "$LATEST",
            "Payload": StreamingBody(io.BytesIO(raw), len(raw)),
            "ResponseMetadata": {"HTTPStatusCode": 200, "RequestId": "local"},
        }
        if function_error:
            parsed["FunctionError"] = function_error
        return _Response(200, {}), parsed
