"""The sidecar's HTTP API against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import json

import pytest

from controller.artifact import PolicyArtifact
from controller.features import FeatureState
from controller.sidecar.schemas import StepRecord
from controller.sidecar.store import EngineEntry, decide, fold_steps, load_snapshot
from controller.sidecar.wire import runs_from_table, table_from_runs

from .conftest import ACTIONS, TOKEN, make_policy, random_steps, step


def test_decide_uses_the_shared_feature_function(sidecar, policy_path):
    """The table equals the artifact's own decision at a FeatureState fed the same steps."""
    art = PolicyArtifact.load(policy_path)
    state = FeatureState(art.feature_spec)
    steps = random_steps(40, seed=3)
    seen_runs = set()
    for i in range(0, 40, 4):
        chunk = steps[i:i + 4]
        status, body = sidecar.decide("e0", chunk)
        assert status == 200, body
        for s in chunk:
            state.update(s["batch_size"], s["k"], s["width"], s["drafts"], s["accepted_per_pos"], s["step_ms"],
                         s["batch_size"] + s["accepted_tokens"])
        last = chunk[-1]
        expected = art.decision(state, last["waiting"], last["kv_usage"], last["prefill_tokens"])
        assert body["runs"] == runs_from_table(expected.table)
        assert body["version"] == "v1" and body["max_num_seqs"] == 64 and body["fallback"] is None
        seen_runs.add(json.dumps(body["runs"]))
    assert len(seen_runs) > 1, "the test policy should react to the state"


def test_engines_keep_separate_state(sidecar):
    good = [step(t_s=0.01 * i, accept=0.95) for i in range(30)]
    bad = [step(t_s=0.01 * i, accept=0.05) for i in range(30)]
    assert sidecar.decide("good", good)[0] == 200
    assert sidecar.decide("bad", bad)[0] == 200
    engines = sidecar.service.engines
    assert engines.peek("good").state.alpha > 0.8
    assert engines.peek("bad").state.alpha < 0.2
    assert engines.peek("good").steps == 30
    status, listing = sidecar.call("GET", "/v1/engines")
    assert status == 200 and [e["engine_id"] for e in listing] == ["good", "bad"]
    assert sidecar.value("spec_controller_engines_connected") == 2


def test_empty_steps_is_a_refresh(sidecar):
    status, body = sidecar.decide("fresh", [])
    assert status == 200 and body["runs"][0] == [0, 0, 0, 1] and len(table_from_runs(body["runs"])) == 65


@pytest.mark.parametrize("change,field,text", [
    ({"accepted_tokens": 99}, "accepted_tokens", "sum(accepted_per_pos)"),
    ({"drafts": 100}, "drafts", "drafts <= batch_size=8"),
    ({"accepted_per_pos": [1, 5], "accepted_tokens": 6}, "accepted_per_pos", "non-increasing"),
    ({"k": 0}, "accepted_per_pos", "list of k=0 ints"),
    ({"accepted_per_pos": [9, 0], "accepted_tokens": 9}, "accepted_per_pos", "accepted_per_pos[0] <= drafts=8"),
    ({"draft_tokens": 1000}, "draft_tokens", "drafts*k*width=16"),
])
def test_trace_invariants_give_422_naming_the_field(sidecar, change, field, text):
    status, body = sidecar.decide("e0", [step(), {**step(t_s=0.1), **change}])
    assert status == 422, body
    (item,) = body["detail"]
    assert item["loc"] == ["body", "steps", 1, field] and text in item["msg"]
    assert sidecar.service.engines.peek("e0") is None, "a refused call folds nothing"
    assert sidecar.value("spec_controller_decide_requests_total", outcome="invalid") == 1


@pytest.mark.parametrize("body,loc,text", [
    ({"engine_id": "e0", "steps": [{**step(), "kv_usage": 1.5}]}, ["body", "steps", 0, "kv_usage"], "less than"),
    ({"engine_id": "../etc", "steps": []}, ["body", "engine_id"], "pattern"),
    ({"engine_id": "e0", "steps": [{**step(), "batch_size": "8"}]}, ["body", "steps", 0, "batch_size"], "integer"),
    ({"engine_id": "e0", "steps": [{**step(), "step_ms": 0}]}, ["body", "steps", 0, "step_ms"], "greater than 0"),
    ({"engine_id": "e0", "bogus": 1}, ["body", "bogus"], "Extra inputs"),
    ({"steps": []}, ["body", "engine_id"], "required"),
    ({"engine_id": "e0", "client": {"fallbacks": {"bogus": 1}}}, ["body", "client", "fallbacks", "bogus", "[key]"],
     "'no_decision'"),
])
def test_schema_errors_give_422_naming_the_field(sidecar, body, loc, text):
    status, out = sidecar.call("POST", "/v1/decide", body)
    assert status == 422
    assert any(d["loc"] == loc and text in d["msg"] for d in out["detail"]), out


