"""Run Lambda handlers in process whenever boto3 calls lambda:Invoke.

moto's Step Functions interpreter invokes Lambda tasks through a boto3 Lambda client, and
moto cannot run Lambda code without Docker. A botocore `before-call.lambda.Invoke`
handler answers that call instead of the HTTP layer: it maps the function name (or ARN)
to a handler (functions/<name>/app.py, or a local stand-in such as the training job) and
returns what the Lambda Invoke API would: the JSON payload, and `FunctionError:
Unhandled` with `{"errorType", "errorMessage"}` when the handler raises.

Each invocation runs as Lambda runs it (`FunctionSpec`, from template.yaml):
- its own environment only: Globals plus its own Variables and Lambda's reserved variables
  (AWS_LAMBDA_FUNCTION_NAME, ...); another function's variables are not visible. Handlers
  run in one process, so `os.environ` is a view that shows each invocation its own
  environment (a context variable; the process environment is untouched);
- its Timeout (3 s when the template sets none): past it the caller gets what Lambda
  returns, `FunctionError: Unhandled` with errorType `Sandbox.Timedout`, and any AWS call
  the abandoned handler still makes is refused (Lambda freezes the sandbox);
- its MemorySize and a real deadline in the context;
- its role: every AWS call is checked against it (avatarflow_local.iam).
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import json
import logging
import os
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from urllib.parse import unquote

import boto3
from botocore.exceptions import ClientError
from botocore.response import StreamingBody

from avatarflow_local import iam
from avatarflow_local.functions import load_handler

LOG = logging.getLogger(__name__)

Handler = Callable[[dict, object], object]


@dataclass
class _Response:
    """The two attributes botocore reads from an HTTP response it did not send."""

    status_code: int = 200
    headers: dict | None = None


DEFAULT_TIMEOUT_S = 3  # Lambda's, when a function sets no Timeout
DEFAULT_MEMORY_MB = 128


@dataclass(frozen=True)
class FunctionSpec:
    """What Lambda gives one function: template.yaml's Globals plus its own properties."""

    name: str
    environment: dict[str, str] = field(default_factory=dict)
    timeout_s: float = DEFAULT_TIMEOUT_S
    memory_mb: int = DEFAULT_MEMORY_MB
    role_arn: str | None = None
    aliases: tuple[str, ...] = ()  # AutoPublishAlias: the qualifiers besides $LATEST that exist


class LocalContext:
    """A Lambda context for in-process invocations (Powertools reads these)."""

    def __init__(self, function_name: str, memory_mb: int = DEFAULT_MEMORY_MB, timeout_s: float = 900.0):
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:123456789012:function:{function_name}"
        self.memory_limit_in_mb = memory_mb
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{function_name}"
        self._deadline = time.monotonic() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


# --------------------------------------------------------------------------- environments

_ENVIRONMENT: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "avatarflow_lambda_environment", default=None
)


class _InvocationEnviron(MutableMapping):
    """os.environ as each invocation sees it: its own environment inside an invocation,
    the process environment everywhere else (reads and writes pass straight through)."""

    def __init__(self, process_environ):
        self.process = process_environ

    def _current(self):
        env = _ENVIRONMENT.get()
        return self.process if env is None else env

    def __getitem__(self, key):
        return self._current()[key]

    def __setitem__(self, key, value):
        self._current()[key] = value

    def __delitem__(self, key):
        del self._current()[key]

    def __iter__(self):
        return iter(list(self._current()))

    def __len__(self):
        return len(self._current())

    def copy(self) -> dict:
        return dict(self._current())

    def __getattr__(self, name):  # os._Environ extras (encodekey, ...) for the process view
        return getattr(self.process, name)


if not isinstance(os.environ, _InvocationEnviron):
    os.environ = _InvocationEnviron(os.environ)  # noqa: B003 - a view over it, nothing cleared


@contextlib.contextmanager
def lambda_environment(variables: dict[str, str]) -> Iterator[None]:
    token = _ENVIRONMENT.set(dict(variables))
    try:
        yield
    finally:
        _ENVIRONMENT.reset(token)


# --------------------------------------------------------------------------- timeouts

_INVOCATION: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "avatarflow_invocation", default=None
)


def _refuse_after_timeout(**_kwargs) -> None:
    """Lambda freezes a sandbox whose handler timed out: nothing it does afterwards reaches AWS."""
    invocation = _INVOCATION.get()
    if invocation is not None and invocation["timed_out"]:
        raise RuntimeError(f"{invocation['function']} timed out: its sandbox is frozen, no more AWS calls")


iam.register_everywhere([("before-call", _refuse_after_timeout)])


