"""HTTP API (API Gateway HTTP API, payload 2.0, JWT authorizer) for one user's uploads,
models, generations and deletion. See design.md "API".

Routes under /users/{user_id} answer a user token only for its own user id (JWT `sub` ==
user_id, else 403) and a token with the avatarflow/admin scope (a backend's client
credentials) for any; routes under /admin/ need that scope. A request without claims is 401.
One function decides it (_check_caller), before any route runs. Ids are validated before
they reach a key or a log line.
Run `python functions/api/app.py > docs/openapi.json` to refresh the OpenAPI document."""

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from types import SimpleNamespace
from typing import Annotated, Literal

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, CORSConfig, Response, content_types
from aws_lambda_powertools.event_handler.exceptions import (
    ForbiddenError,
    NotFoundError,
    ServiceError,
    ServiceUnavailableError,
    UnauthorizedError,
)
from aws_lambda_powertools.event_handler.middlewares.openapi_validation import (
    OpenAPIRequestValidationMiddleware,
)
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError
from aws_lambda_powertools.event_handler.openapi.models import HTTPBearer
from aws_lambda_powertools.event_handler.openapi.params import Body
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from boto3.dynamodb.conditions import Attr, Key
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from avatarflow import __version__, batches, erasure, keys, moderation, packs, styles, usage
from avatarflow import generations as gen
from avatarflow.ids import ID_PATTERN, InvalidIdError, new_id, validate_id
from avatarflow.training_queue import TrainingQueue
from avatarflow.workflow import MAX_BATCH_PHOTOS, execution_name

logger = Logger(service="api")
tracer = Tracer(service="api")
metrics = Metrics(service="api")

# Image size bounds are read once at import so that they also appear in the OpenAPI schema.
# The cloud endpoint runs SD at 256..1024; the local tiny model sets MIN_IMAGE_SIZE=64.
MIN_IMAGE_SIZE = int(os.environ.get("MIN_IMAGE_SIZE", "256"))
MAX_IMAGE_SIZE = int(os.environ.get("MAX_IMAGE_SIZE", "1024"))
DEFAULT_IMAGE_SIZE = min(
    max(int(os.environ.get("DEFAULT_IMAGE_SIZE", "512")), MIN_IMAGE_SIZE), MAX_IMAGE_SIZE
)
# One call makes one batch: its photos are the batch's (request.json comes on top).
MAX_UPLOAD_FILES = MAX_BATCH_PHOTOS
UPLOAD_CONTENT_TYPES = ("image/jpeg", "image/png", "image/webp", "image/heic")
# Request bounds, checked before a body is parsed. The largest valid body (every file name,
# two 500-character prompts, every character escaped) is under 16 KB and nests 3 levels deep.
MAX_BODY_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32
# A 400 lists at most this many errors, each field and reason cut to MAX_ERROR_TEXT characters.
MAX_ERRORS = 10
MAX_ERROR_TEXT = 200

# CORS only for another origin named at deploy time (CorsAllowOrigin): the stack's web app calls
# the API on its own origin through CloudFront (/api/*) and needs none.
_CORS_ORIGIN = os.environ.get("CORS_ALLOW_ORIGIN", "")
app = APIGatewayHttpResolver(
    enable_validation=True,
    cors=CORSConfig(allow_origin=_CORS_ORIGIN, allow_headers=["Authorization", "Content-Type"], max_age=600)
    if _CORS_ORIGIN
    else None,
)


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"environment variable {name} is not set")
    return value


def _int_env(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


@cache
def aws() -> SimpleNamespace:
    """Clients are made on first use (not at import) so tests can mock AWS around them."""
    return SimpleNamespace(
        s3=boto3.client("s3", config=Config(signature_version="s3v4")),
        runtime=boto3.client("sagemaker-runtime"),
        dynamodb=boto3.resource("dynamodb"),
        sqs=boto3.client("sqs"),
        sfn=boto3.client("stepfunctions"),
        comprehend=boto3.client("comprehend"),
    )


# --------------------------------------------------------------------------- request bodies

Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]
NegativePrompt = Annotated[str, StringConstraints(strip_whitespace=True, max_length=500)]
IdStr = Annotated[str, StringConstraints(pattern=ID_PATTERN.pattern)]
FileName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]


# strict: no coercion anywhere ("7.5" is not a float, 1 and "true" are not booleans, 2.0 is
# not an int); JSON's integers still count as floats.
class GenerationBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Prompt = Field(description="What to draw; the model's token is added by the endpoint.")
    # None lets the endpoint apply its default negative prompt; "" really means none.
    negative_prompt: NegativePrompt | None = None
    num_images: int = Field(4, ge=1, le=8, strict=True)
    steps: int = Field(30, ge=1, le=80, strict=True)
    guidance_scale: float = Field(7.5, ge=0, le=20, allow_inf_nan=False)
    width: int = Field(DEFAULT_IMAGE_SIZE, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE, multiple_of=8, strict=True)
    height: int = Field(DEFAULT_IMAGE_SIZE, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE, multiple_of=8, strict=True)
    # The endpoint seeds image i with seed + i, and each must stay a 32-bit seed.
    seed: int | None = Field(None, ge=0, le=2**32 - 1 - 8, strict=True)
    model_version: IdStr | None = Field(None, description="Default: the newest READY model.")

    @field_validator("prompt")
    @classmethod
    def _moderate(cls, prompt: str) -> str:
        # avatarflow.moderation: normalised text against the word list (Comprehend runs in the route).
        moderation.check_prompt(prompt)
        return prompt

    @field_validator("negative_prompt")
    @classmethod
    def _negative_rules(cls, negative: str | None) -> str | None:
        # Blocked terms are allowed here ("nsfw, nude" is how people avoid them); clothing is not.
        if negative:
            moderation.check_negative_prompt(negative)
        return negative


