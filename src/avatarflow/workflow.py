"""Names shared by the training workflow's parts: the execution name of a batch and the
notification events (SNS message attribute `event`)."""

import hashlib
import re

from avatarflow import moderation
from avatarflow.ids import validate_id

MODEL_READY = "MODEL_READY"
MODEL_REJECTED = "MODEL_REJECTED"
MODEL_FAILED = "MODEL_FAILED"
# The batch passed intake but every training slot is taken: it waits (functions/training_queue).
MODEL_QUEUED = "MODEL_QUEUED"
PACK_READY = "PACK_READY"
EVENTS = (MODEL_READY, MODEL_REJECTED, MODEL_FAILED, MODEL_QUEUED, PACK_READY)

# One batch is at most MAX_BATCH_PHOTOS photos plus request.json. The API's upload route
# hands out forms for at most that many photos per batch; the state machine's listing reads
# MAX_BATCH_FILES keys (ListUploads MaxKeys, tests/test_batch_endings.py checks they agree),
# and build_dataset uses at most MAX_BATCH_PHOTOS photos: files past the limit are ignored
# and the email names them.
MAX_BATCH_PHOTOS = 30
MAX_BATCH_FILES = MAX_BATCH_PHOTOS + 1  # + request.json
# How many ignored file names the state machine fetches (a second listing page) to name them.
MAX_IGNORED_LISTED = 100

# Registry row status values (DynamoDB attribute `status`).
TRAINING = "TRAINING"
READY = "READY"
FAILED = "FAILED"


def execution_name(user_id: str, batch_id: str) -> str:
    """One name per (user, batch), at most 80 characters ([A-Za-z0-9_-]).

    A hash of the exact pair keeps names distinct where plain concatenation would not
    ("a-b"/"c" vs "a"/"b-c") and where long ids must be shortened."""
    validate_id(user_id, "user_id")
    validate_id(batch_id, "batch_id")
    digest = hashlib.sha256(f"{user_id}/{batch_id}".encode()).hexdigest()[:16]
    return f"{user_id[:28]}-{batch_id[:28]}-{digest}"


def execution_input(user_id: str, batch_id: str) -> dict:
    """Deterministic: the same batch always starts with the same input, so StartExecution
    with the same name is idempotent while the run is in progress."""
    return {"user_id": validate_id(user_id, "user_id"), "batch_id": validate_id(batch_id, "batch_id")}


# What a user may choose in request.json for training (design.md: {"token", "subject_class"}).
# Both end up inside every prompt, so they are checked against a tight pattern / list and the
# prompt policy (avatarflow.moderation). "child" is not a class: prompts may not ask for one,
# and photos whose face may be a minor's are rejected at intake (preprocess_image).
DEFAULT_TOKEN = "sks"  # noqa: S105 - the DreamBooth identifier token, not a secret
DEFAULT_SUBJECT_CLASS = "person"
SUBJECT_CLASSES = ("person", "man", "woman", "boy", "girl")
TOKEN_PATTERN = re.compile(r"^[a-z]{3,12}$")


def training_subject(request: object) -> tuple[dict, list[str]]:
    """request.json -> the token/class/prompts the training job uses, plus the problems found.

    A bad value never stops the batch: it falls back to the default and is reported, so the
    user learns why their token was not used."""
    request = request if isinstance(request, dict) else {}
    issues = []
    token = request.get("token", DEFAULT_TOKEN)
    if not (isinstance(token, str) and TOKEN_PATTERN.fullmatch(token)):
        issues.append(f"token must be 3-12 lowercase letters; using '{DEFAULT_TOKEN}'")
        token = DEFAULT_TOKEN
    subject_class = request.get("subject_class", DEFAULT_SUBJECT_CLASS)
    if subject_class not in SUBJECT_CLASSES:
        allowed = ", ".join(SUBJECT_CLASSES)
        issues.append(f"subject_class must be one of {allowed}; using '{DEFAULT_SUBJECT_CLASS}'")
        subject_class = DEFAULT_SUBJECT_CLASS
    if token != DEFAULT_TOKEN and moderation.blocked_terms(token):
        issues.append(f"token is a word that prompts may not contain; using '{DEFAULT_TOKEN}'")
        token = DEFAULT_TOKEN
    if subject_class != DEFAULT_SUBJECT_CLASS and moderation.blocked_terms(subject_class):
        issues.append(f"subject_class is a word prompts may not contain; using '{DEFAULT_SUBJECT_CLASS}'")
        subject_class = DEFAULT_SUBJECT_CLASS
    if token == subject_class:
        issues.append(f"token must differ from the subject class; using '{DEFAULT_TOKEN}'")
        token = DEFAULT_TOKEN
    subject = {
        "token": token,
        "subject_class": subject_class,
        "instance_prompt": f"a photo of {token} {subject_class}",
        "class_prompt": f"a photo of a {subject_class}",
    }
    return subject, issues
