"""Start the predictor: ``recsys serve`` (and the container's entrypoint).

KServe's ModelServer owns the HTTP server; this module only prepares what it cannot be told by argument:
request-size limit, HTTP 400 for requests FastAPI rejects before our code sees them, the background
tasks' lifetime, quiet per-request logging, and a frozen heap.
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
from predictor.serving.model import RecommenderModel, ServeSettings

log = logging.getLogger(__name__)


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


def prepare_app(model: RecommenderModel, serve: ServeSettings):
    """Configure KServe's FastAPI app (``kserve.model_server.app``) before the server starts."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from kserve import model_server

    app = model_server.app
    app.max_body_size = serve.max_body_bytes  # Starlette answers 413 beyond it, before parsing

    async def validation_error(_, exc: RequestValidationError):
        # FastAPI answers 422 for a V2 body that does not fit the schema; the protocol says 400
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in exc.errors()
        )
        return JSONResponse(status_code=400, content={"error": f"invalid request: {problems}"})

    app.add_exception_handler(RequestValidationError, validation_error)

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
        asyncio.set_event_loop(asyncio.new_event_loop())  # KServe asks for "the current loop" before asyncio.run
    except ImportError:
        log.info("uvloop not installed: running on the standard asyncio loop")
    server = ModelServer(http_port=serve.http_port, enable_grpc=False, enable_docs_url=False,
                         enable_latency_logging=False, workers=1)  # fmt: skip
    server.start([model])