StyleName = Annotated[str, StringConstraints(pattern=styles.NAME_PATTERN)]


class PackBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    styles: list[StyleName] | None = Field(
        None, min_length=1, max_length=styles.MAX_STYLES,
        description="Names from the style catalogue; default: every style of the catalogue.",
    )

    @field_validator("styles")
    @classmethod
    def _unique_styles(cls, names: list[str] | None) -> list[str] | None:
        if names is not None and len(set(names)) != len(names):
            raise ValueError("style names must be unique")
        return names


class UploadFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: FileName
    content_type: Literal["image/jpeg", "image/png", "image/webp", "image/heic"]


class UploadBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    files: list[UploadFile] = Field(min_length=1, max_length=MAX_UPLOAD_FILES)
    include_request_json: bool = Field(
        False, description="Also return a form for request.json (email, subject_class, token)."
    )

    @field_validator("files")
    @classmethod
    def _unique_names(cls, files: list[UploadFile]) -> list[UploadFile]:
        names = [f.name for f in files]
        if len(set(names)) != len(names):
            raise ValueError("file names must be unique")
        if keys.REQUEST_FILE in names:
            raise ValueError(f"{keys.REQUEST_FILE} is reserved; use include_request_json")
        return files


# --------------------------------------------------------------------------- auth and errors


class FieldErrors(Exception):
    def __init__(self, errors: list[dict]):
        super().__init__("invalid request")
        self.errors = errors


def _bad_request(errors: list[dict], message: str = "invalid request") -> Response:
    return Response(
        status_code=400,
        content_type=content_types.APPLICATION_JSON,
        body={"statusCode": 400, "message": message, "errors": errors},
    )


def _body_error(reason: str) -> FieldErrors:
    return FieldErrors([{"field": "body", "reason": reason}])


ADMIN_SCOPE = "avatarflow/admin"  # the Cognito resource server `avatarflow`, scope `admin`
ADMIN_PREFIX = "/admin/"


@dataclass(frozen=True)
class Caller:
    """Who the verified token says is calling: `subject` (a user id, or for a client-credentials
    token the app client's id) and whether it holds the admin scope."""

    subject: str
    admin: bool


def _caller() -> Caller:
    """The caller from the claims API Gateway's JWT authorizer verified (never from a header or
    the body). 401 without a subject. Admin = the `avatarflow/admin` scope in the access
    token's `scope` claim, which Cognito puts only in tokens of an app client allowed that
    scope (template: BackendClient, client credentials); an id token has no `scope`."""
    event = app.current_event.raw_event
    authorizer = (event.get("requestContext") or {}).get("authorizer") or {}
    claims = (authorizer.get("jwt") or {}).get("claims") or {}
    if not isinstance(claims, dict):
        raise UnauthorizedError("missing or invalid token")
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise UnauthorizedError("missing or invalid token")
    scope = claims.get("scope")
    scopes = scope.split() if isinstance(scope, str) else []
    return Caller(subject, ADMIN_SCOPE in scopes and claims.get("token_use", "access") == "access")


def _check_caller() -> None:
    """The API's one access rule, run before every route (new routes get it for free):
    401 without a verified subject; 400 for malformed path ids; then admin routes
    (/admin/...) need the admin scope (else 403), and routes under /users/{user_id} allow
    the admin scope for any user id and a user token only for its own (`sub` == user_id,
    else 403)."""
    route = app.context.get("_route")
    route_args = app.context.get("_route_args", {})
    admin_route = route is not None and route.path.startswith(ADMIN_PREFIX)
    if "user_id" not in route_args and not admin_route:
        return  # no route matched (404) or a CORS preflight: nothing of a user's to guard
    caller = _caller()
    errors = []
    for name in ("user_id", "generation_id", "batch_id", "pack_id"):
        if name in route_args:
            try:
                validate_id(route_args[name], name)
            except InvalidIdError as err:
                errors.append({"field": f"path.{name}", "reason": str(err)})
    if errors:
        raise FieldErrors(errors)
    if admin_route and not caller.admin:
        raise ForbiddenError(f"this route needs the {ADMIN_SCOPE} scope")
    if not caller.admin and caller.subject != route_args.get("user_id"):
        raise ForbiddenError("this token may not act for that user")
    ids = {k: route_args[k] for k in ("user_id", "generation_id", "batch_id", "pack_id") if k in route_args}
    logger.append_keys(admin=caller.admin, **ids)


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def _nests_deeper_than(text: str, limit: int) -> bool:
    """Whether JSON text nests arrays/objects deeper than `limit`, found without parsing it
    (json.loads recurses: 1,500 levels is a RecursionError). Brackets in strings do not count."""
    depth = 0
    for bracket in _JSON_BRACKET.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if bracket.group() in "[{" else -1
        if depth > limit:
            return True
    return False


