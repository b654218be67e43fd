"""A gunicorn app for tests/test_inference.py: the production app (`create_app` over the real
`Engine.from_env()`, served with containers/inference/inference_gunicorn_conf.py) with a probe
around the UNet, so a test can see what happens inside the worker:

- every UNet forward (one per denoising step) first sleeps `AVATARFLOW_PROBE_STEP_S` seconds,
  so a generation on the tiny model lasts as long as a real one would (seconds, not ms);
- it counts how many threads are inside the UNet at once, and how many /invocations requests
  are in the worker at once; `GET /probe` returns the counts.

Test-only: it lives under tests/, and the image copies only containers/inference, so the
production server has no test hook.
"""

from __future__ import annotations

import os
import threading
import time

from flask import Flask, jsonify, request
from inference_engine import Engine
from inference_server import create_app


class Probe:
    """Thread-safe counters of the worker's concurrency."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_model = 0
        self.max_in_model = 0
        self.model_calls = 0
        self.requests = 0
        self.max_requests = 0

    def enter_model(self) -> None:
        with self._lock:
            self.in_model += 1
            self.model_calls += 1
            self.max_in_model = max(self.max_in_model, self.in_model)

    def leave_model(self) -> None:
        with self._lock:
            self.in_model -= 1

    def request_started(self) -> None:
        with self._lock:
            self.requests += 1
            self.max_requests = max(self.max_requests, self.requests)

    def request_ended(self) -> None:
        with self._lock:
            self.requests -= 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                "in_model": self.in_model,
                "max_in_model": self.max_in_model,
                "model_calls": self.model_calls,
                "requests": self.requests,
                "max_requests": self.max_requests,
            }


def create_probe_app() -> Flask:
    """The real app and engine, with the UNet's forward wrapped by the probe."""
    engine = Engine.from_env()
    probe = Probe()
    delay = float(os.environ.get("AVATARFLOW_PROBE_STEP_S", "0"))
    unet = engine.pipe.unet
    forward = unet.forward

    def probed_forward(*args, **kwargs):
        probe.enter_model()
        try:
            time.sleep(delay)
            return forward(*args, **kwargs)
        finally:
            probe.leave_model()

    unet.forward = probed_forward  # nn.Module.__call__ looks forward up on the instance
    app = create_app(engine)

    @app.before_request
    def _count_in() -> None:
        if request.path == "/invocations":
            probe.request_started()

    @app.teardown_request
    def _count_out(_exc) -> None:
        if request.path == "/invocations":
            probe.request_ended()

    @app.get("/probe")
    def stats():
        return jsonify(probe.snapshot())

    return app
