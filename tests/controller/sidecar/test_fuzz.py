"""Fuzz the live OpenAPI schema with schemathesis: valid and invalid inputs for every
operation; nothing may give a 5xx, bad bodies give a 4xx naming what is wrong, and every
response conforms to the schema."""

from __future__ import annotations

import http.client
import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from controller.sidecar.app import create_app
from controller.sidecar.harness import ServerThread, http_json
from controller.sidecar.settings import SidecarSettings

from .conftest import TOKEN, make_policy, step

WITH_INPUT = {"POST /v1/decide", "PUT /v1/policy", "GET /v1/policy"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    policy = make_policy().save(tmp_path_factory.mktemp("fuzz") / "policy.json")
    app = create_app(SidecarSettings(policy=policy, token=TOKEN, watch=False), registry=CollectorRegistry())
    with ServerThread(app) as server:
        status, raw = http_json("GET", server.port, "/openapi.json")
        assert status == 200
        yield server, schemathesis.openapi.from_dict(raw)


def _operations(schema):
    return [op.ok() for op in schema.get_all_operations()]


def _fuzz(op, label: str, mode, examples: int, base: str, statuses: dict) -> None:
    """Run ``examples`` generated cases of one operation against the live server."""
    headers = {"Authorization": f"Bearer {TOKEN}"} if op.method.upper() == "PUT" else None
    checks = CHECKS + ([negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case):
        resp = case.call_and_validate(base_url=base, headers=headers, checks=checks, timeout=10)
        statuses.setdefault(label, set()).add(resp.status_code)
        if 400 <= resp.status_code < 500 and op.path.startswith("/v1"):
            detail = resp.json()["detail"]
            assert detail, "a 4xx says what is wrong"
            if isinstance(detail, list):
                assert all(d.get("loc") and d.get("msg") for d in detail), detail

    run()


@pytest.mark.parametrize("mode,examples,only", [
    (GenerationMode.POSITIVE, 40, None),
    (GenerationMode.NEGATIVE, 40, None),
    pytest.param(GenerationMode.POSITIVE, 200, "POST /v1/decide", marks=pytest.mark.slow),
    pytest.param(GenerationMode.NEGATIVE, 200, "POST /v1/decide", marks=pytest.mark.slow),
])
def test_fuzz_every_operation(live, mode, examples, only):
    server, schema = live
    base = f"http://127.0.0.1:{server.port}"
    ops = _operations(schema)
    assert {f"{op.method.upper()} {op.path}" for op in ops} >= {"POST /v1/decide", "GET /v1/policy",
                                                                "PUT /v1/policy", "GET /healthz"}
    statuses: dict[str, set[int]] = {}
    for op in ops:
        label = f"{op.method.upper()} {op.path}"
        if mode == GenerationMode.NEGATIVE and label not in WITH_INPUT:
            continue  # nothing to get wrong: no body, no parameters
        if only is not None and label != only:
            continue

        _fuzz(op, label, mode, examples, base, statuses)
    assert all(s < 500 for codes in statuses.values() for s in codes), statuses
    if mode == GenerationMode.NEGATIVE:
        assert statuses["POST /v1/decide"] <= {422}, statuses
    if only is None:
        assert set(statuses) >= WITH_INPUT
    # the server is still healthy and serving the original policy
    assert http_json("GET", server.port, "/v1/policy")[1]["version"] == "v1"


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                    max_leaves=6)
STEP_FIELDS = list(step())


@st.composite
def near_valid_bodies(draw):
    """Valid decide bodies (random shapes and acceptance), then 0-2 fields replaced by any JSON
    value: the cases a schema-driven generator rarely reaches (the cross-field invariants)."""
    n = draw(st.integers(0, 4))
    steps = [step(t_s=0.01 * i, batch_size=draw(st.integers(0, 300)), k=draw(st.integers(0, 6)),
                  width=draw(st.sampled_from([1, 2])), accept=draw(st.floats(0, 1)),
                  kv_usage=draw(st.floats(0, 1)), waiting=draw(st.integers(0, 50))) for i in range(n)]
    for s in steps:
        if s["k"] == 0:
            s["drafts"] = 0
    body = {"engine_id": draw(st.sampled_from(["e0", "e1", "vllm-0"])), "steps": steps}
    if draw(st.booleans()):
        body["max_k"] = draw(st.integers(-1, 70))  # edges included: the schema allows 1..64
    if draw(st.booleans()):
        body["widths"] = draw(st.lists(st.integers(-1, 70), min_size=0, max_size=3))
    if draw(st.booleans()):
        body["prefill_pending"] = draw(st.integers(0, 10**6))
    for _ in range(draw(st.integers(0, 2))):
        if steps and draw(st.booleans()):
            steps[draw(st.integers(0, n - 1))][draw(st.sampled_from(STEP_FIELDS))] = draw(JSON)
        else:
            body[draw(st.sampled_from(["engine_id", "steps", "max_k", "widths", "prefill_pending", "client"]))] = draw(
                JSON)
    return body


def test_near_valid_decide_bodies_never_5xx(live):
    server, _ = live
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=near_valid_bodies())
    def run(body):
        conn.request("POST", "/v1/decide", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        out = json.loads(resp.read())
        assert resp.status in (200, 422), (resp.status, body, out)
        if resp.status == 422:
            assert all(d["loc"][0] == "body" and d["msg"] for d in out["detail"]), out

    try:
        run()
    finally:
        conn.close()