def _check_body() -> None:
    """413 over MAX_BODY_BYTES (bounded before anything is decoded); 400 for a body that is
    not base64 or not UTF-8, or that nests deeper than MAX_JSON_DEPTH."""
    event = app.current_event
    raw = event.body or ""
    too_large = ServiceError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    if len(raw) > MAX_BODY_BYTES * 4 // 3 + 4:  # base64 or not, the decoded body is over the bound
        raise too_large
    try:
        text = event.decoded_body or ""
    except UnicodeDecodeError:
        raise _body_error("the body is not UTF-8 text") from None
    except binascii.Error:
        raise _body_error("the body is not valid base64") from None
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BODY_BYTES:
        raise too_large
    if _nests_deeper_than(text, MAX_JSON_DEPTH):
        raise _body_error(f"JSON nests deeper than {MAX_JSON_DEPTH} levels")


class _CallerFirstValidation(OpenAPIRequestValidationMiddleware):
    """Powertools validates a request (and so reads and parses its body) before any middleware
    given to app.use runs. This takes the validator's place and checks first the caller
    (_check_caller: 401, 400 path ids, 403) and then the body's bounds (_check_body), so an
    anonymous caller or another user's token learns nothing about the body rules and costs
    no parsing, and no body reaches json.loads or pydantic unbounded."""

    def handler(self, app_, next_middleware):
        _check_caller()
        if app_.context["_route"].dependant.body_params:
            _check_body()
        return super().handler(app_, next_middleware)


if not isinstance(getattr(app, "_request_validation_middleware", None), OpenAPIRequestValidationMiddleware):
    raise RuntimeError("Powertools no longer keeps its request validator where the API replaces it")
app._request_validation_middleware = _CallerFirstValidation()


@app.exception_handler(FieldErrors)
def _on_field_errors(err: FieldErrors) -> Response:
    return _bad_request(err.errors)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 3] + "..."


@app.exception_handler(RequestValidationError)
def _on_validation_error(err: RequestValidationError) -> Response:
    """The first MAX_ERRORS errors, each bounded (a body of thousands of unknown keys would
    otherwise answer with every one of them, past Lambda's 6 MB response limit). The caller
    was checked before validation (_CallerFirstValidation)."""
    found = err.errors()
    errors = []
    for e in found[:MAX_ERRORS]:
        # A JSON syntax error's loc ends with a character offset: report it against the body.
        loc = ["body"] if e.get("type") == "json_invalid" else [str(p) for p in e.get("loc", ())]
        reason = str(e.get("msg", e.get("type", "invalid"))).removeprefix("Value error, ")
        errors.append({"field": _clip(".".join(loc) or "body"), "reason": _clip(reason)})
    if len(found) <= MAX_ERRORS:
        return _bad_request(errors)
    return _bad_request(errors, f"invalid request: {len(found)} errors, the first {MAX_ERRORS} shown")


# --------------------------------------------------------------------------- helpers


def _models_table():
    return aws().dynamodb.Table(_env("MODELS_TABLE"))


def _generations_table():
    return aws().dynamodb.Table(_env("GENERATIONS_TABLE"))


def _query_all(table, **kwargs) -> list[dict]:
    items, start = [], None
    while True:
        page = table.query(**kwargs, **({"ExclusiveStartKey": start} if start else {}))
        items.extend(page.get("Items", []))
        start = page.get("LastEvaluatedKey")
        if not start:
            return items


def _user_models(user_id: str) -> list[dict]:
    rows = _query_all(_models_table(), KeyConditionExpression=Key("user_id").eq(user_id))
    # Newest first: created_at is ISO-8601 UTC, so it sorts as a string; version breaks ties.
    return sorted(rows, key=lambda r: (str(r.get("created_at", "")), str(r.get("version", ""))), reverse=True)


def _pick_model(user_id: str, version: str | None) -> dict:
    models = _user_models(user_id)
    if version is not None:
        row = next((m for m in models if m.get("version") == version), None)
        if row is None:
            raise NotFoundError("model_version not found")
        if row.get("status") != "READY":
            raise ServiceError(409, f"model {version} is {row.get('status', 'not ready')}, not READY")
        return row
    ready = [m for m in models if m.get("status") == "READY"]
    if not ready:
        raise ServiceError(409, "no READY model for this user yet")
    return ready[0]


def _status_url(user_id: str, generation_id: str) -> str:
    return _absolute_url(f"/users/{user_id}/generations/{generation_id}")