# Process variables an invocation inherits: the AWS SDK's (credentials, region, endpoint:
# Lambda sets these too), the emulator's, the harness's Powertools switches (no X-Ray daemon
# here) and the interpreter's and libraries' runtime settings. Nothing else reaches a handler.
SANDBOX_PREFIXES = ("AWS_", "MOTO_", "POWERTOOLS_", "PYTHON", "LC_", "OMP_", "MKL_", "OPENBLAS_",
                    "TOKENIZERS_", "HF_")
SANDBOX_NAMES = frozenset({"PATH", "HOME", "LANG", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "SSL_CERT_FILE",
                           "REQUESTS_CA_BUNDLE", "PYTEST_CURRENT_TEST", "PYTEST_XDIST_WORKER"})


def _in_sandbox(name: str) -> bool:
    return name in SANDBOX_NAMES or name.startswith(SANDBOX_PREFIXES)


class LambdaTimeout(Exception):
    """The handler outlived its Timeout (what `call` raises; Invoke returns Sandbox.Timedout)."""


def run_as_lambda(
    spec: FunctionSpec, load: Callable[[], Handler], event: object,
    hidden: frozenset[str] = frozenset(), *, raise_errors: bool = False,
) -> tuple[object, str | None]:
    """Invoke one handler as Lambda would: (payload, function_error or None). With
    `raise_errors` (for tests) the handler's own exception, or LambdaTimeout, is raised.

    The invocation starts from the process variables Lambda's sandbox also has (or that
    point this process at the emulated AWS: `SANDBOX_VARIABLES`), never another function's
    (`hidden`) nor anything else a developer's shell holds. `load` runs inside the
    invocation (Lambda's init phase sees the function's environment too)."""
    base = {k: v for k, v in os.environ.process.items() if k not in hidden and _in_sandbox(k)}
    environment = {
        **base,
        **spec.environment,
        "AWS_LAMBDA_FUNCTION_NAME": spec.name,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_mb),
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{spec.name}",
    }
    invocation = {"function": spec.name, "timed_out": False}
    outcome: dict = {}
    started = threading.Event()

    def body() -> None:
        _INVOCATION.set(invocation)
        with lambda_environment(environment), iam.acting_as(spec.role_arn):
            try:
                handler = load()
                context = LocalContext(spec.name, spec.memory_mb, spec.timeout_s)
                started.set()
                outcome["payload"] = handler(event, context)
            except Exception as err:  # noqa: BLE001 - an unhandled error is a Lambda result, not a crash
                LOG.info("function %s raised %s: %s", spec.name, type(err).__name__, err)
                outcome["error"] = _error_payload(err)
                outcome["exception"] = err
            finally:
                started.set()

    worker = threading.Thread(target=contextvars.copy_context().run, args=(body,),
                              name=f"lambda-{spec.name}", daemon=True)
    worker.start()
    started.wait()  # the init phase (imports) is not part of the handler's Timeout
    worker.join(spec.timeout_s)
    if worker.is_alive():
        invocation["timed_out"] = True
        if raise_errors:
            raise LambdaTimeout(f"{spec.name} timed out after {spec.timeout_s:.2f} seconds")
        LOG.info("function %s timed out after %.2f s", spec.name, spec.timeout_s)
        message = f"RequestId: {uuid.uuid4()} Error: Task timed out after {spec.timeout_s:.2f} seconds"
        return {"errorType": "Sandbox.Timedout", "errorMessage": message}, "Unhandled"
    if "error" in outcome:
        if raise_errors:
            raise outcome["exception"]
        return outcome["error"], "Unhandled"
    return outcome.get("payload"), None


def _error_payload(err: Exception) -> dict:
    return {
        "errorType": type(err).__name__,
        "errorMessage": str(err),
        "stackTrace": traceback.format_exception(err)[-3:],
    }


def qualifier_of(name_or_arn: str, qualifier: str | None = None) -> str | None:
    """The version or alias an Invoke names: the ARN's 8th part, `NAME:qualifier`, or the
    Qualifier parameter (None: unqualified, which Lambda runs as $LATEST)."""
    parts = name_or_arn.split(":")
    if len(parts) == 8 and parts[5] == "function":
        return parts[7]
    if len(parts) == 2:
        return parts[1]
    return qualifier


def function_name_of(name_or_arn: str) -> str:
    """`arn:aws:lambda:r:a:function:NAME[:qualifier]`, `NAME:qualifier` or `NAME` -> NAME."""
    parts = name_or_arn.split(":")
    if len(parts) >= 7 and parts[5] == "function":
        return parts[6]
    return parts[0]


