"""Where moto's DynamoDB is laxer than DynamoDB under concurrency, made as strict.

DynamoDB applies each request atomically: a conditional UpdateItem or a TransactWriteItems
sees the item as no other request leaves it halfway, and a read never sees half of a write.
moto's backend mutates shared dicts without a lock, so concurrent requests from the state
machine's threads can interleave: two `count < limit` conditions both pass and the training
queue's semaphore admits one job too many (make bench-queue saw 5 jobs under a limit of 4), a
read sees an item whose attributes are still being set, and a response being serialised
while another request mutates the item raises "dictionary changed size during iteration".
`install()` serialises every DynamoDB request (the backend call and its response) with one
lock, which is what DynamoDB's per-item atomicity guarantees for the requests this project
makes. atomic_items (issue 19) locks the backend's writes; this lock is taken first, around
the whole request, so reads and response serialisation are covered too and the two locks are
always taken in the same order. Idempotent; installed by workflow_stack.create_local_stack."""

from __future__ import annotations

import functools
import threading

_LOCK = threading.RLock()
_MARK = "_avatarflow_serialised"


def install() -> None:
    from moto.dynamodb.responses import DynamoHandler

    original = DynamoHandler.call_action
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def call_action(self, *args, **kwargs):
        with _LOCK:
            return original(self, *args, **kwargs)

    setattr(call_action, _MARK, True)
    DynamoHandler.call_action = call_action