def _absolute_url(path: str) -> str:
    """path on this API as the caller reached it (domain, stage), or path alone without a domain."""
    ctx = app.current_event.raw_event.get("requestContext") or {}
    domain, stage = ctx.get("domainName"), ctx.get("stage")
    if not domain:
        return path
    prefix = "" if stage in (None, "", "$default") else f"/{stage}"
    # API Gateway is HTTPS only; the local runtime's plain-HTTP adapter says so in X-Forwarded-Proto.
    scheme = "http" if (app.current_event.headers or {}).get("x-forwarded-proto") == "http" else "https"
    return f"{scheme}://{domain}{prefix}{path}"


def _usage_table():
    return aws().dynamodb.Table(_env("USAGE_TABLE"))


def _quotas() -> usage.Quotas:
    return usage.Quotas.from_env(os.environ)


def _over_quota(err: usage.QuotaExceeded) -> Response:
    """429 with Retry-After (seconds to the next UTC day) and when to try again, in words."""
    metrics.add_metric(name="QuotaRefusals", unit=MetricUnit.Count, value=1)
    logger.info("quota reached", extra={"quota": err.kind, "limit": err.limit})
    return Response(
        status_code=429,
        content_type=content_types.APPLICATION_JSON,
        body={"statusCode": 429, "message": err.message(), "quota": err.kind, "limit": err.limit,
              "used": err.used, "retry_at": err.retry_at.isoformat(timespec="seconds")},
        headers={"Retry-After": str(err.retry_after_s())},
    )


def _erasures_table():
    return aws().dynamodb.Table(_env("ERASURES_TABLE"))


def _refuse_if_erased(user_id: str) -> None:
    """410 for a user marked erased: nothing new is written for them until the mark expires
    (see avatarflow.erasure), so the sweep never chases fresh uploads or generations."""
    if erasure.is_erased(_erasures_table(), user_id):
        raise ServiceError(410, "this user's data was deleted (DELETE /users/{user_id}); nothing new is "
                                "accepted for this user id")


def _image_view(item: dict, user_id: str, generation_id: str, ttl: int) -> dict | None:
    key = item.get("key")
    # Never sign a key outside this generation's folder, whatever the output claimed.
    if not isinstance(key, str) or not key.startswith(keys.generation_prefix(user_id, generation_id)):
        return None
    url = aws().s3.generate_presigned_url(
        "get_object", Params={"Bucket": _env("BUCKET_NAME"), "Key": key}, ExpiresIn=ttl
    )
    return {
        "url": url,
        "seed": gen.from_dynamo(item.get("seed")),
        "identity_similarity": gen.from_dynamo(item.get("identity_similarity")),
    }


def _screen_toxicity(prompt: str) -> None:
    """The cloud layer of avatarflow.moderation (PROMPT_TOXICITY_CHECK=comprehend): Comprehend
    DetectToxicContent after the word list. Fails closed: 503 when Comprehend cannot answer."""
    policy = moderation.ToxicityPolicy.from_env()
    if not policy.enabled:
        return
    try:
        labels = moderation.toxicity_labels(aws().comprehend, prompt, policy)
    except (ClientError, BotoCoreError) as err:
        logger.error("prompt toxicity check failed", extra={"error": type(err).__name__})
        raise ServiceUnavailableError("the prompt could not be checked right now; try again later") from None
    if labels:
        metrics.add_metric(name="PromptsRefusedToxic", unit=MetricUnit.Count, value=1)
        raise FieldErrors([{"field": "body.prompt",
                            "reason": "the prompt was flagged by the toxicity check: " + ", ".join(labels)}])


# --------------------------------------------------------------------------- routes


@app.post(
    "/users/<user_id>/uploads",
    summary="Presigned POST forms for the photos of a new batch",
    responses={
        200: {"description": "batch_id and one form per file"},
        400: {"description": "bad body"},
        410: {"description": "the user was erased (DELETE /users/{user_id})"},
        429: {"description": "today's training batches are spent (Retry-After)"},
    },
)
@tracer.capture_method
def create_upload(user_id: str, body: Annotated[UploadBody, Body()]):
    _refuse_if_erased(user_id)
    try:
        usage.check_batches(_usage_table(), user_id, _quotas().batches_per_day)
    except usage.QuotaExceeded as err:
        return _over_quota(err)
    batch_id = new_id()
    prefix = keys.upload_prefix(user_id, batch_id)
    ttl = _int_env("UPLOAD_URL_TTL_SECONDS", 900)
    max_bytes = _int_env("MAX_UPLOAD_BYTES", 20 * 1024 * 1024)
    files = [(f.name, f.content_type) for f in body.files]
    if body.include_request_json:
        files.append((keys.REQUEST_FILE, "application/json"))
    uploads = []
    for name, content_type in files:
        key = f"{prefix}{name}"
        form = aws().s3.generate_presigned_post(
            Bucket=_env("BUCKET_NAME"),
            Key=key,
            Fields={"Content-Type": content_type},
            Conditions=[
                ["starts-with", "$key", prefix],
                {"Content-Type": content_type},
                ["content-length-range", 1, max_bytes if name != keys.REQUEST_FILE else 16 * 1024],
            ],
            ExpiresIn=ttl,
        )
        uploads.append({"name": name, "key": key, "url": form["url"], "fields": form["fields"]})
    logger.append_keys(batch_id=batch_id)
    logger.info("upload forms issued", extra={"files": len(uploads)})
    metrics.add_metric(name="UploadBatchesCreated", unit=MetricUnit.Count, value=1)
    return {
        "batch_id": batch_id,
        "prefix": prefix,
        "expires_in": ttl,
        "max_bytes": max_bytes,
        "uploads": uploads,
    }


