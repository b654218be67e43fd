"""Test helper (run in .venv-ops, never shipped): runs operator CLI commands through
avatarflow_ops.cli.main() one after another in ONE interpreter, so a test module pays for the
sagemaker-core import once instead of once per command (5-8 s each).

Protocol: one JSON array of CLI arguments per line on stdin; one JSON object per line back,
{"returncode", "stdout", "stderr"}: what the command printed, and its exit status (argparse's
SystemExit included), as `python -m avatarflow_ops ARGS` would give them. The answers go to
the process's original stdout; anything written to file descriptor 1 behind Python's back
goes to stderr, so it cannot corrupt an answer."""

import contextlib
import io
import json
import os
import sys

from avatarflow_ops.cli import main


def run(argv: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse: usage errors, --help
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except Exception as error:  # noqa: BLE001 - an uncaught error is the command's outcome
            print(f"Traceback: {type(error).__name__}: {error}", file=sys.stderr)
            code = 1
    return {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def serve() -> None:
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        if line.strip():
            answers.write(json.dumps(run(json.loads(line))) + "\n")
            answers.flush()


if __name__ == "__main__":
    serve()