@pytest.mark.parametrize("extra,loc,text", [
    ({"max_k": 1}, ["body", "steps", 0, "k"], "max_k=1"),
    ({"widths": [2]}, ["body", "steps", 0, "width"], "widths [2]"),
    ({"widths": [0]}, ["body", "widths", 0], "greater than or equal to 1"),
])
def test_steps_beyond_the_engines_capabilities(sidecar, extra, loc, text):
    status, out = sidecar.decide("e0", [step(k=2)], **extra)
    assert status == 422 and any(d["loc"][:len(loc)] == loc and text in d["msg"] for d in out["detail"]), out


def test_not_json_and_non_finite_numbers(sidecar):
    status, out = sidecar.call("POST", "/v1/decide", raw=b"{not json")
    assert status == 422 and "Invalid JSON" in out["detail"][0]["msg"]
    raw = json.dumps({"engine_id": "e0", "steps": [{**step(), "step_ms": float("nan")}]}).encode()
    status, out = sidecar.call("POST", "/v1/decide", raw=raw)
    assert status == 422 and out["detail"][0]["loc"] == ["body", "steps", 0, "step_ms"]


def test_body_too_large(sidecar):
    status, out = sidecar.call("POST", "/v1/decide", raw=b" " * (16 << 20) + b"{}")
    assert status == 413 and "fewer steps" in out["detail"]


def test_too_many_steps_per_call(start_sidecar):
    sc = start_sidecar(max_steps_per_request=5)
    status, out = sc.decide("e0", random_steps(6))
    assert status == 422 and "max_steps_per_request=5" in out["detail"][0]["msg"]


def test_table_is_mapped_to_the_engine(sidecar):
    """An engine that runs chains only up to k=2 never gets width 2 or k > 2."""
    status, body = sidecar.decide("small", [step(k=2, accept=0.9)] * 1, max_k=2, widths=[1])
    assert status == 200
    assert all(k <= 2 and w == 1 for _, _, k, w in body["runs"])


def test_decision_matches_store_decide_in_table_form(policy_path):
    """decide_runs (the sidecar's fast path) == runs of decide() (the table form)."""
    from controller.sidecar.store import decide_runs

    snap = load_snapshot(policy_path.read_bytes(), str(policy_path))
    for i, s in enumerate(random_steps(60, seed=5)):
        entry = EngineEntry(FeatureState(snap.spec))
        fold_steps(entry, [StepRecord.model_validate(s)])
        if i % 3 == 0:
            entry.max_k, entry.widths = 3, (1,)
        runs, action = decide_runs(snap, entry, prefill_pending=i * 100)
        d = decide(snap, entry, prefill_pending=i * 100)
        assert runs == runs_from_table(d.table) and action == d.lookup(entry.batch_size)


@pytest.mark.parametrize("hidden,activation,scale", [((16,), "tanh", 4.0), ((64, 64), "tanh", 1.0),
                                                     ((32, 32), "relu", 3.0), ((8,), "tanh", 1e-7)])
def test_fast_argmax_is_the_artifacts_argmax(hidden, activation, scale):
    """float32 forward pass + float64 recheck of near ties == the artifact's float64 argmax,
    including a net whose logits are all near ties (scale 1e-7)."""
    import numpy as np

    from controller.features import batch_sweep, observe

    art = PolicyArtifact.random(make_policy().feature_spec, ACTIONS, hidden=hidden, seed=len(hidden))
    art.activation = activation
    art.weights = [w * scale for w in art.weights]
    art = PolicyArtifact.from_dict(art.to_dict())
    snap = load_snapshot(art.to_dict(), "x")
    rng = np.random.default_rng(0)
    for _ in range(50):
        st = FeatureState(art.feature_spec)
        st.alpha, st.accept0, st.tok_per_ms = rng.random(3) * [1, 1, 10]
        obs = observe(st, 0, int(rng.integers(0, 100)), float(rng.random()), int(rng.integers(0, 9000)))
        rows = batch_sweep(obs, np.arange(65), art.feature_spec)
        np.testing.assert_array_equal(snap.argmax_table(obs), np.argmax(art.logits(rows), axis=1))


