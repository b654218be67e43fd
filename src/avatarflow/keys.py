"""The S3 layout of design.md, in one place. Every key the system reads or writes is built
or parsed here, so a prefix is never spelled twice."""

from dataclasses import dataclass
from urllib.parse import unquote_plus

from avatarflow.ids import InvalidIdError, validate_id

UPLOADS = "uploads/"
DATASETS = "datasets/"
TRAINING = "training/"
MODELS = "models/"
REQUESTS = "requests/"
GENERATIONS = "generations/"
PACKS = "packs/"
# The operator's own pack styles (avatarflow.styles): not user data, read by the pack function.
STYLES_OBJECT = "config/styles.json"

REQUEST_FILE = "request.json"
MANIFEST_FILE = "manifest.json"
ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER_CONFIG = "adapter.json"
RESULT_FILE = "result.json"

# Prefixes that hold one user's data, for deletion and isolation checks.
USER_PREFIXES = (UPLOADS, DATASETS, MODELS, GENERATIONS, PACKS)

# Where the async endpoint writes its responses (S3OutputPath / S3FailurePath). SageMaker
# names these objects itself (<uuid>.out), so they are found through the generation row.
ASYNC_OUTPUT = "async-output/"
ASYNC_FAILURES = "async-failures/"

# How long each prefix that holds user data keeps what nobody deletes, in days: the bucket's
# lifecycle rules (template.yaml) say the same, the backstop behind DELETE /users/{user_id}
# (tests/test_erasure.py checks they agree and that no prefix is left out). None: no expiry,
# for the reason in KEPT_UNTIL_ERASURE.
RETENTION_DAYS: dict[str, int | None] = {
    UPLOADS: 30,  # raw photos: only read while their batch is processed
    DATASETS: 30,  # crops and manifest: only read by the training job
    TRAINING: 30,  # SageMaker output and spot checkpoints; the adapter is copied to models/
    MODELS: None,
    REQUESTS: 7,  # a generation's input: read once by the endpoint
    GENERATIONS: 30,  # images: the generation row (and its GET) lives 30 days (GENERATION_TTL_DAYS)
    PACKS: 30,  # pack manifest and contact sheet: as long as the pack's images (generations/)
    ASYNC_OUTPUT: 7,  # the endpoint's response: read once by on_generation_done
    ASYNC_FAILURES: 7,  # error bodies: read by nobody but an operator debugging
}
KEPT_UNTIL_ERASURE = {
    MODELS: "a user's trained adapter is what they generate with, for as long as they use the "
            "service: it must not vanish under them; it goes with DELETE /users/{user_id}",
}


class InvalidKeyError(ValueError):
    """An S3 key outside the layout (wrong prefix, bad ids, traversal, nested folders)."""


@dataclass(frozen=True)
class UploadKey:
    user_id: str
    batch_id: str
    name: str

    @property
    def is_request(self) -> bool:
        return self.name == REQUEST_FILE


def upload_prefix(user_id: str, batch_id: str) -> str:
    return f"{UPLOADS}{validate_id(user_id, 'user_id')}/{validate_id(batch_id, 'batch_id')}/"


def parse_upload_key(key: str, *, url_encoded: bool = False) -> UploadKey:
    """Split `uploads/<user_id>/<batch_id>/<name>`. S3 event notifications deliver keys
    URL-encoded (spaces as '+'): pass url_encoded=True for those."""
    if url_encoded:
        key = unquote_plus(key)
    parts = key.split("/")
    if len(parts) != 4 or parts[0] + "/" != UPLOADS:
        raise InvalidKeyError("expected uploads/<user_id>/<batch_id>/<file name>")
    _, user_id, batch_id, name = parts
    try:
        validate_id(user_id, "user_id")
        validate_id(batch_id, "batch_id")
    except InvalidIdError as err:
        raise InvalidKeyError(str(err)) from err
    if not name or name in (".", "..") or name.startswith(".") or "\\" in name or len(name) > 255:
        raise InvalidKeyError("file name must be a plain, visible name")
    return UploadKey(user_id, batch_id, name)


def dataset_prefix(user_id: str, batch_id: str) -> str:
    return f"{DATASETS}{validate_id(user_id, 'user_id')}/{validate_id(batch_id, 'batch_id')}/"


def crop_key(user_id: str, batch_id: str, index: int) -> str:
    return f"{dataset_prefix(user_id, batch_id)}images/{index:03d}.png"


def manifest_key(user_id: str, batch_id: str) -> str:
    return f"{dataset_prefix(user_id, batch_id)}{MANIFEST_FILE}"


def model_prefix(user_id: str, version: str) -> str:
    return f"{MODELS}{validate_id(user_id, 'user_id')}/{validate_id(version, 'model_version')}/"


def request_key(generation_id: str) -> str:
    return f"{REQUESTS}{validate_id(generation_id, 'generation_id')}.json"


def generation_prefix(user_id: str, generation_id: str) -> str:
    return f"{GENERATIONS}{validate_id(user_id, 'user_id')}/{validate_id(generation_id, 'generation_id')}/"


def result_key(user_id: str, generation_id: str) -> str:
    return f"{generation_prefix(user_id, generation_id)}{RESULT_FILE}"


def pack_prefix(user_id: str, pack_id: str) -> str:
    return f"{PACKS}{validate_id(user_id, 'user_id')}/{validate_id(pack_id, 'pack_id')}/"


def pack_manifest_key(user_id: str, pack_id: str) -> str:
    return f"{pack_prefix(user_id, pack_id)}{MANIFEST_FILE}"


def contact_sheet_key(user_id: str, pack_id: str) -> str:
    return f"{pack_prefix(user_id, pack_id)}contact_sheet.png"


def user_prefix(prefix: str, user_id: str) -> str:
    """`<prefix><user_id>/` for one of USER_PREFIXES; the trailing slash keeps user "ab"
    from matching user "abc"."""
    if prefix not in USER_PREFIXES:
        raise InvalidKeyError(f"{prefix!r} is not a per-user prefix")
    return f"{prefix}{validate_id(user_id, 'user_id')}/"


def training_prefix(job_name: str) -> str:
    """`training/<job_name>/`: SageMaker's output (model.tar.gz) and spot checkpoints of a job."""
    return f"{TRAINING}{validate_id(job_name, 'training_job')}/"
