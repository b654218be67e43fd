"""Names shared by the training workflow's parts: the execution name of a batch and the
notification events (SNS message attribute `event`)."""

import hashlib

from avatarflow.ids import validate_id

MODEL_READY = "MODEL_READY"
MODEL_REJECTED = "MODEL_REJECTED"
MODEL_FAILED = "MODEL_FAILED"
EVENTS = (MODEL_READY, MODEL_REJECTED, MODEL_FAILED)

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
