"""DynamoDB's per-item atomicity, which moto lacks.

DynamoDB applies a conditional write atomically: two UpdateItem calls racing for the last
unit of a quota (`attribute_not_exists(images) OR images <= :room`) cannot both succeed.
moto evaluates the condition and then writes the item in plain Python, with no lock, so two
threads can both read the old value and both pass. The local proof must fail wherever AWS
would, and must not pass where AWS would refuse: `install()` runs moto's item writes
(PutItem, UpdateItem, DeleteItem, TransactWriteItems, BatchWriteItem) one at a time, which is
what DynamoDB guarantees per item (stricter across items, which no test relies on)."""

from __future__ import annotations

import functools
import threading

from moto.dynamodb.models import DynamoDBBackend

WRITES = ("put_item", "update_item", "delete_item", "transact_write_items", "batch_write_item")
_LOCK = threading.RLock()
_MARK = "_avatarflow_atomic"


def install() -> None:
    """Idempotent: wraps each write method of moto's DynamoDB backend once."""
    for name in WRITES:
        method = getattr(DynamoDBBackend, name)
        if getattr(method, _MARK, False):
            continue

        def locked(*args, __method=method, **kwargs):
            with _LOCK:
                return __method(*args, **kwargs)

        functools.update_wrapper(locked, method)
        setattr(locked, _MARK, True)
        setattr(DynamoDBBackend, name, locked)
