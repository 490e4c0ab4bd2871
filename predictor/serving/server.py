"""Start the predictor: ``recsys serve`` (and the container's entrypoint).

KServe's ModelServer owns the HTTP server; this module only prepares what it cannot be told by argument:
request-size limit, HTTP 400 for requests FastAPI rejects before our code sees them, cheap client errors
(one INFO line and a counter, where KServe logs a traceback at ERROR), the background tasks' lifetime,
quiet per-request logging, and a frozen heap.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import time
import warnings

from predictor.config import Settings
from predictor.serving import metrics
from predictor.serving.model import RecommenderModel
from predictor.serving.settings import ServeSettings

log = logging.getLogger(__name__)
LOGGED_CHARS = 300  # of a client error's message and path: the response carries it whole


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log collectors (Loki, Cloud Logging, ELK) parse without rules."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def logging_config(level: str = "INFO") -> dict:
    """KServe-compatible dictConfig: JSON lines; per-request lines (uvicorn access log, KServe's timing
    trace) only at DEBUG, since four log lines per request cost more than the request itself."""
    per_request = "DEBUG" if level.upper() == "DEBUG" else "WARNING"
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"json": handler},
        "root": {"handlers": ["json"], "level": level.upper()},
        "loggers": {
            "kserve": {"handlers": ["json"], "level": level.upper(), "propagate": False},
            "kserve.trace": {"handlers": ["json"], "level": per_request, "propagate": False},
            "uvicorn": {"handlers": ["json"], "level": "INFO", "propagate": False},
            "uvicorn.access": {"handlers": ["json"], "level": per_request, "propagate": False},
        },
    }


def _short(text: str) -> str:
    return text if len(text) <= LOGGED_CHARS else text[:LOGGED_CHARS] + "..."


def client_error(request, status: int, reason: str, message: str) -> None:
    """What a 4xx costs the server: one INFO line, no traceback, and ``recsys_client_errors_total``."""
    metrics.CLIENT_ERRORS.labels(reason=reason).inc()
    log.info(
        "client error %d (%s) on %s %s: %s",
        status,
        reason,
        request.method,
        _short(request.url.path),
        _short(message),
    )


def invalid_input_reason(exc: Exception) -> str:
    kind = getattr(exc, "kind", None)  # requests.BadRequest
    if kind in metrics.CLIENT_ERROR_REASONS:
        return kind
    # KServe's own: the V1 body did not decode as JSON
    return "bad_json" if str(exc).startswith("Unrecognized request format") else "bad_field"


def client_error_handlers() -> dict:
    """Exception handlers for every 4xx: the same status and body as KServe's and Starlette's, without their
    ERROR-level traceback."""
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from kserve.errors import InvalidInput, ModelNotFound
    from starlette.exceptions import HTTPException

    async def invalid_input(request, exc: InvalidInput):
        client_error(request, 400, invalid_input_reason(exc), str(exc))
        return JSONResponse(status_code=400, content={"error": str(exc)})

    async def model_not_found(request, exc: ModelNotFound):
        client_error(request, 404, "not_found", str(exc))
        return JSONResponse(status_code=404, content={"error": str(exc)})

    async def validation_error(request, exc: RequestValidationError):
        # FastAPI answers 422 for a V2 body that does not fit the schema; the protocol says 400
        errors = exc.errors()
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in errors
        )
        message = f"invalid request: {problems}"
        reason = "bad_json" if any(e.get("type") == "json_invalid" for e in errors) else "validation"
        client_error(request, 400, reason, message)
        return JSONResponse(status_code=400, content={"error": message})

    async def http_error(request, exc: HTTPException):  # unknown route, wrong method, body over the limit
        if exc.status_code < 500:
            reason = {413: "body_too_large", 404: "not_found"}.get(exc.status_code, "http")
            client_error(request, exc.status_code, reason, str(exc.detail))
        return await http_exception_handler(request, exc)

    return {
        InvalidInput: invalid_input,
        ModelNotFound: model_not_found,
        RequestValidationError: validation_error,
        HTTPException: http_error,
    }


def prepare_app(model: RecommenderModel, serve: ServeSettings):
    """Configure KServe's FastAPI app (``kserve.model_server.app``) before the server starts."""
    from kserve import model_server
    from kserve.errors import InvalidInput, ModelNotFound
    from kserve.protocol.rest import server as rest_server

    app = model_server.app
    app.max_body_size = serve.max_body_bytes  # Starlette answers 413 beyond it, before parsing

    handlers = client_error_handlers()
    for exc_class, handler in handlers.items():
        app.add_exception_handler(exc_class, handler)
    # KServe's RESTServer adds its own handlers when the server starts, after this, by the names it imported
    # into kserve.protocol.rest.server: give those names ours, or KServe's would replace them
    rest_server.invalid_input_handler = handlers[InvalidInput]
    rest_server.model_not_found_handler = handlers[ModelNotFound]

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness with details (model version, lost online store); the probes are KServe's /v2/health/*."""
        return model.health()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await model.start_background()
        try:
            yield
        finally:
            await model.stop_background()

    app.router.lifespan_context = lifespan
    return app


def serve(settings: Settings, serve: ServeSettings, log_level: str = "INFO") -> None:
    from kserve import ModelServer
    from kserve.logging import configure_logging

    configure_logging(logging_config(log_level))
    # KServe 0.21 still answers through FastAPI's ORJSONResponse, which warns on every first use
    from fastapi.exceptions import FastAPIDeprecationWarning

    warnings.filterwarnings("ignore", category=FastAPIDeprecationWarning)
    model = RecommenderModel(settings, serve)
    model.load()
    # Everything loaded so far lives as long as the process: move it out of the garbage collector's
    # generations, so that gen-2 collections (150-200 ms stalls with Feast's object graph) stay short.
    gc.collect()
    gc.freeze()
    prepare_app(model, serve)
    try:  # KServe runs uvicorn inside asyncio.run(), so uvicorn's own loop choice never applies
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        # KServe asks for "the current loop" before asyncio.run
        asyncio.set_event_loop(asyncio.new_event_loop())
    except ImportError:
        log.info("uvloop not installed: running on the standard asyncio loop")
    server = ModelServer(
        http_port=serve.http_port,
        enable_grpc=False,
        enable_docs_url=False,
        enable_latency_logging=False,
        workers=1,
    )
    server.start([model])