@app.get("/users/<user_id>/models", summary="The user's model versions and their status")
@tracer.capture_method
def list_models(user_id: str):
    models = [
        {
            "version": m.get("version"),
            "status": m.get("status"),
            "batch_id": m.get("batch_id"),
            "created_at": m.get("created_at"),
            "updated_at": m.get("updated_at"),
            "metrics": gen.from_dynamo(m.get("metrics")),
            "error": m.get("failure_error"),
        }
        for m in _user_models(user_id)
    ]
    for model in models:
        # The training job's quality loop: the published checkpoint's SFace similarity to the
        # batch's reference face (null when no validation image showed a face).
        metrics = model["metrics"] or {}
        model["identity_score"] = metrics.get("identity_score") if metrics.get("faces_found") else None
    latest = next((m["version"] for m in models if m["status"] == "READY"), None)
    return {"user_id": user_id, "latest_ready": latest, "models": models}


def _batches_table():
    return aws().dynamodb.Table(_env("BATCHES_TABLE"))


@app.get("/users/<user_id>/batches", summary="The user's training batches, newest first, with their stage")
@tracer.capture_method
def list_batches(user_id: str):
    rows = _query_all(_batches_table(), KeyConditionExpression=Key("user_id").eq(user_id))
    models = {m.get("version"): m for m in _user_models(user_id)}
    listed = []
    for row in rows:
        view = batches.view(row["batch_id"], row, models.get(row["batch_id"]), None, None)
        listed.append({"batch_id": row["batch_id"], "stage": view["stage"],
                       "created_at": row.get("created_at"), "updated_at": view["updated_at"]})
    listed.sort(key=lambda b: b["created_at"] or "", reverse=True)
    return {"user_id": user_id, "batches": listed}


@app.get(
    "/users/<user_id>/batches/<batch_id>",
    summary="Where a training batch stands: stage, place in the training queue, photo verdicts",
    responses={200: {"description": "status"}, 404: {"description": "no such batch for this user"}},
)
@tracer.capture_method
def get_batch(user_id: str, batch_id: str):
    row = _batches_table().get_item(Key={"user_id": user_id, "batch_id": batch_id}).get("Item")
    model = next(iter(_query_all(_models_table(), KeyConditionExpression=Key("user_id").eq(user_id)
                                 & Key("version").eq(batch_id))), None)
    place = None
    if row and row.get("stage") == batches.QUEUED and row.get("execution_arn"):
        queue = TrainingQueue(aws().dynamodb.Table(_env("QUEUE_TABLE")), _int_env("TRAINING_CONCURRENCY", 1),
                              60 * _int_env("TRAINING_ESTIMATE_MINUTES", 20))
        place = queue.place_of(row["execution_arn"])
    view = batches.view(batch_id, row, model, place, _int_env("TRAINING_STEPS", 0) or None)
    if view is None:
        raise NotFoundError("batch not found")
    return view


@app.post(
    "/users/<user_id>/generations",
    summary="Queue a generation on the async endpoint",
    responses={
        202: {"description": "queued: generation_id and status_url"},
        400: {"description": "bad body (field reasons)"},
        404: {"description": "model_version not found"},
        409: {"description": "model not READY / no READY model"},
        410: {"description": "the user was erased (DELETE /users/{user_id})"},
        429: {"description": "today's images are spent (Retry-After)"},
        503: {"description": "endpoint refused the request"},
    },
)
@tracer.capture_method
def create_generation(user_id: str, body: Annotated[GenerationBody, Body()]):
    _refuse_if_erased(user_id)
    _screen_toxicity(body.prompt)
    model = _pick_model(user_id, body.model_version)
    try:
        usage.take_images(_usage_table(), user_id, body.num_images, _quotas().images_per_day)
    except usage.QuotaExceeded as err:
        return _over_quota(err)
    generation_id = new_id()
    logger.append_keys(generation_id=generation_id)
    document = {
        "generation_id": generation_id,
        "user_id": user_id,
        "model_version": model["version"],
        **body.model_dump(exclude={"model_version"}),
    }
    document = {field: document[field] for field in gen.REQUEST_FIELDS}
    try:
        # requests/<id>.json, the PENDING row (before the call: a fast endpoint may notify
        # before InvokeEndpointAsync returns), the call, and where SageMaker will write.
        gen.queue_generation(
            s3=aws().s3, runtime=aws().runtime, table=_generations_table(), bucket=_env("BUCKET_NAME"),
            endpoint_name=_env("ENDPOINT_NAME"), document=document,
            ttl_days=_int_env("GENERATION_TTL_DAYS", 30),
        )
    except gen.NotQueued as err:
        logger.exception("InvokeEndpointAsync failed")
        metrics.add_metric(name="GenerationsNotQueued", unit=MetricUnit.Count, value=1)
        usage.give_back_images(_usage_table(), user_id, body.num_images)
        raise ServiceUnavailableError(
            "the generation endpoint did not accept the request; retry later"
        ) from err
    logger.info("generation queued", extra={"model_version": model["version"], "num_images": body.num_images})
    metrics.add_metric(name="GenerationsQueued", unit=MetricUnit.Count, value=1)
    metrics.add_metric(name="ImagesRequested", unit=MetricUnit.Count, value=body.num_images)
    return (
        {
            "generation_id": generation_id,
            "status": gen.PENDING,
            "model_version": model["version"],
            "status_url": _status_url(user_id, generation_id),
        },
        202,
    )