class LambdaHook:
    """Serves lambda:Invoke from in-process handlers.

    `specs` are the template's functions (workflow_stack.function_specs): each is run as
    Lambda runs it (run_as_lambda), its handler loaded by `loader(name)` inside its first
    invocation. `stand_ins` map other function names to callables run as they are: the
    training-job stand-in, which is not a Lambda on AWS. `fail_next(name, code)` makes the
    next invocation of `name` fail at the API level (e.g. TooManyRequestsException), to
    test Retry.
    """

    def __init__(self, specs: dict[str, FunctionSpec], stand_ins: dict[str, Handler] | None = None,
                 loader: Callable[[str], Handler] = load_handler):
        from avatarflow_local import training_job

        self.specs = dict(specs)
        self.stand_ins = {training_job.FUNCTION_NAME: training_job.handler, **(stand_ins or {})}
        self.loader = loader
        self.calls: Counter[str] = Counter()
        self.qualified: Counter[tuple[str, str | None]] = Counter()  # (name, qualifier) of each Invoke
        self._failures: dict[str, list[str]] = {}
        self._handlers: dict[str, Handler] = {}
        self._lock = threading.Lock()
        self._session = None
        self._hidden = frozenset(k for spec in self.specs.values() for k in spec.environment)

    def _load(self, name: str) -> Handler:
        with self._lock:
            if name not in self._handlers:
                self._handlers[name] = self.loader(name)
            return self._handlers[name]

    def wrap(self, name: str, wrapper: Callable[[Handler], Handler]) -> None:
        """Replace a function's handler by `wrapper(handler)` (tests: slow it, watch it)."""
        handler = self._load(name)
        with self._lock:
            self._handlers[name] = wrapper(handler)

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

    def invoke(self, name: str, event: object, qualifier: str | None = None) -> tuple[object, str | None]:
        """Run one function: (payload, function_error or None). A qualifier must be $LATEST or
        one of the function's aliases (Lambda: ResourceNotFoundException otherwise)."""
        spec = self.specs.get(name)
        if spec is not None and qualifier not in (None, "$LATEST", *spec.aliases):
            raise ClientError(
                {"Error": {"Code": "ResourceNotFoundException",
                           "Message": f"Function not found: {name}:{qualifier}"},
                 "ResponseMetadata": {"HTTPStatusCode": 404, "RequestId": "local"}},
                "Invoke",
            )
        with self._lock:
            self.calls[name] += 1
            self.qualified[(name, qualifier)] += 1
            pending = self._failures.get(name)
            code = pending.pop(0) if pending else None
        if code:
            raise ClientError(
                {"Error": {"Code": code, "Message": f"injected {code}"},
                 "ResponseMetadata": {"HTTPStatusCode": 429, "RequestId": "local"}},
                "Invoke",
            )
        if name in self.stand_ins:
            try:
                return self.stand_ins[name](event, LocalContext(name)), None
            except Exception as err:  # noqa: BLE001 - a failure is the integration's result
                LOG.info("stand-in %s raised %s: %s", name, type(err).__name__, err)
                return _error_payload(err), "Unhandled"
        if name not in self.specs:
            raise ClientError(
                {"Error": {"Code": "ResourceNotFoundException", "Message": f"Function not found: {name}"},
                 "ResponseMetadata": {"HTTPStatusCode": 404, "RequestId": "local"}},
                "Invoke",
            )
        return run_as_lambda(self.specs[name], lambda: self._load(name), event, self._hidden)

    def call(self, name: str, event: object) -> object:
        """Run one function as Lambda would and return its result; its exception (or
        LambdaTimeout) is raised here, so a test can assert on it."""
        payload, _ = run_as_lambda(self.specs[name], lambda: self._load(name), event, self._hidden,
                                   raise_errors=True)
        return payload

    def _on_invoke(self, params: dict, **_kwargs):
        # params is the serialized request: the function name sits in the URL path.
        path = params["url_path"].split("?")[0]
        named = unquote(path.split("/functions/", 1)[1].rsplit("/invocations", 1)[0])
        query = params.get("query_string") or {}  # the Qualifier parameter, serialized
        qualifier = qualifier_of(named, query.get("Qualifier") if isinstance(query, dict) else None)
        name = function_name_of(named)
        body = params.get("body") or b"{}"
        if isinstance(body, bytes | bytearray):
            body = body.decode("utf-8")
        event = json.loads(body) if body else {}
        payload, function_error = self.invoke(name, event, qualifier)
        raw = json.dumps(payload, default=str).encode("utf-8")
        parsed = {
            "StatusCode": 200,
            # An alias runs the version it points at (a deploy's first published version, locally).
            "ExecutedVersion": "$LATEST" if qualifier in (None, "$LATEST") else "1",
            "Payload": StreamingBody(io.BytesIO(raw), len(raw)),
            "ResponseMetadata": {"HTTPStatusCode": 200, "RequestId": "local"},
        }
        if function_error:
            parsed["FunctionError"] = function_error
        return _Response(200, {}), parsed
