"""Request parsing and response shaping for the V1 and V2 REST protocols: pure functions, no I/O.

V1 ``POST /v1/models/<name>:predict``::

    {"instances": [{"user_id": 42, "k": 10, "exclude_seen": true}, ...]}
    → {"predictions": [{"user_id": 42, "item_ids": [...], "scores": [...], "model_version": "3",
                        "fallback": null}, ...]}

V2 ``POST /v2/models/<name>/infer`` (Open Inference Protocol): inputs ``user_id`` INT64 ``[B]``, optional
``k`` INT32/INT64 ``[1]`` or ``[B]`` and ``exclude_seen`` BOOL ``[1]`` or ``[B]``; outputs ``item_ids`` INT64
``[B, k]`` and ``scores`` FP32 ``[B, k]`` (padded with -1 / NaN where fewer than k items exist) and
``fallback`` BYTES ``[B]`` ("" when the model served); the model version is the response's
``model_version``.

Every problem raises :class:`kserve.errors.InvalidInput` (HTTP 400) with a message that names the field.
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
class RecResult:
    user_id: int
    item_ids: np.ndarray  # int64 [<= k]
    scores: np.ndarray  # float32 [<= k]
    model_version: str
    fallback: str | None = None  # None: the model served; else why a fallback did


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
        raise InvalidInput(f"{field} has {n} entries; at most {limits.max_instances} users per request")


def parse_v1(body, limits: Limits) -> ParsedRequest:
    if isinstance(body, (bytes, bytearray)):  # KServe leaves the body undecoded without a JSON content-type
        try:
            body = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"request body is not valid JSON: {exc}") from None
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
    requests = [RecRequest(_integer(u, "input 'user_id'", -INT64_MAX - 1, INT64_MAX), k, bool(e))
                for u, e in zip(users.tolist(), excl.tolist())]  # fmt: skip
    return ParsedRequest(requests, "v2", request.id, k)


def v1_response(results: list[RecResult]) -> dict:
    return {"predictions": [
        {"user_id": r.user_id, "item_ids": r.item_ids.tolist(), "scores": [round(float(s), 6) for s in r.scores],
         "model_version": r.model_version, "fallback": r.fallback}
        for r in results
    ]}  # fmt: skip


def v2_response(results: list[RecResult], parsed: ParsedRequest, model_name: str) -> InferResponse:
    k = parsed.k
    ids = np.full((len(results), k), -1, np.int64)
    scores = np.full((len(results), k), np.nan, np.float32)
    for row, r in enumerate(results):
        ids[row, : len(r.item_ids)] = r.item_ids[:k]
        scores[row, : len(r.scores)] = r.scores[:k]
    versions = {r.model_version for r in results}
    outputs = [
        InferOutput("item_ids", list(ids.shape), "INT64", ids.reshape(-1).tolist()),
        InferOutput("scores", list(scores.shape), "FP32",
                    [None if np.isnan(s) else float(s) for s in scores.reshape(-1)]),
        InferOutput("fallback", [len(results)], "BYTES", [r.fallback or "" for r in results]),
    ]  # fmt: skip
    return InferResponse(
        response_id=parsed.request_id or str(uuid.uuid4()),
        model_name=model_name,
        model_version=",".join(sorted(versions)),
        infer_outputs=outputs,
    )
