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
always taken in the same order.

Task tokens: Step Functions answers SendTaskSuccess/Failure for a token whose task is already
closed (it succeeded, failed -- its Lambda invocation too --, timed out, or already received
its outcome) with TaskTimedOut ("the task associated with the token has already been
closed"). moto keeps every token's endpoint and silently accepts a late outcome, so a grant
sent to a task that had failed would look delivered. `install()` marks a token closed once
its task's evaluation ends, however it ends, or once it has an outcome, and answers a later
outcome with TaskTimedOut, as AWS does.

Stopped executions: StopExecution ends an execution ABORTED on AWS, whatever its running task
does afterwards. moto's interpreter lets a later error of the interrupted task (a Lambda
invocation still in flight when the stop came) overwrite the stopped state, and the
execution reads FAILED; here a stopped execution stays ABORTED.

Idempotent; installed by workflow_stack.create_local_stack."""

from __future__ import annotations

import functools
import threading

_LOCK = threading.RLock()
_MARK = "_avatarflow_serialised"


def install() -> None:
    _serialise_dynamodb()
    _close_finished_task_tokens()
    _stopped_stays_aborted()


def _serialise_dynamodb() -> None:
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


def _task_timed_out(message: str) -> Exception:
    from moto.core.exceptions import AWSError

    class TaskTimedOut(AWSError):
        TYPE = "TaskTimedOut"
        STATUS = 400

    return TaskTimedOut(message)


def _close_finished_task_tokens() -> None:
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service import (
        state_task_service_callback as service,
    )
    from moto.stepfunctions.parser.asl.eval.callback import callback

    original_body = service.StateTaskServiceCallback._eval_body
    if getattr(original_body, _MARK, False):
        return
    original_notify = callback.CallbackPoolManager.notify

    @functools.wraps(original_body)
    def eval_body(self, env) -> None:
        pool = env.callback_pool_manager._pool
        before = set(pool)
        try:
            original_body(self, env)
        finally:  # the task is over, however it ended: its token is closed
            for token in set(pool) - before:
                pool[token]._avatarflow_closed = True

    # Raised here, not as moto's CallbackNotifyConsumerError: moto maps that one to
    # TaskDoesNotExist() without its required message (a TypeError, an HTTP 500), and its own
    # TaskTimedOut reaches the client without an error code.
    @functools.wraps(original_notify)
    def notify(self, callback_id, outcome) -> bool:
        endpoint = self._pool.get(callback_id, None)
        if endpoint is not None and endpoint.consumer_error is None and (
                getattr(endpoint, "_avatarflow_closed", False) or endpoint.get_outcome() is not None):
            raise _task_timed_out("Task Timed Out: the task for this token has already been closed")
        return original_notify(self, callback_id, outcome)

    setattr(eval_body, _MARK, True)
    service.StateTaskServiceCallback._eval_body = eval_body
    callback.CallbackPoolManager.notify = notify


def _stopped_stays_aborted() -> None:
    from moto.stepfunctions.parser.asl.eval.environment import Environment
    from moto.stepfunctions.parser.asl.eval.program_state import ProgramStopped

    original = Environment.set_error
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def set_error(self, error) -> None:
        with self._state_mutex:  # reentrant: the original takes it again
            if not isinstance(self._program_state, ProgramStopped):
                original(self, error)

    setattr(set_error, _MARK, True)
    Environment.set_error = set_error