@app.get(
    "/users/<user_id>/generations/<generation_id>",
    summary="Status of a generation; presigned image URLs once COMPLETED",
    responses={200: {"description": "status"}, 404: {"description": "no such generation for this user"}},
)
@tracer.capture_method
def get_generation(user_id: str, generation_id: str):
    row = _generations_table().get_item(Key={"generation_id": generation_id}).get("Item")
    # Another user's generation answers exactly like a missing one.
    if not row or row.get("user_id") != user_id:
        raise NotFoundError("generation not found")
    view = {
        "generation_id": generation_id,
        "status": row.get("status"),
        "model_version": row.get("model_version"),
        "created_at": row.get("created_at"),
        "updated_at": row.get("updated_at"),
    }
    if row.get("status") == gen.COMPLETED:
        ttl = _int_env("IMAGE_URL_TTL_SECONDS", 900)
        # Only delivered images: a withheld one (output moderation) was never written or stored here.
        images = [_image_view(item, user_id, generation_id, ttl) for item in row.get("images", [])
                  if not item.get("withheld")]
        view["images"] = [i for i in images if i is not None]
        view["expires_in"] = ttl
        view["withheld"] = int(gen.from_dynamo(row.get("withheld")) or 0)
        view["output_moderation"] = row.get("output_moderation") or "not_moderated"
    elif row.get("status") == gen.FAILED:
        view["error"] = row.get("error") or "generation failed"
    return view


@app.delete(
    "/users/<user_id>",
    summary="Erase every object, row and email subscription of the user (idempotent)",
    description=(
        "Marks the user erased, then deletes in the background and sweeps again until work that was "
        "in flight (a generation, a training run) has drained. 202 with status_url (also in Location) "
        "while that runs; 204 once it is done. Until the erasure's tombstone expires (a day after it "
        "is done), uploads and generations for this user id answer 410."
    ),
    responses={
        202: {"description": "erasure under way: status_url"},
        204: {"description": "erased already; nothing pending"},
    },
)
@tracer.capture_method
def delete_user(user_id: str):
    timing = erasure.Timing.from_env(os.environ)
    outcome, mark = erasure.request(_erasures_table(), user_id, timing)
    if outcome == "done":
        return Response(status_code=204)
    # Every DELETE sends a pass at once: it starts the erasure, or restarts a chain of passes
    # that stopped (the erase_user function keeps one chain however many passes arrive).
    aws().sqs.send_message(QueueUrl=_env("ERASURE_QUEUE_URL"), MessageBody=json.dumps({"user_id": user_id}))
    logger.info("erasure requested", extra={"outcome": outcome})
    if outcome == "started":
        metrics.add_metric(name="ErasuresRequested", unit=MetricUnit.Count, value=1)
    status_url = _absolute_url(f"/users/{user_id}/deletion")
    return Response(
        status_code=202,
        content_type=content_types.APPLICATION_JSON,
        body={**erasure.view(user_id, mark), "status_url": status_url},
        headers={"Location": status_url},
    )


@app.get(
    "/users/<user_id>/deletion",
    summary="Progress of the user's erasure",
    responses={
        200: {"description": "PENDING (with what is still in flight) or DONE"},
        404: {"description": "no erasure was requested for this user (or its tombstone expired)"},
    },
)
@tracer.capture_method
def get_deletion(user_id: str):
    mark = erasure.get_mark(_erasures_table(), user_id)
    if mark is None:
        raise NotFoundError("no erasure was requested for this user")
    return erasure.view(user_id, mark)


def _today_view(user_id: str) -> dict:
    quotas = _quotas()
    day = usage.today(_usage_table(), user_id)
    return {
        "batches": {"used": day["batches"], "limit": quotas.batches_per_day},
        "images": {"used": day["images"], "limit": quotas.images_per_day},
        "resets_at": usage.next_day().isoformat(timespec="seconds"),
    }


def _usage_view(user_id: str) -> dict:
    table = _usage_table()
    rows = {p: table.get_item(Key={"user_id": user_id, "period": p}).get("Item")
            for p in (usage.month_key(), "total")}
    source = usage.prices()
    return {
        "user_id": user_id,
        "today": _today_view(user_id),
        "this_month": usage.view(rows[usage.month_key()]),
        "total": usage.view(rows["total"]),
        "cost_basis": {k: source[k] for k in ("source", "retrieved", "basis")},
    }


