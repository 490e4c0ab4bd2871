"""Bad input stays cheap: every 4xx names the field, costs one INFO log line (no traceback) and one count of
``recsys_client_errors_total{reason}``; V2 shapes and input names are checked exactly."""

from __future__ import annotations

import collections
import json

import pytest
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferRequest

from predictor.serving.metrics import CLIENT_ERROR_REASONS
from predictor.serving.requests import Limits, parse_v2
from tests import test_serving
from tests.test_serving import V1_BAD, V2_BAD, Server, user_input

stack = test_serving.stack  # the module-scoped fixture: events, features, a trained tiny model

V1 = "/v1/models/recsys:predict"
V2 = "/v2/models/recsys/infer"


# -- parsing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([InferInput("user_id", [-1], "INT64", [1, 2])], "input 'user_id' has shape [-1]"),
        ([InferInput("user_id", [2, -1], "INT64", [1, 2])], "input 'user_id' has shape [2, -1]"),
        ([InferInput("user_id", [2], "INT64", [1])], "input 'user_id'"),
        (
            [InferInput("user_id", [1], "INT64", [1]), InferInput("user_id", [1], "INT64", [2])],
            "input 'user_id' is given 2 times",
        ),
        (
            [
                InferInput("user_id", [1], "INT64", [1]),
                InferInput("k", [1], "INT32", [3]),
                InferInput("k", [1], "INT32", [4]),
            ],
            "input 'k' is given 2 times",
        ),
    ],
)
def test_v2_shape_and_duplicate_names_are_invalid(inputs, message):
    with pytest.raises(InvalidInput, match="input '") as caught:
        parse_v2(InferRequest("recsys", inputs), Limits())
    assert message in str(caught.value)


def test_v2_exact_shapes_still_parse():
    parsed = parse_v2(InferRequest("recsys", [InferInput("user_id", [2], "INT64", [7, 8])]), Limits())
    assert [r.user_id for r in parsed.requests] == [7, 8]
    two_d = parse_v2(InferRequest("recsys", [InferInput("user_id", [2, 1], "INT64", [7, 8])]), Limits())
    assert [r.user_id for r in two_d.requests] == [7, 8]


# -- the server ---------------------------------------------------------------------------------------------


def bad_requests() -> list[tuple[str, str, dict, int, str, str]]:
    """(label, path, httpx keyword arguments, status, text the answer must hold, counter reason)."""
    cases = []
    for i, (body, message) in enumerate(V1_BAD):
        reason = "too_many_users" if "at most" in message else "bad_field"
        cases.append((f"v1[{i}]", V1, {"json": body}, 400, message, reason))
    for i, (body, message) in enumerate(V2_BAD):
        if "at most" in message:
            reason = "too_many_users"
        elif body["inputs"] == 5 or "datatype" not in body["inputs"][0]:
            reason = "validation"  # FastAPI's schema check, before our code
        else:
            reason = "bad_field"
        cases.append((f"v2[{i}]", V2, {"json": body}, 400, message, reason))
    json_type = {"content-type": "application/json"}
    cases += [
        (
            "v2 shape [-1]",
            V2,
            {"json": {"inputs": [user_input([1, 2], shape=[-1])]}},
            400,
            "input 'user_id' has shape [-1]",
            "bad_field",
        ),
        (
            "v2 shape [2] for 1 value",
            V2,
            {"json": {"inputs": [user_input([1], shape=[2])]}},
            400,
            "input 'user_id'",
            "bad_field",
        ),
        (
            "v2 user_id twice",
            V2,
            {"json": {"inputs": [user_input([1]), user_input([2])]}},
            400,
            "input 'user_id' is given 2 times",
            "bad_field",
        ),
        (
            "v1 bad json",
            V1,
            {"content": b'{"instances": [', "headers": json_type},
            400,
            "Unrecognized request format",
            "bad_json",
        ),
        (
            "v1 bad json, text/plain",
            V1,
            {"content": b'{"instances": [', "headers": {"content-type": "text/plain"}},
            400,
            "request body is not valid JSON",
            "bad_json",
        ),
        ("v2 bad json", V2, {"content": b'{"inputs": [', "headers": json_type}, 400, "JSON", "bad_json"),
        (
            "oversized",
            V1,
            {"content": b'{"instances": [' + b'{"user_id": 1},' * 30_000 + b'{"user_id": 1}]}'},
            413,
            "Content Too Large",
            "body_too_large",
        ),
        (
            "unknown model",
            "/v1/models/nope:predict",
            {"json": {"instances": [{"user_id": 1}]}},
            404,
            "nope",
            "not_found",
        ),
    ]
    return cases


@pytest.fixture(scope="module")
def server(stack):
    srv = Server(stack[0])
    yield srv
    srv.stop()


def log_entries(text: str) -> list[dict]:
    entries = []
    for line in text.splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            entries.append({"level": "?", "message": line})
    return entries


def test_bad_requests_are_4xx_with_one_info_line_and_a_count(server, stack):
    cases = bad_requests()
    before = {r: server.metric("recsys_client_errors_total", reason=r) for r in CLIENT_ERROR_REASONS}
    ok = server.v1([{"user_id": test_serving.active_user(stack[1])}])  # a good request logs nothing
    assert ok.status_code == 200, ok.text
    start = len(server.output())
    for label, path, kwargs, status, text, _ in cases:
        response = server.client.post(path, **kwargs)
        assert response.status_code == status, (label, response.text)
        assert text in response.text, (label, response.text)
        if status == 400:
            assert set(response.json()) == {"error"}, (label, response.text)
    assert server.v1([{"user_id": 1}]).status_code == 200
    new = server.output()[start:]
    assert "Traceback" not in new, new[-3000:]
    entries = log_entries(new)
    assert [e for e in entries if e.get("level") in ("error", "critical", "?")] == [], new[-3000:]
    client_lines = [e for e in entries if e.get("message", "").startswith("client error")]
    assert len(client_lines) == len(cases), new[-3000:]
    assert all(e["level"] == "info" for e in client_lines)
    want = collections.Counter(reason for *_, reason in cases)
    logged = collections.Counter(e["message"].split("(", 1)[1].split(")", 1)[0] for e in client_lines)
    assert logged == want
    after = {r: server.metric("recsys_client_errors_total", reason=r) for r in CLIENT_ERROR_REASONS}
    rose = {r: after[r] - before[r] for r in CLIENT_ERROR_REASONS}
    assert rose == {r: want[r] for r in CLIENT_ERROR_REASONS}


def test_a_client_error_line_is_short(server):
    """The response echoes a huge field back; the log keeps a few hundred characters of it."""
    start = len(server.output())
    response = server.v1([{"user_id": "x" * 100_000}])
    assert response.status_code == 400 and "instances[0].user_id must be an integer" in response.text
    (line,) = [e for e in log_entries(server.output()[start:]) if e.get("message", "").startswith("client")]
    assert len(line["message"]) < 1_000
