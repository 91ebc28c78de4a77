"""The step controller and recorder against a stand-in scheduler (no engine): table lookup,
fallbacks and their counters, exploration, step records and request ordering."""

import json
import time
from types import SimpleNamespace

import pytest

from controller.artifact import Decision, PolicyArtifact
from controller.features import FeatureSpec
from controller.online import OnlineCalibration
from envs.trace import load_trace, validate_files
from serving_patch.config import PluginConfig
from serving_patch.engine_hook import StepController
from serving_patch.sources import DecisionSource

MAX_K = 4
SEQS = 8


def fake_scheduler(max_k=MAX_K, seqs=SEQS, method="draft_model"):
    spec = SimpleNamespace(method=method, model="/models/draft") if max_k else None
    vcfg = SimpleNamespace(speculative_config=spec, parallel_config=SimpleNamespace(data_parallel_size=1),
                           model_config=SimpleNamespace(model="/models/target", dtype="torch.float32"),
                           cache_config=SimpleNamespace(num_gpu_blocks=100, block_size=16))
    return SimpleNamespace(vllm_config=vcfg, num_spec_tokens=max_k, dynamic_sd_lookup=None, waiting=[],
                           scheduler_config=SimpleNamespace(max_num_seqs=seqs, max_num_batched_tokens=2048),
                           kv_cache_manager=SimpleNamespace(usage=0.25))


def make(env, sched=None):
    sched = sched or fake_scheduler()
    ctl = StepController(sched, PluginConfig.from_env(env))
    return ctl, sched


def policy(tmp_path, k_by_bias=None, seed=0):
    """An artifact whose decision is k_by_bias (a constant action) or random."""
    spec = FeatureSpec(max_num_seqs=SEQS, max_k=MAX_K)
    actions = [(k, 1) for k in range(MAX_K + 1)]
    art = PolicyArtifact.random(spec, actions, seed=seed)
    if k_by_bias is not None:
        art.weights[-1][:] = 0.0
        art.biases[-1][:] = 0.0
        art.biases[-1][k_by_bias] = 1.0
    return art.save(tmp_path / "policy.json")


def test_static_source_is_a_list_index_clipped_to_max_k():
    ctl, sched = make({"SPEC_CONTROLLER": "table:[[1,2,9],[3,8,1]]"})
    try:
        assert sched.dynamic_sd_lookup[1] == MAX_K  # 9 clipped to the engine's num_speculative_tokens
        assert sched.dynamic_sd_lookup[5] == 1
        assert sched.dynamic_sd_lookup[500] == 1     # past the end: the last entry
        assert ctl.fb_no_decision == 0 and ctl.controlling
    finally:
        ctl.close()


def test_choose_is_cheap():
    ctl, sched = make({"SPEC_CONTROLLER": "static:2", "SPEC_CONTROLLER_EXPLORE": "0.3"})
    try:
        n = 20000
        t0 = time.perf_counter_ns()
        for i in range(n):
            sched.dynamic_sd_lookup[i % SEQS + 1]
        per_call_us = (time.perf_counter_ns() - t0) / n / 1000
        assert per_call_us < 20, per_call_us  # ~1 us here; a 10 ms GPU step's 1% budget is 100 us
        assert ctl.stats()["choose_us_per_step"] < 20
    finally:
        ctl.close()


def test_exploration_draws_every_k_reproducibly():
    seen = []
    for _ in range(2):
        ctl, sched = make({"SPEC_CONTROLLER": "static:0", "SPEC_CONTROLLER_EXPLORE": "1", "SPEC_CONTROLLER_SEED": "3"})
        seen.append([sched.dynamic_sd_lookup[4] for _ in range(200)])
        ctl.close()
    assert seen[0] == seen[1] and set(seen[0]) == set(range(MAX_K + 1))


def test_exploration_hold_keeps_each_random_k_for_h_steps_at_the_same_explored_fraction():
    ctl, sched = make({"SPEC_CONTROLLER": "static:0", "SPEC_CONTROLLER_EXPLORE": "0.3",
                       "SPEC_CONTROLLER_EXPLORE_HOLD": "6", "SPEC_CONTROLLER_SEED": "1"})
    try:
        ks = [sched.dynamic_sd_lookup[4] for _ in range(30000)]
        frac = ctl.explored / len(ks)
        assert 0.27 < frac < 0.33, frac  # the rate is the fraction of steps, whatever the hold
        # runs of a non-zero k are whole holds (a draw of 0 or two adjacent draws of one k merge them)
        runs, cur, n = [], None, 0
        for k in ks:
            if k == cur:
                n += 1
            else:
                if cur:
                    runs.append(n)
                cur, n = k, 1
        assert runs and min(runs) >= 6 and all(r % 6 == 0 for r in runs)
    finally:
        ctl.close()


