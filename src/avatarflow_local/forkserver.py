"""A warm interpreter for local training jobs: torch, diffusers, transformers and peft are
imported once, and each job runs in a fresh fork of that interpreter.

Why: a local training job (training_job.py) is a new Python process, as a SageMaker job is a
new container, and ~6 s of its ~10 s on the tiny model goes to importing the ML stack. The
fork keeps what matters of "a new process" (its own memory, environment, argv, stdout and
stderr, exit code, a pid that can be killed) and skips the imports. The job's program is the
same file (containers/training/train) run as __main__.

How: the server is a child process that imports the stack and then only forks. Each job is a
connection on a Unix socket carrying {"argv", "env"} and the job's stdout/stderr descriptors
(SCM_RIGHTS). The server forks a supervisor, which forks the job and reports
{"pid"} then {"returncode"} (negative for a signal, as subprocess does). The server itself
never waits, so jobs run concurrently. Jobs whose environment differs from the server's in
a variable read at import time (IMPORT_TIME_ENV_PREFIXES: HF_HUB_OFFLINE, OMP_NUM_THREADS,
PYTHONPATH, ...) use a server of their own; every other variable is set in the fork.

Turn it off with AVATARFLOW_LOCAL_WARM_TRAINING=0 (every job is then a plain subprocess).

Example:
    >>> proc = start(["/path/to/train"], env)          # doctest: +SKIP
    >>> proc.wait(timeout=60)                          # doctest: +SKIP
    0
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

WARM_ENV = "AVATARFLOW_LOCAL_WARM_TRAINING"
# Variables that the interpreter or the ML stack read while importing (threads, offline hub,
# paths): jobs that differ in any of them get a server of their own. Every other variable is
# the job's own, set in the fork before its program starts.
IMPORT_TIME_ENV_PREFIXES = ("PYTHON", "PATH", "LD_", "HOME", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "TORCH",
                            "PYTORCH_", "CUDA", "NVIDIA_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_",
                            "DIFFUSERS_", "TOKENIZERS_", "XDG_", "TMPDIR")
# What the training module imports lazily, in the order it needs them.
PRELOAD = (
    "numpy", "PIL.Image", "torch", "transformers", "peft", "diffusers",
    ("diffusers", ("AutoencoderKL", "DDPMScheduler", "UNet2DConditionModel", "DiffusionPipeline",
                   "StableDiffusionPipeline", "StableDiffusionXLPipeline", "DPMSolverMultistepScheduler")),
    ("transformers", ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer")),
    "diffusers.training_utils", "diffusers.utils", "peft.utils", "avatarflow.faces",
)


def enabled() -> bool:
    return os.environ.get(WARM_ENV, "1") != "0"


def _import_env(env: dict) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith(IMPORT_TIME_ENV_PREFIXES)))


class WarmProcess:
    """The part of subprocess.Popen that training_job.py uses: stdout, wait, kill."""

    def __init__(self, conn: socket.socket, stdout):
        self._conn = conn
        self._reader = conn.makefile("r")
        self.stdout = stdout
        self.returncode: int | None = None
        self.pid = int(json.loads(self._reader.readline())["pid"])
        self._done = threading.Event()
        threading.Thread(target=self._await_exit, name=f"warm-job-{self.pid}", daemon=True).start()

    def _await_exit(self) -> None:
        line = self._reader.readline()
        # A closed connection without a status means the supervisor died: report a kill.
        self.returncode = int(json.loads(line)["returncode"]) if line else -signal.SIGKILL
        self._conn.close()
        self._done.set()

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired("warm training job", timeout)
        return self.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


class _Server:
    """One warm interpreter (a child process) listening on a Unix socket."""

    def __init__(self, env: dict, preload=PRELOAD):
        self.folder = tempfile.mkdtemp(prefix="avatarflow-forkserver-")
        self.address = str(Path(self.folder) / "socket")
        command = [sys.executable, "-m", __name__, self.address, json.dumps(preload)]
        self.proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     text=True)
        ready = self.proc.stdout.readline()  # written once the imports are done and it listens
        if ready.strip() != "ready":
            raise RuntimeError(f"the training fork server did not start (exit {self.proc.poll()})")

    def start(self, argv: list[str], env: dict, stdout_fd: int, stderr_fd: int) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.address)
        request = json.dumps({"argv": argv, "env": env, "cwd": os.getcwd()}).encode() + b"\n"
        socket.send_fds(conn, [request], [stdout_fd, stderr_fd])
        return conn

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(self.address)
            os.rmdir(self.folder)


_servers: dict[tuple, _Server] = {}
_servers_lock = threading.Lock()


def _server_for(env: dict) -> _Server:
    key = _import_env(env)
    with _servers_lock:
        server = _servers.get(key)
        if server is None or server.proc.poll() is not None:
            server = _servers[key] = _Server({k: v for k, v in key})
        return server


def warm_up(env: dict | None = None) -> None:
    """Start the server for `env` (default: this process's) in the background, so the
    imports overlap with whatever runs before the first training job."""
    if enabled():
        env = dict(os.environ if env is None else env)
        threading.Thread(target=_server_for, args=(env,), name="forkserver-warm-up", daemon=True).start()


def start(argv: list[str], env: dict, stderr) -> WarmProcess:
    """Run `argv[0]` (a Python file) as __main__ in a fork of a warm interpreter whose
    environment matches `env`; stdout is a text pipe (like Popen(stdout=PIPE, text=True)),
    stderr goes to the file object `stderr`."""
    server = _server_for(env)
    read_fd, write_fd = os.pipe()
    try:
        conn = server.start(argv, env, write_fd, stderr.fileno())
    finally:
        os.close(write_fd)  # the job holds its own copy now
    return WarmProcess(conn, os.fdopen(read_fd, "r", buffering=1))


@atexit.register
def _close_all() -> None:
    with _servers_lock:
        for server in _servers.values():
            server.close()
        _servers.clear()


# --------------------------------------------------------------------------- the server side


def _preload(modules) -> None:
    for item in modules:
        name, attributes = (item, ()) if isinstance(item, str) else item
        with contextlib.suppress(ImportError):
            module = importlib.import_module(name)
            for attribute in attributes:
                getattr(module, attribute)  # diffusers/transformers load classes lazily


def _run_job(request: dict, stdout_fd: int, stderr_fd: int) -> None:
    """In the forked job: become the job's process, run its program, exit with its code."""
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = list(request["argv"])
    sys.path.insert(0, str(Path(sys.argv[0]).resolve().parent))
    code = 0
    try:
        import runpy

        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - a job's uncaught error is its exit code 1, as in python
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _supervise(conn: socket.socket) -> None:
    """In the forked supervisor: fork the job, report its pid and then its exit status."""
    message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
    request = json.loads(message)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run_job(request, fds[0], fds[1])
    for fd in fds:
        os.close(fd)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    conn.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
    os._exit(0)


def serve(address: str, preload) -> None:
    _preload(preload)
    # Anything the imports left in Python's buffers would be flushed again by every fork.
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(16)
    listener.settimeout(1.0)
    parent = os.getppid()
    print("ready", flush=True)
    while os.getppid() == parent:  # the process that started it is gone: so is the server
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the supervisor waits for its job
            _supervise(conn)
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1], json.loads(sys.argv[2]))
