"""SageMaker serving contract over the engine: GET /ping, POST /invocations (port 8080).

gunicorn runs `inference_server:create_app()` in one gthread worker per GPU with a few
threads (see inference_gunicorn_conf.py): each worker holds one pipeline, `Engine.run`
lets one generation at a time into it, and the other threads answer GET /ping meanwhile
(SageMaker's health check gives up after 2 s).
Errors are JSON with a stable `error` code; the server keeps serving after any of them.
"""

from __future__ import annotations

import os

from adapter_cache import AdapterInvalid, AdapterNotFound
from flask import Flask, Response, jsonify, request
from inference_engine import Engine, RequestInvalid, UserErased, logger, parse_request

MAX_BODY_BYTES = 64 * 1024  # a request is a few hundred bytes of JSON
# No real generation (8 images, 80 steps, SDXL) comes near this: past it the GPU or the
# pipeline is stuck, and /ping says so, so that SageMaker replaces the instance.
DEFAULT_STUCK_AFTER_S = 900.0


def create_app(engine: Engine | None = None, stuck_after_s: float | None = None) -> Flask:
    engine = engine if engine is not None else Engine.from_env()
    if stuck_after_s is None:
        stuck_after_s = float(os.environ.get("AVATARFLOW_STUCK_AFTER_S", DEFAULT_STUCK_AFTER_S))
    app = Flask("avatarflow-inference")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.extensions["avatarflow_engine"] = engine

    @app.get("/ping")
    def ping() -> tuple[Response, int]:
        # The base model is loaded before the app exists, so being here means ready; busy with
        # a generation is healthy too. Never waits on the engine's lock.
        busy_for = engine.busy_for()
        if busy_for is not None and busy_for > stuck_after_s:
            logger.error("generation stuck", extra={"busy_for_s": round(busy_for)})
            return jsonify(
                status="unhealthy", busy=True, message=f"one generation has run for {busy_for:.0f} s"
            ), 503
        return jsonify(status="healthy", busy=busy_for is not None), 200

    @app.post("/invocations")
    def invocations() -> tuple[Response, int]:
        # SageMaker async hands over the raw content of requests/<id>.json; do not rely
        # on the content type it was uploaded with.
        try:
            req = parse_request(request.get_data(cache=False))
        except RequestInvalid as err:
            logger.info("request rejected", extra={"fields": sorted(err.fields)})
            return jsonify(error="invalid_request", message=str(err), fields=err.fields), 400
        ids = {"generation_id": req.generation_id, "user_id": req.user_id, "model_version": req.model_version}
        try:
            return jsonify(engine.run(req)), 200
        except RequestInvalid as err:  # found once the model is known: a prompt over the token limit
            logger.info("request rejected", extra={**ids, "fields": sorted(err.fields)})
            return jsonify(error="invalid_request", message=str(err), fields=err.fields, **ids), 400
        except AdapterNotFound as err:
            logger.info("model not found", extra=ids)
            return jsonify(error="model_not_found", message=str(err), **ids), 404
        except AdapterInvalid as err:
            logger.warning("model unusable", extra={**ids, "reason": str(err)})
            return jsonify(error="model_invalid", message=str(err), **ids), 422
        except UserErased as err:
            # No ids in the body: SageMaker keeps it as the failure object of an erased user.
            logger.info("user erased: nothing generated", extra={"generation_id": req.generation_id})
            return jsonify(error="user_erased", message=str(err)), 410
        except Exception:
            logger.exception("generation failed", extra=ids)
            return jsonify(
                error="internal_error", message="generation failed; see the container log", **ids
            ), 500

    @app.errorhandler(413)
    def too_large(_err) -> tuple[Response, int]:
        return jsonify(
            error="invalid_request",
            message=f"body larger than {MAX_BODY_BYTES} bytes",
            fields={"body": "too large"},
        ), 413

    @app.errorhandler(404)
    def not_found(_err) -> tuple[Response, int]:
        return jsonify(error="not_found", message="routes: GET /ping, POST /invocations"), 404

    @app.errorhandler(405)
    def not_allowed(_err) -> tuple[Response, int]:
        return jsonify(error="method_not_allowed", message="routes: GET /ping, POST /invocations"), 405

    return app