@app.get(
    "/users/<user_id>/usage",
    summary="The user's quotas today and metered usage (this month, all time) with an estimated cost",
)
@tracer.capture_method
def get_usage(user_id: str):
    return _usage_view(user_id)


ADMIN_PAGE_SIZE = 50


def _page_token(key: dict | None) -> str | None:
    return None if not key else base64.urlsafe_b64encode(json.dumps(key).encode()).decode()


def _start_key(token: str | None) -> dict | None:
    """A `next` token back into the Scan's ExclusiveStartKey; 400 unless it is one we made."""
    if not token:
        return None
    try:
        key = json.loads(base64.urlsafe_b64decode(token.encode()))
        if set(key) != {"user_id", "period"} or key["period"] != "total":
            raise ValueError("not a page token")
        validate_id(key["user_id"], "user_id")
    except (ValueError, TypeError, binascii.Error, InvalidIdError):
        raise FieldErrors([{"field": "query.next", "reason": "not a page token of this listing"}]) from None
    return key


@app.get(
    "/admin/users",
    summary="Admin (scope avatarflow/admin): every user with usage, with a usage line each",
    responses={200: {"description": "users and `next` (page token) while there are more"},
               403: {"description": "the token lacks the avatarflow/admin scope"}},
)
@tracer.capture_method
def admin_list_users():
    start = _start_key(app.current_event.get_query_string_value("next"))
    page = _usage_table().scan(
        FilterExpression=Attr("period").eq("total"), Limit=ADMIN_PAGE_SIZE,
        **({"ExclusiveStartKey": start} if start else {}),
    )
    users = [
        {"user_id": row["user_id"], "first_seen": row.get("first_seen"),
         "last_activity": row.get("updated_at"), "usage": usage.view(row)}
        for row in sorted(page.get("Items", []), key=lambda r: r["user_id"])
    ]
    metrics.add_metric(name="AdminCalls", unit=MetricUnit.Count, value=1)
    return {"users": users, "next": _page_token(page.get("LastEvaluatedKey"))}


@app.get(
    "/admin/users/<user_id>",
    summary="Admin (scope avatarflow/admin): one user's batches, models and usage",
    responses={403: {"description": "the token lacks the avatarflow/admin scope"}},
)
@tracer.capture_method
def admin_get_user(user_id: str):
    models = list_models(user_id)
    batches = [
        {"batch_id": m["batch_id"], "model_version": m["version"], "status": m["status"],
         "created_at": m["created_at"], "updated_at": m["updated_at"]}
        for m in models["models"]
    ]
    metrics.add_metric(name="AdminCalls", unit=MetricUnit.Count, value=1)
    return {**_usage_view(user_id), "batches": batches, "models": models["models"],
            "latest_ready": models["latest_ready"]}


# --------------------------------------------------------------------------- avatar packs


def _packs_table():
    return aws().dynamodb.Table(_env("PACKS_TABLE"))


def _catalogue() -> tuple[styles.Style, ...]:
    """The style catalogue the pack function uses: defaults plus the operator's config/styles.json."""
    return styles.load_from_bucket(aws().s3, _env("BUCKET_NAME"))


def _sign(key: str, ttl: int) -> str:
    return aws().s3.generate_presigned_url("get_object", Params={"Bucket": _env("BUCKET_NAME"), "Key": key},
                                           ExpiresIn=ttl)


@app.post(
    "/users/<user_id>/packs",
    summary="Make an avatar pack (styled avatars, the most like the user kept) with the newest READY model",
    responses={
        202: {"description": "queued: pack_id and status_url"},
        400: {"description": "bad body, or a style that is not in the catalogue"},
        409: {"description": "no READY model"},
        410: {"description": "the user was erased (DELETE /users/{user_id})"},
        429: {"description": "today's images are spent (Retry-After)"},
        503: {"description": "the operator's style catalogue does not validate"},
    },
)
@tracer.capture_method
def create_pack(user_id: str, body: Annotated[PackBody | None, Body()] = None):
    _refuse_if_erased(user_id)
    model = _pick_model(user_id, None)
    try:
        catalogue = _catalogue()
    except styles.CatalogueError:
        logger.exception("the style catalogue (config/styles.json) does not validate")
        raise ServiceUnavailableError("avatar packs are unavailable: the style catalogue is being fixed") \
            from None
    try:
        chosen = styles.pick(catalogue, body.styles if body else None, styles.MAX_STYLES)
    except styles.CatalogueError as err:
        raise FieldErrors([{"field": "body.styles", "reason": _clip(str(err))}]) from None
    # The pack's first round is len(chosen) generations of PACK_IMAGES_PER_STYLE images: they
    # come out of the same daily quota as POST .../generations (regeneration rounds do not).
    images = len(chosen) * min(_int_env("PACK_IMAGES_PER_STYLE", 4), packs.MAX_IMAGES_PER_STYLE)
    try:
        usage.take_images(_usage_table(), user_id, images, _quotas().images_per_day)
    except usage.QuotaExceeded as err:
        return _over_quota(err)
    pack_id = new_id()
    logger.append_keys(pack_id=pack_id)
    now = gen.utc_now()
    _packs_table().put_item(
        Item={
            "user_id": user_id, "pack_id": pack_id, "status": packs.PENDING,
            "model_version": model["version"], "styles": [s.name for s in chosen], "origin": "api",
            "created_at": now, "updated_at": now,
            "ttl": int((datetime.now(UTC) + timedelta(days=_int_env("GENERATION_TTL_DAYS", 30))).timestamp()),
        },
        ConditionExpression="attribute_not_exists(pack_id)",
    )
    try:
        aws().sfn.start_execution(
            stateMachineArn=_env("STATE_MACHINE_ARN"),
            name=execution_name(user_id, pack_id),
            input=json.dumps({"user_id": user_id, "version": model["version"], "pack": {"pack_id": pack_id}}),
        )
    except (BotoCoreError, ClientError):
        usage.give_back_images(_usage_table(), user_id, images)
        raise
    logger.info("pack requested", extra={"styles": len(chosen)})
    metrics.add_metric(name="PacksRequested", unit=MetricUnit.Count, value=1)
    return (
        {
            "pack_id": pack_id,
            "status": packs.PENDING,
            "model_version": model["version"],
            "styles_total": len(chosen),
            "status_url": _absolute_url(f"/users/{user_id}/packs/{pack_id}"),
        },
        202,
    )