def test_cycle_flips_every_step():
    ctl, sched = make({"SPEC_CONTROLLER": "cycle:0,4"})
    assert [sched.dynamic_sd_lookup[3] for _ in range(5)] == [0, 4, 0, 4, 0]
    ctl.close()


STEP = {"batch_size": 4, "k": 2, "width": 1, "drafts": 4, "accepted_per_pos": [3, 1], "step_ms": 20.0}


def test_missing_then_valid_then_corrupt_then_raising_policy(tmp_path, monkeypatch):
    path = tmp_path / "policy.json"
    env = {"SPEC_CONTROLLER": str(path), "SPEC_CONTROLLER_FALLBACK_K": "1", "SPEC_CONTROLLER_RELOAD_S": "0.05",
           "SPEC_CONTROLLER_DECIDE_EVERY": "1"}
    ctl, sched = make(env)
    ctl._stop.set()  # no background thread: reloads and polls by hand below (refresh_now), deterministic
    ctl._thread.join()
    try:
        # missing: the static fallback, counted per step
        assert sched.dynamic_sd_lookup[2] == 1 and ctl.fb_no_decision == 1
        assert ctl.source.load_errors >= 1 and "not readable" in ctl.source.last_error
        # a valid policy appears: it is picked up at the next reload check
        policy(tmp_path, k_by_bias=3)
        time.sleep(0.06)
        assert ctl.refresh_now() and sched.dynamic_sd_lookup[2] == 3 and ctl.version.startswith("random-")
        # corrupt bytes replace it: keep serving the last good policy, count the failure
        errors = ctl.source.load_errors
        path.write_text("{ not json")
        time.sleep(0.06)
        assert not ctl.refresh_now()  # nothing new (no step, same snapshot): the decision stands
        assert sched.dynamic_sd_lookup[2] == 3 and ctl.source.load_errors == errors + 1
        assert "not valid JSON" in ctl.source.last_error
        ctl.source.on_step(STEP)
        assert ctl.refresh_now() and sched.dynamic_sd_lookup[2] == 3  # a new step: decided with the old artifact
        # a policy that raises: the last good table stays, the error is counted
        monkeypatch.setattr(PolicyArtifact, "decision", lambda *a, **k: 1 / 0)
        ctl.source.on_step(STEP)
        assert not ctl.refresh_now() and ctl.poll_errors == 1 and "ZeroDivisionError" in ctl.last_error
        assert sched.dynamic_sd_lookup[2] == 3
    finally:
        ctl.close()


class GarbageSource(DecisionSource):
    name = "garbage"

    def __init__(self, answers):
        self.answers = list(answers)

    def poll(self, snapshot):
        return self.answers.pop(0)


@pytest.mark.parametrize("garbage", [
    "not a decision",
    Decision(()),
    Decision(((0, 1), (-2, 1))),
    Decision(((0, 1), (1.5, 1))),
    Decision(((0, 1), (2, 0))),
])
def test_garbage_decisions_keep_the_last_good_one(garbage):
    ctl, sched = make({"SPEC_CONTROLLER": "static:0"})
    try:
        ctl.source = GarbageSource([Decision.static(2, max_num_seqs=SEQS), garbage])
        assert ctl.refresh_now() and sched.dynamic_sd_lookup[3] == 2
        assert not ctl.refresh_now() and ctl.bad_decisions == 1
        assert sched.dynamic_sd_lookup[3] == 2
    finally:
        ctl.close()


def test_expired_decision_falls_back_to_static_k():
    ctl, sched = make({"SPEC_CONTROLLER": "static:0", "SPEC_CONTROLLER_FALLBACK_K": "1",
                       "SPEC_CONTROLLER_MAX_AGE_S": "0.05", "SPEC_CONTROLLER_REFRESH_S": "0.01"})
    try:
        ctl._stop.set()  # stop the refresher: the source goes silent
        ctl._thread.join()
        ctl.source = GarbageSource([Decision.static(3, max_num_seqs=SEQS)])
        assert ctl.refresh_now() and sched.dynamic_sd_lookup[2] == 3
        time.sleep(0.08)
        assert sched.dynamic_sd_lookup[2] == 1 and ctl.fb_expired == 1
        assert sched.dynamic_sd_lookup[2] == 1 and ctl.fb_no_decision == 1  # then counted as "no decision"
    finally:
        ctl.close()


