"""gunicorn settings for `serve`: one worker process per GPU, each holding one pipeline on its
own GPU. The app is not preloaded: each worker imports torch and loads the model after fork.

Each worker is a gthread worker with a few threads, not a one-thread sync worker: SageMaker's
health check gives up on GET /ping after 2 s, and a sync worker answers nothing while a
generation (seconds to minutes) runs, so the instance would be taken for dead. The pipeline
is not thread-safe: `Engine.run` serializes generations on a lock (one at a time per GPU);
/ping never takes it. Keep the endpoint's MaxConcurrentInvocationsPerInstance below `threads`
(tests/test_deploy_contracts.py checks it) so that, even with every invocation waiting on one
worker's lock, a thread is left for /ping.
"""

import os
import shutil
import subprocess


def _gpu_count() -> int:
    # Count without importing torch in the arbiter: CUDA must not be initialised before fork.
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


GPUS = _gpu_count()
bind = f"0.0.0.0:{os.environ.get('SAGEMAKER_BIND_TO_PORT', '8080')}"
workers = int(os.environ.get("AVATARFLOW_WORKERS") or max(GPUS, 1))
worker_class = "gthread"
threads = int(os.environ.get("AVATARFLOW_THREADS", "4"))
# gthread workers heartbeat from their main loop, so `timeout` only bounds the model load at
# boot (far longer than gunicorn's default 30 s); a generation stuck past
# AVATARFLOW_STUCK_AFTER_S makes /ping answer 503 instead (inference_server.py).
timeout = int(os.environ.get("AVATARFLOW_WORKER_TIMEOUT", "900"))
graceful_timeout = 60
keepalive = 5
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("AVATARFLOW_LOG_LEVEL", "info")
wsgi_app = "inference_server:create_app()"


def pre_fork(server, worker):
    # Give the new worker the lowest GPU index no live worker holds (restarts reuse it).
    taken = {getattr(w, "gpu", None) for w in server.WORKERS.values()}
    worker.gpu = next(i for i in range(max(GPUS, 1) + len(taken) + 1) if i not in taken)


def post_fork(server, worker):
    if GPUS:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(worker.gpu % GPUS)
    server.log.info("worker %s on GPU %s", worker.pid, os.environ.get("CUDA_VISIBLE_DEVICES", "none"))
