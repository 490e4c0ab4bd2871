"""The platform floor ``bench/serve.py`` measures the predictor against: KServe itself, doing no model work.

The same ``ModelServer`` as ``recsys serve`` (same kserve version, the predictor's logging configuration at
WARNING, uvloop, no gRPC, one worker, no latency logging, a frozen heap) with a model whose
``preprocess`` parses the same V1 body with the predictor's own parser and whose ``predict`` returns a
fixed answer of the same shape (per instance: ``user_id``, 10 ``item_ids``, 10 ``scores``,
``model_version``, ``fallback`` null; built here, so that only the parser is shared). What a request
costs here is what HTTP, FastAPI and KServe's dataplane cost: no server built on KServe on this
machine answers faster.

    python bench/platform_floor.py --port 8082
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import warnings

_argv, sys.argv = sys.argv, sys.argv[:1]  # KServe parses sys.argv at import
import kserve

sys.argv = _argv

from predictor.serving.requests import Limits, ParsedRequest, parse_v1
from predictor.serving.server import logging_config

K = 10
ITEM_IDS = list(range(1, K + 1))
SCORES = [round(1.0 - 0.1 * i, 6) for i in range(K)]


class FloorModel(kserve.Model):
    """Parses like the predictor, answers like the predictor, computes nothing."""

    def __init__(self, name: str = "recsys"):
        super().__init__(name)
        self.limits = Limits()  # the predictor's defaults: k 10, at most 100, 64 instances

    def load(self) -> bool:
        self.ready = True
        return True

    def validate(self, payload):
        return payload  # as the predictor: preprocess already validated

    async def preprocess(self, payload, headers=None) -> ParsedRequest:
        return parse_v1(payload, self.limits)

    async def predict(self, parsed: ParsedRequest, headers=None) -> ParsedRequest:
        return parsed

    async def postprocess(self, parsed: ParsedRequest, headers=None, response_headers=None) -> dict:
        return {
            "predictions": [
                {
                    "user_id": r.user_id,
                    "item_ids": ITEM_IDS,
                    "scores": SCORES,
                    "model_version": "floor",
                    "fallback": None,
                }
                for r in parsed.requests
            ]
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8082)
    args = parser.parse_args()
    from fastapi.exceptions import FastAPIDeprecationWarning
    from kserve.logging import configure_logging

    configure_logging(logging_config("WARNING"))
    warnings.filterwarnings("ignore", category=FastAPIDeprecationWarning)  # as predictor/serving/server.py
    model = FloorModel()
    model.load()
    gc.collect()
    gc.freeze()
    try:  # as predictor/serving/server.py: KServe runs uvicorn inside asyncio.run()
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.set_event_loop(asyncio.new_event_loop())
    except ImportError:
        pass
    kserve.ModelServer(
        http_port=args.port, enable_grpc=False, enable_docs_url=False, enable_latency_logging=False, workers=1
    ).start([model])


if __name__ == "__main__":
    main()