def test_engine_without_speculation_is_left_alone():
    ctl, sched = make({"SPEC_CONTROLLER": "static:2"}, fake_scheduler(max_k=0))
    assert sched.dynamic_sd_lookup is None and not ctl.controlling
    ctl.close()


# ---------------------------------------------------------------------- step records


def schedule_step(ctl, sched, k_next, sched_tokens, spec_tokens, t_start):
    out = SimpleNamespace(num_scheduled_tokens=sched_tokens, scheduled_spec_decode_tokens=spec_tokens,
                          num_spec_tokens_to_schedule=k_next)
    ctl.after_schedule(sched, out, t_start)
    return out


def finish_step(ctl, out, sampled):
    ids = list(out.num_scheduled_tokens)
    mro = SimpleNamespace(req_id_to_index={r: i for i, r in enumerate(ids)},
                          sampled_token_ids=[sampled.get(r, [7]) for r in ids])
    ctl.before_update(out, mro)
    ctl.after_update(out, mro)


def request(rid, prompt, arrival):
    return SimpleNamespace(request_id=rid, num_prompt_tokens=prompt, arrival_time=arrival, num_output_tokens=0)


def test_recorder_writes_valid_steps_and_requests_in_arrival_order(tmp_path):
    out_path = tmp_path / "rec.jsonl.gz"
    ctl, sched = make({"SPEC_CONTROLLER": "static:3", "SPEC_TRACE_OUT": str(out_path)})
    now = time.time()
    a, b, c = request("a", 5, now), request("b", 3, now + 0.01), request("c", 2, now + 0.02)
    for r in (a, b, c):
        ctl.on_arrival(r)
    t = time.monotonic() - 1.0
    # step 1: a and b prefill (no drafts yet); the controller chose k=3 for the next step
    o = schedule_step(ctl, sched, 3, {"a": 5, "b": 3}, {}, t)
    finish_step(ctl, o, {})
    # step 2: a and b verify 3 drafts each: a accepts 2, b accepts 0; c prefills
    o = schedule_step(ctl, sched, 2, {"a": 4, "b": 4, "c": 2}, {"a": [1, 2, 3], "b": [4, 5, 6]}, t + 0.1)
    finish_step(ctl, o, {"a": [1, 2, 9], "b": [8]})
    # b finishes before a: its record waits until a (earlier arrival) is done
    b.num_output_tokens = 2
    ctl.on_free(b)
    # step 3: verify 2 drafts for a and c (k chosen 2 last step)
    o = schedule_step(ctl, sched, 0, {"a": 3, "c": 3}, {"a": [1, 1], "c": [2, 2]}, t + 0.2)
    finish_step(ctl, o, {"a": [1, 1, 5], "c": [3]})
    a.num_output_tokens = 6
    ctl.on_free(a)
    c.num_output_tokens = 1
    st = ctl.stats()
    # steps with decodes by the k they ran (3, then 2); the prefill-only first step has no k to count
    assert st["steps"] == 3 and st["k_steps"] == [0, 0, 1, 1, 0]
    ctl.reset_counters()
    assert ctl.stats()["k_steps"] == [0] * (MAX_K + 1)
    ctl.close()  # c never finished: written with the tokens it had, without finish_s
    assert not validate_files([out_path])[out_path]
    tr = load_trace(out_path)
    assert tr.request_ids == ["a", "b", "c"]
    assert list(tr.requests["output_tokens"]) == [6, 2, 1]
    fin = tr.requests["finish_s"]
    assert (fin[:2] >= tr.requests["arrival_s"][:2]).all() and fin[2] != fin[2]  # c: no finish_s (NaN)
    steps = [json.loads(x) for x in __import__("gzip").open(out_path, "rt")][1:]
    steps = [s for s in steps if s["type"] == "step"]
    assert [s["k"] for s in steps] == [0, 3, 2]
    assert [s["batch_size"] for s in steps] == [0, 2, 2] and [s["prefill_tokens"] for s in steps] == [8, 2, 0]
    assert steps[1]["accepted_per_pos"] == [1, 1, 0] and steps[1]["drafts"] == 2 and steps[1]["draft_tokens"] == 6
    assert steps[2]["accepted_per_pos"] == [1, 1] and steps[2]["accepted_tokens"] == 2 and steps[2]["drafts"] == 2
    assert tr.header["method"] == "draft_model" and tr.header["model"] == "models/target" and tr.header["max_k"] == MAX_K


