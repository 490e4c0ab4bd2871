"""Request parsing and response shaping for the V1 and V2 REST protocols: pure functions, no I/O.

V1 ``POST /v1/models/<name>:predict``::

    {"instances": [{"user_id": 42, "k": 10, "exclude_seen": true}, ...]}
    → {"predictions": [{"user_id": 42, "item_ids": [...], "scores": [...], "model_version": "3",
                        "fallback": null, "level": "full"}, ...]}

V2 ``POST /v2/models/<name>/infer`` (Open Inference Protocol): inputs ``user_id`` INT64 ``[B]``, optional
``k`` INT32/INT64 ``[1]`` or ``[B]`` and ``exclude_seen`` BOOL ``[1]`` or ``[B]``; outputs ``item_ids`` INT64
``[B, k]`` and ``scores`` FP32 ``[B, k]`` (padded with -1 / NaN where fewer than k items exist) and
``fallback`` BYTES ``[B]`` ("" when the model served) and ``level`` BYTES ``[B]``; the model version is
the response's ``model_version``.

``level`` names the rung of the quality ladder that served the request (``full``, ``reduced``,
``retrieval``, ``popularity``: ``predictor.serving.ladder``); a fallback for the whole request (online
store down, model error) is served at ``popularity``.

Every problem raises :class:`kserve.errors.InvalidInput` (HTTP 400) with a message that names the field;
:class:`BadRequest`, its subclass, also carries the reason the client-error counter is labelled with.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
import orjson
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

INT64_MAX = 2**63 - 1
V2_INTEGER_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}


class BadRequest(InvalidInput):
    """InvalidInput with ``kind``: a label of ``recsys_client_errors_total`` (one of
    ``metrics.CLIENT_ERROR_REASONS``; plain InvalidInputs count as ``bad_field``)."""

    def __init__(self, message: str, kind: str = "bad_field"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Limits:
    max_k: int = 100
    default_k: int = 10
    max_instances: int = 64


@dataclass(frozen=True)
class RecRequest:
    user_id: int
    k: int
    exclude_seen: bool = True


@dataclass
class Answer:
    """What ``predict`` hands to ``postprocess``: the engine's ``Recommendations`` for the request's users
    (in request order), why the ``cold`` rows got a fallback, the model version and the ladder level."""

    recs: object  # predictor.serving.engine.Recommendations
    fallback_reason: str
    model_version: str
    level: str = "full"

    def fallbacks(self) -> list[str | None]:
        return [self.fallback_reason if cold else None for cold in self.recs.cold.tolist()]


@dataclass
class ParsedRequest:
    """What ``preprocess`` hands to ``predict``: the users and how to answer."""

    requests: list[RecRequest]
    protocol: str  # "v1" | "v2"
    request_id: str | None = None
    k: int = 0  # V2: the common k (outputs are [B, k])


def _integer(value, field: str, low: int, high: int) -> int:
    # bool is an int subclass in Python but never a valid id or k
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InvalidInput(f"{field} must be an integer, got {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise InvalidInput(f"{field} must be between {low} and {high}, got {value}")
    return value


def _check_count(n: int, limits: Limits, field: str) -> None:
    if n == 0:
        raise InvalidInput(f"{field} is empty: send at least one user")
    if n > limits.max_instances:
        raise BadRequest(
            f"{field} has {n} entries; at most {limits.max_instances} users per request", "too_many_users"
        )


def parse_v1(body, limits: Limits) -> ParsedRequest:
    if isinstance(body, (bytes, bytearray)):  # KServe leaves the body undecoded without a JSON content-type
        try:
            body = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}", "bad_json") from None
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object with an 'instances' list")
    instances = body.get("instances")
    if instances is None:
        raise InvalidInput('\'instances\' is missing: expected {"instances": [{"user_id": 42, "k": 10}]}')
    if not isinstance(instances, list):
        raise InvalidInput("'instances' must be a list")
    _check_count(len(instances), limits, "instances")
    requests = []
    for i, inst in enumerate(instances):
        where = f"instances[{i}]"
        if not isinstance(inst, dict):
            raise InvalidInput(f'{where} must be an object like {{"user_id": 42}}, got {inst!r}')
        unknown = set(inst) - {"user_id", "k", "exclude_seen"}
        if unknown:
            raise InvalidInput(
                f"{where} has unknown field(s) {sorted(unknown)}: use user_id, k, exclude_seen"
            )
        if "user_id" not in inst:
            raise InvalidInput(f"{where}.user_id is missing")
        user_id = _integer(inst["user_id"], f"{where}.user_id", -INT64_MAX - 1, INT64_MAX)
        k = _integer(inst.get("k", limits.default_k), f"{where}.k", 1, limits.max_k)
        exclude = inst.get("exclude_seen", True)
        if not isinstance(exclude, bool):
            raise InvalidInput(f"{where}.exclude_seen must be true or false, got {exclude!r}")
        requests.append(RecRequest(user_id, k, exclude))
    return ParsedRequest(requests, "v1")


def _v2_values(request: InferRequest, name: str, datatypes: set[str], required: bool) -> np.ndarray | None:
    tensor = next((t for t in request.inputs if t.name == name), None)
    if tensor is None:
        if required:
            names = [t.name for t in request.inputs]
            raise InvalidInput(f"input '{name}' is missing (got inputs {names})")
        return None
    if tensor.datatype not in datatypes:
        raise InvalidInput(
            f"input '{name}' has datatype {tensor.datatype}; expected {' or '.join(sorted(datatypes))}"
        )
    shape = tensor.shape
    # numpy reads -1 as "whatever fits"; the protocol's dims are exact (as_numpy's reshape then checks
    # that their product is the number of values)
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInput(f"input '{name}' has shape {shape}: dims must be non-negative integers")
    try:
        values = tensor.as_numpy()
    except InvalidInput:
        raise
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(
            f"input '{name}': data does not match shape {tensor.shape} / {tensor.datatype}: {exc}"
        )
    return values.reshape(-1)


def parse_v2(request: InferRequest, limits: Limits) -> ParsedRequest:
    known = {"user_id", "k", "exclude_seen"}
    unknown = [t.name for t in request.inputs if t.name not in known]
    if unknown:
        raise InvalidInput(f"unknown input(s) {unknown}: use user_id, k, exclude_seen")
    names = [t.name for t in request.inputs]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise InvalidInput(f"input '{twice}' is given {names.count(twice)} times: send each input once")
    users = _v2_values(request, "user_id", V2_INTEGER_TYPES, required=True)
    _check_count(len(users), limits, "input 'user_id'")
    ks = _v2_values(request, "k", V2_INTEGER_TYPES, required=False)
    if ks is None:
        k = limits.default_k
    else:
        if len(set(ks.tolist())) != 1:
            raise InvalidInput(
                "input 'k' must hold one value (outputs are [users, k]); send one request per k"
            )
        k = _integer(ks[0], "input 'k'", 1, limits.max_k)
    excl = _v2_values(request, "exclude_seen", {"BOOL"}, required=False)
    if excl is None:
        excl = np.ones(len(users), bool)
    elif len(excl) == 1:
        excl = np.repeat(excl, len(users))
    elif len(excl) != len(users):
        raise InvalidInput(
            f"input 'exclude_seen' has {len(excl)} values for {len(users)} users: send 1 or one per user"
        )
    requests = [
        RecRequest(_integer(u, "input 'user_id'", -INT64_MAX - 1, INT64_MAX), k, bool(e))
        for u, e in zip(users.tolist(), excl.tolist())
    ]
    return ParsedRequest(requests, "v2", request.id, k)


def v1_response(answer: Answer, parsed: ParsedRequest) -> dict:
    recs = answer.recs
    ks = np.fromiter((r.k for r in parsed.requests), np.int64, len(parsed.requests))
    counts = np.minimum(recs.counts, ks).tolist()
    ids, scores = recs.item_ids.tolist(), np.round(recs.scores.astype(np.float64), 6).tolist()
    return {
        "predictions": [
            {
                "user_id": r.user_id,
                "item_ids": i[:n],
                "scores": s[:n],
                "model_version": answer.model_version,
                "fallback": f,
                "level": answer.level,
            }
            for r, i, s, n, f in zip(parsed.requests, ids, scores, counts, answer.fallbacks())
        ]
    }


def v2_response(answer: Answer, parsed: ParsedRequest, model_name: str) -> InferResponse:
    k, recs = parsed.k, answer.recs
    B = len(parsed.requests)
    ids = np.full((B, k), -1, np.int64)
    scores = np.full((B, k), np.nan, np.float32)
    width = min(k, recs.item_ids.shape[1])
    ids[:, :width], scores[:, :width] = recs.item_ids[:, :width], recs.scores[:, :width]
    flat_scores = scores.reshape(-1).tolist()
    padding = np.isnan(scores).reshape(-1)
    if padding.any():  # JSON has no NaN: padding goes out as null
        flat_scores = [None if pad else s for s, pad in zip(flat_scores, padding.tolist())]
    outputs = [
        InferOutput("item_ids", [B, k], "INT64", ids.reshape(-1).tolist()),
        InferOutput("scores", [B, k], "FP32", flat_scores),
        InferOutput("fallback", [B], "BYTES", [f or "" for f in answer.fallbacks()]),
        InferOutput("level", [B], "BYTES", [answer.level] * B),
    ]
    return InferResponse(
        response_id=parsed.request_id or str(uuid.uuid4()),
        model_name=model_name,
        model_version=answer.model_version,
        infer_outputs=outputs,
    )