def _interim_styles(row: dict) -> list[dict]:
    """Styles of a pack still being made: RUNNING while a generation of theirs is pending."""
    table = _generations_table()
    by_style: dict[str, list[str]] = {}
    for generation_id in row.get("generation_ids") or []:
        item = table.get_item(Key={"generation_id": generation_id}).get("Item") or {}
        if item.get("user_id") == row["user_id"] and item.get("style"):
            by_style.setdefault(item["style"], []).append(item.get("status"))
    views = []
    for name in row.get("styles") or []:
        found = by_style.get(name, [])
        status = "PENDING" if not found else ("RUNNING" if gen.PENDING in found else "COMPLETED")
        views.append({"name": name, "status": status, "images": []})
    return views


@app.get(
    "/users/<user_id>/packs/<pack_id>",
    summary="A pack: n of m styles done; once done, each style's kept images (presigned) with their scores",
    responses={200: {"description": "the pack"}, 404: {"description": "no such pack for this user"}},
)
@tracer.capture_method
def get_pack(user_id: str, pack_id: str):
    item = _packs_table().get_item(Key={"user_id": user_id, "pack_id": pack_id}).get("Item")
    if not item:
        raise NotFoundError("pack not found")
    row = gen.from_dynamo(item)
    ttl = _int_env("IMAGE_URL_TTL_SECONDS", 900)
    own = keys.user_prefix(keys.GENERATIONS, user_id)
    if row.get("result") is not None:
        views = []
        for outcome in row["result"]:
            view = {"name": outcome["name"], "status": outcome["status"], "images": [
                {"url": _sign(i["key"], ttl), "identity_similarity": i.get("identity_similarity"),
                 "seed": i.get("seed")}
                for i in packs.deliverable(outcome.get("images") or []) if i["key"].startswith(own)]}
            if outcome.get("error"):
                view["error"] = outcome["error"]
            views.append(view)
    else:
        views = _interim_styles(row)
    answer = {
        "pack_id": pack_id,
        "status": row.get("status"),
        "model_version": row.get("model_version"),
        "styles_done": sum(1 for v in views if v["status"] in ("COMPLETED", "FAILED")),
        "styles_total": len(row.get("styles") or []),
        "styles": views,
        "created_at": row.get("created_at"),
        "updated_at": row.get("updated_at"),
    }
    sheet = row.get("contact_sheet_key")
    if isinstance(sheet, str) and sheet.startswith(keys.pack_prefix(user_id, pack_id)):
        answer["contact_sheet_url"] = _sign(sheet, ttl)
        answer["expires_in"] = ttl
    if row.get("error"):
        answer["error"] = row["error"]
    return answer


@app.get("/users/<user_id>/packs", summary="The user's avatar packs, newest first")
@tracer.capture_method
def list_packs(user_id: str):
    rows = _query_all(_packs_table(), KeyConditionExpression=Key("user_id").eq(user_id))
    rows.sort(key=lambda r: (str(r.get("created_at", "")), str(r.get("pack_id", ""))), reverse=True)
    return {"packs": [
        {"pack_id": r["pack_id"], "status": r.get("status"), "created_at": r.get("created_at"),
         "updated_at": r.get("updated_at"), "model_version": r.get("model_version"),
         "styles_total": len(r.get("styles") or [])}
        for r in rows
    ]}


# --------------------------------------------------------------------------- entry points


def openapi_json() -> str:
    return app.get_openapi_json_schema(
        title="avatarflow API",
        version=__version__,
        description="Personal avatar generation: uploads, models, asynchronous generations.",
        security_schemes={"jwt": HTTPBearer(bearerFormat="JWT")},
        security=[{"jwt": []}],
    )


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP, clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event, context):
    return app.resolve(event, context)


if __name__ == "__main__":
    print(openapi_json())
