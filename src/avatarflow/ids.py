"""Identifier validation: user and batch ids reach execution names, S3 keys and logs only
after passing here (design.md: `^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$`)."""

import re
import uuid

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class InvalidIdError(ValueError):
    """An id that does not match ID_PATTERN. The message never echoes the raw value."""

    def __init__(self, field: str):
        super().__init__(f"{field} must match {ID_PATTERN.pattern}")
        self.field = field


def validate_id(value: object, field: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise InvalidIdError(field)
    return value


def new_id() -> str:
    """A fresh id that satisfies ID_PATTERN (generation ids, model versions)."""
    return uuid.uuid4().hex