def test_metrics_count_what_the_engines_report(sidecar):
    steps = [step(t_s=0.0, batch_size=3, k=2, accept=0.5), step(t_s=0.1, batch_size=40, k=0),
             step(t_s=0.2, batch_size=40, k=4, width=1, accept=0.9)]
    status, _ = sidecar.decide("e0", steps, client={"fallbacks": {"stale": 3, "no_decision": 1},
                                                    "errors": {"timeout": 2}, "dropped_steps": 4})
    assert status == 200
    v = sidecar.value
    assert v("spec_controller_steps_total", bucket="002-003") == 1
    assert v("spec_controller_steps_total", bucket="032-063") == 2
    assert v("spec_controller_spec_len_total", bucket="032-063") == 4
    assert v("spec_controller_draft_tokens_total", bucket="002-003") == 6
    assert v("spec_controller_accepted_tokens_total", bucket="002-003") == steps[0]["accepted_tokens"]
    assert v("spec_controller_accepted_tokens_total", bucket="032-063") == steps[2]["accepted_tokens"]
    assert v("spec_controller_committed_tokens_total", bucket="032-063") == 80 + steps[2]["accepted_tokens"]
    assert v("spec_controller_accepted_per_pos_total", position="0") == (
        steps[0]["accepted_per_pos"][0] + steps[2]["accepted_per_pos"][0])
    assert v("spec_controller_step_seconds_count", k="0") == 1
    assert v("spec_controller_steps_by_k_total", k="4", width="1") == 1
    assert v("spec_controller_fallbacks_total", reason="stale") == 3
    assert v("spec_controller_fallbacks_total", reason="expired") == 0  # fixed series exist at 0
    assert v("spec_controller_client_errors_total", kind="timeout") == 2
    assert v("spec_controller_dropped_steps_total") == 4
    assert v("spec_controller_decision_seconds_count") == 1
    assert v("spec_controller_decide_requests_total", outcome="ok") == 1
    assert sum(v("spec_controller_decisions_total", k=str(k), width=str(w)) or 0 for k, w in ACTIONS) == 1
    assert v("spec_controller_policy_info", version="v1", sha256=sidecar.service.store.current.sha256[:12],
             source="file") == 1
    status, text = sidecar.call("GET", "/metrics")
    assert status == 200 and 'spec_controller_steps_total{bucket="032-063"} 2.0' in text


def test_get_policy(sidecar):
    status, info = sidecar.call("GET", "/v1/policy")
    assert status == 200
    assert info["version"] == "v1" and info["provenance"]["seed"] == 0 and info["evaluation"]
    assert info["actions"] == [list(a) for a in ACTIONS] and len(info["table"]) == 65 and info["engine_id"] is None
    assert info["ranges"][0][0] == 1
    sidecar.decide("e7", [step(accept=0.95)] * 1)
    status, info7 = sidecar.call("GET", "/v1/policy?engine_id=e7")
    assert status == 200 and info7["engine_id"] == "e7"
    status, out = sidecar.call("GET", "/v1/policy?engine_id=nobody")
    assert status == 404 and "has not called" in out["detail"]


def test_put_policy_on_loopback_without_token(sidecar, policy_path):
    status, out = sidecar.call("PUT", "/v1/policy", make_policy("v2", seed=1).to_dict())
    assert status == 200 and out["version"] == "v2" and out["persisted"] is True
    assert sidecar.decide("e0", [])[1]["version"] == "v2"
    assert PolicyArtifact.load(policy_path).version == "v2", "PUT persists, so a restart serves it too"
    assert sidecar.value("spec_controller_policy_reloads_total", trigger="put", result="ok") == 1


def test_put_policy_needs_the_token_when_set(start_sidecar):
    sc = start_sidecar(token=TOKEN)
    new = make_policy("v2", seed=1).to_dict()
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": "Basic abc"}):
        status, out = sc.call("PUT", "/v1/policy", new, headers=headers)
        assert status == 401 and "Bearer" in out["detail"], (headers, out)
    assert sc.call("GET", "/v1/policy")[1]["version"] == "v1"
    status, out = sc.call("PUT", "/v1/policy", new, headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and out["version"] == "v2"
    # reading and deciding never need the token
    assert sc.call("GET", "/v1/policy")[0] == 200 and sc.decide("e0", [])[0] == 200


@pytest.mark.parametrize("mutate,text", [
    (lambda d: d.update(schema="other/9"), "schema"),
    (lambda d: d.update(actions=[[0, 1]]), "actions"),
    (lambda d: d["weights"][0][0].__setitem__(0, 1e400), "non-finite"),
    (lambda d: d.update(feature_spec={"max_num_seqs": "many"}), "feature_spec.max_num_seqs: expected an int"),
    (lambda d: d.update(feature_spec={"mystery": 1}), "malformed"),
    (lambda d: d.update(feature_names=["x"]), "retrain"),
])
def test_bad_artifact_is_refused_and_old_keeps_serving(sidecar, policy_path, mutate, text):
    before = policy_path.read_bytes()
    d = make_policy("bad").to_dict()
    mutate(d)
    status, out = sidecar.call("PUT", "/v1/policy", raw=json.dumps(d).encode())
    assert status == 422 and text in out["detail"] and "v1 keeps serving" in out["detail"]
    assert sidecar.decide("e0", [])[1]["version"] == "v1"
    assert policy_path.read_bytes() == before
    assert sidecar.value("spec_controller_policy_reloads_total", trigger="put", result="refused") == 1


def test_health_readiness_docs(sidecar):
    assert sidecar.call("GET", "/healthz") == (200, {"status": "ok"})
    assert sidecar.call("GET", "/readyz") == (200, {"status": "ready", "policy": "v1"})
    status, schema = sidecar.call("GET", "/openapi.json")
    assert status == 200 and {"/v1/decide", "/v1/policy", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    assert "DecideRequest" in schema["components"]["schemas"] and "StepRecord" in schema["components"]["schemas"]
    status, html = sidecar.call("GET", "/docs")
    assert status == 200 and "swagger" in html.lower()