def test_a_broken_recorder_never_reaches_the_engine(tmp_path):
    out_path = tmp_path / "rec.jsonl"
    ctl, sched = make({"SPEC_TRACE_OUT": str(out_path)})
    ctl.recorder._writer._fh.close()  # e.g. the disk went away
    o = schedule_step(ctl, sched, 0, {"a": 1}, {}, time.monotonic())
    finish_step(ctl, o, {})
    assert ctl.recorder.errors >= 1 and ctl.recorder.closed and ctl.hook_errors == 0
    ctl.close()


class RequestSink(DecisionSource):
    """A source that wants requests (as the sidecar source does) and keeps what it gets."""

    name = "sink"
    wants_requests = True

    def __init__(self):
        self.got = []

    def poll(self, snapshot):
        return Decision.static(2, max_num_seqs=SEQS, version="sink")

    def on_request(self, record):
        self.got.append(record)


def test_a_source_that_wants_requests_gets_them_in_arrival_order_on_the_step_clock():
    ctl, _sched = make({"SPEC_CONTROLLER": "static:1"})
    sink = ctl.source = RequestSink()
    try:
        now = time.time()
        a, b = request("a", 5, now + 0.5), request("b", 3, now + 0.6)
        ctl.on_arrival(a)
        ctl.on_arrival(b)
        b.num_output_tokens = 4
        ctl.on_free(b)
        assert sink.got == []  # a arrived first and is still running
        a.num_output_tokens = 7
        ctl.on_free(a)
        assert [r["id"] for r in sink.got] == ["a", "b"]
        ra, rb = sink.got
        assert (ra["prompt_tokens"], ra["output_tokens"], rb["output_tokens"]) == (5, 7, 4)
        # the steps' clock (seconds since the controller was created): arrivals ~0.5 s and ~0.6 s
        assert abs(ra["arrival_s"] - 0.5) < 0.2 and abs(rb["arrival_s"] - ra["arrival_s"] - 0.1) < 1e-6
        assert ra["finish_s"] >= ra["arrival_s"] and rb["finish_s"] >= rb["arrival_s"]
    finally:
        ctl.close()


# ---------------------------------------------------------------------- refresher


def test_embedded_source_decides_only_when_something_changed(tmp_path):
    from serving_patch.sources import EmbeddedSource, EngineSnapshot

    src = EmbeddedSource(policy(tmp_path, k_by_bias=2), decide_every=1)  # at every step
    snap = EngineSnapshot(waiting=0, kv_usage=0.25, prefill_pending=0)
    first = src.poll(snap)
    assert first is not None and first.table[3] == (2, 1)
    assert src.poll(snap) is None  # no step, same snapshot: the decision stands (no MLP pass)
    src.on_step(STEP)
    assert src.poll(snap) is not None  # a step moved the feature state
    assert src.poll(snap) is None
    snap.waiting = 3
    assert src.poll(snap) is not None  # the queue moved
    assert src.poll(snap) is None
    snap.kv_usage = 0.3
    assert src.poll(snap) is None  # KV use moves every schedule: read at the next step's decision
    time.sleep(0.01)
    policy(tmp_path, k_by_bias=4)  # a new file (atomic replace), seen at the next reload check
    src.reload_s, src._next_check = 0.0, 0.0
    assert src.poll(snap) is None  # polls never touch the file (they run on the engine's thread)
    src.background()  # the controller's background thread: reloads, and the next poll decides with it
    again = src.poll(snap)
    assert again is not None and again.table[3] == (4, 1)


def test_embedded_source_decides_every_few_steps_and_at_once_when_the_queue_moves(tmp_path):
    from serving_patch.sources import EmbeddedSource, EngineSnapshot

    path = policy(tmp_path, k_by_bias=2)
    src = EmbeddedSource(path)
    assert src.decide_every == 4
    snap = EngineSnapshot(waiting=0, kv_usage=0.25, prefill_pending=0)
    assert src.poll(snap) is not None and src.decisions == 1
    alpha0 = src.state.alpha
    for _ in range(3):
        src.on_step(STEP)
        assert src.poll(snap) is None  # folded in, the decision stands
    assert src.state.alpha != alpha0 and not src._steps  # every step reached the feature state
    src.on_step(STEP)
    assert src.poll(snap) is not None  # the fourth step decides
    src.on_step(STEP)
    snap.waiting = 2
    assert src.poll(snap) is not None  # the queue moved: at once
    for _ in range(4):  # several steps land between two polls: one decision
        src.on_step(STEP)
    assert src.poll(snap) is not None and src.poll(snap) is None and src.decisions == 4
    assert src.stats()["decisions"] == 4
    with pytest.raises(ValueError, match="decide_every must be an int >= 1"):
        EmbeddedSource(path, decide_every=0)


def test_the_end_of_an_exploration_hold_decides_at_once(tmp_path):
    from serving_patch.sources import EmbeddedSource, EngineSnapshot
    from tests.controller.test_online import LaggedEngine, cost_k1_best

    cal = OnlineCalibration(MAX_K, SEQS, min_seen=20, min_steps=8, explore_every=40, hold=6)
    src = EmbeddedSource(policy(tmp_path, k_by_bias=3), calibration=cal)
    snap = EngineSnapshot()
    table = [k for k, _ in src.poll(snap).table]
    eng = LaggedEngine(cost_k1_best, lambda b, k: 0.0, alpha=0.6, seed=3)
    ends = late = 0
    for _ in range(2000):
        exploring = cal._explore is not None
        src.on_step(eng.step(4, table[4]))
        d = src.poll(snap)
        if exploring and cal._explore is None:  # this step ended the hold
            ends += 1
            late += d is None  # a table with the held k would stay up to three steps longer
        if d is not None:
            table = [k for k, _ in d.table]
    assert ends >= 3 and late == 0 and not cal.urgent


def test_the_embedded_policy_runs_on_the_step_path_after_a_step_and_reloads_in_the_background(tmp_path, monkeypatch):
    calls = []
    real = PolicyArtifact.decision
    monkeypatch.setattr(PolicyArtifact, "decision", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = policy(tmp_path, k_by_bias=2)
    ctl, sched = make({"SPEC_CONTROLLER": f"embedded:{path}", "SPEC_CONTROLLER_REFRESH_S": "0.005",
                       "SPEC_CONTROLLER_RELOAD_S": "0.05", "SPEC_CONTROLLER_DECIDE_EVERY": "1"})
    try:
        assert sched.dynamic_sd_lookup[3] == 2 and len(calls) == 1  # the first decision, at start
        polls = ctl.polls
        time.sleep(0.1)
        assert ctl.polls == polls and len(calls) == 1  # no timer polls an inline source: the policy never ran
        t = time.monotonic()
        o = schedule_step(ctl, sched, 2, {"a": 3}, {"a": [1, 2]}, t)
        finish_step(ctl, o, {"a": [1, 2, 3]})
        # decided before finish_step returned, on this thread: the next schedule sees it
        assert len(calls) == 2 and ctl.polls == polls + 1
        st = ctl.stats()
        assert st["refresh_us_per_step"] > 0  # the poll's CPU, per step
        # a new policy file: the background thread reloads it and decides once itself, so an idle
        # engine (no step) has the new table; the next step's poll is the step path's again
        time.sleep(0.02)  # a later mtime than the first file's
        policy(tmp_path, k_by_bias=4)
        deadline = time.monotonic() + 2.0
        while sched.dynamic_sd_lookup[3] != 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ctl.source.loads == 2 and len(calls) == 3 and sched.dynamic_sd_lookup[3] == 4
        o = schedule_step(ctl, sched, 4, {"a": 1}, {"a": [1, 2, 3, 4]}, time.monotonic())
        finish_step(ctl, o, {"a": [1, 2, 3, 4, 5]})
        assert len(calls) == 4 and sched.dynamic_sd_lookup[3] == 4
    finally:
        ctl.close()


def test_the_step_path_never_waits_for_a_poll_in_progress(tmp_path):
    ctl, sched = make({"SPEC_CONTROLLER": f"embedded:{policy(tmp_path, k_by_bias=2)}",
                       "SPEC_CONTROLLER_DECIDE_EVERY": "1"})
    try:
        polls = ctl.polls
        with ctl._poll_lock:  # the background thread mid-poll (after a reload)
            t0 = time.perf_counter()
            o = schedule_step(ctl, sched, 2, {"a": 3}, {"a": [1, 2]}, time.monotonic())
            finish_step(ctl, o, {"a": [1, 2, 3]})
            assert time.perf_counter() - t0 < 0.5 and ctl.polls == polls  # skipped, not waited for
        assert len(ctl.source._steps) == 1  # the step stays queued
        o = schedule_step(ctl, sched, 2, {"a": 1}, {"a": [1, 2]}, time.monotonic())
        finish_step(ctl, o, {"a": [1, 2, 3]})
        assert ctl.polls == polls + 1 and not ctl.source._steps  # the next step's poll folds both
    finally:
        ctl.close()


def test_a_repeated_table_after_expiry_is_served_again_not_the_fallback():
    ctl, sched = make({"SPEC_CONTROLLER": "static:0", "SPEC_CONTROLLER_FALLBACK_K": "1"})
    try:
        d = Decision.static(3, max_num_seqs=SEQS)
        ctl.source = GarbageSource([d, Decision(tuple(d.table), "again")])
        assert ctl.refresh_now() and sched.dynamic_sd_lookup[2] == 3
        ctl._deadline = 0.0  # the table expires: the static fallback serves
        assert sched.dynamic_sd_lookup[2] == 1 and ctl.fb_expired == 1
        assert ctl.refresh_now() and sched.dynamic_sd_lookup[2] == 3 and ctl.version == "again"
    finally:
        ctl.close()


def test_calibration_overrides_the_embedded_policy_from_measured_steps_and_survives_a_source_switch(tmp_path):
    from tests.controller.test_online import LaggedEngine, cost_k1_clear

    path = str(policy(tmp_path, k_by_bias=3))
    ctl, _ = make({"SPEC_CONTROLLER": path, "SPEC_CONTROLLER_CALIBRATE": "1", "SPEC_CONTROLLER_REFRESH_S": "20"})
    try:
        cal = ctl.source.calibration
        assert cal is not None
        assert ctl.choose(4) == 3  # the policy's k until the engine's steps say otherwise
        eng = LaggedEngine(cost_k1_clear, lambda b, k: 0.0, alpha=0.6, seed=7)
        for _ in range(1500):
            ctl.source.on_step(eng.step(4, ctl.choose(4)))
            ctl.refresh_now()
        assert ctl.choose(4) == 1 and ctl.choose(5) == 1  # measured in bucket 4-5
        assert ctl.choose(3) == 3 and ctl.choose(6) == 1  # below it the policy's k, above it capped there
        assert ctl.version.endswith("+calibrated")
        assert ctl.stats()["source"]["calibration"]["overrides"] == {4: 1, 5: 1}
        ctl.set_source("static:2")
        assert ctl.choose(4) == 2
        ctl.set_source(f"embedded:{path}")
        assert ctl.source.calibration is cal and ctl.choose(4) == 1  # what it measured still holds
        ctl.set_calibrate(False)
        ctl.set_source(f"embedded:{path}")
        assert ctl.source.calibration is None and ctl.choose(4) == 3
    finally:
        ctl.close()


def test_calibration_is_on_by_default_and_only_for_the_embedded_policy(tmp_path):
    path = str(policy(tmp_path, k_by_bias=3))
    ctl, _ = make({"SPEC_CONTROLLER": path})
    assert ctl.source.calibration is not None and ctl.source.calibration.min_gain == 0.03
    assert ctl.source.calibration.speculate_over_off is False  # the policy's off stands by default
    ctl.close()
    ctl, _ = make({"SPEC_CONTROLLER": path, "SPEC_CONTROLLER_MIN_GAIN": "0.1",
                   "SPEC_CONTROLLER_SPECULATE_OVER_OFF": "1"})
    assert ctl.source.calibration.min_gain == 0.1  # the operator's bar for speculating over off
    assert ctl.source.calibration.speculate_over_off is True
    ctl.close()
    ctl, _ = make({"SPEC_CONTROLLER": path, "SPEC_CONTROLLER_CALIBRATE": "0"})
    assert ctl.source.calibration is None and ctl.choose(4) == 3
    ctl.close()
    ctl, _ = make({"SPEC_CONTROLLER": "static:2"})
    assert not hasattr(ctl.source, "calibration") and ctl.choose(4) == 2
    ctl.set_source(f"embedded:{path}")
    assert ctl.source.calibration is not None
    assert ctl.source.calibration.stream is not None  # draft_model: batch 1 compares k's on one stream
    ctl.close()
    # ngram's proposal for a position can depend on where its step started: no batch-1 stream
    ctl, _ = make({"SPEC_CONTROLLER": path}, fake_scheduler(method="ngram"))
    assert ctl.source.calibration is not None and ctl.source.calibration.stream is None
    ctl.close()
