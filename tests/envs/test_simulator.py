"""The continuous-batching simulator: conservation, determinism, limits and replay fidelity."""

from pathlib import Path

import numpy as np
import pytest

from envs.profiles import PROFILES, AcceptanceProfile, RooflineCost, held_walks
from envs.simulator import EngineConfig, RequestArrays, Simulator, _flatten_agree, closed_loop_links
from envs.synth import replay_fidelity, trace_action_policy
from envs.trace import load_trace

PRE = PROFILES["h100-llama3-8b-eagle"]
TRACES = Path(__file__).resolve().parents[2] / "traces"


def _requests(n=200, rate=20.0, seed=0):
    rng = np.random.default_rng(seed)
    return RequestArrays(np.cumsum(rng.exponential(1 / rate, n)), rng.integers(10, 2000, n), rng.integers(1, 300, n))


def _sim(reqs, seed=0, **cfg):
    return Simulator(reqs, PRE.cost, PRE.acceptance, EngineConfig(max_k=PRE.max_k, **cfg), seed=seed)


@pytest.mark.parametrize("k", [0, 1, 4])
def test_every_token_is_produced_once_and_limits_hold(k):
    reqs = _requests()
    sim = _sim(reqs, max_num_seqs=16, max_num_batched_tokens=512)
    committed = 0
    while (s := sim.prepare()) is not None:
        assert s.batch_size <= 16 and s.running <= 16 and 0 <= s.kv_usage <= 1
        out = sim.execute(k, 1)
        assert out.prefill_tokens + out.batch_size * (1 + k) <= max(512, out.batch_size * (1 + k))
        assert out.accepted_tokens <= out.batch_size * k
        assert out.accepted_per_pos == sorted(out.accepted_per_pos, reverse=True)
        committed += out.committed_tokens
    st = sim.stats()
    assert st.completed == len(reqs)
    assert committed == reqs.output_tokens.sum() == st.committed_tokens
    assert np.all(sim.finish_s >= reqs.arrival_s)
    assert np.all(sim.first_token_s <= sim.finish_s)


def test_same_seed_same_run_other_seed_other_run():
    reqs = _requests()
    a = _sim(reqs, seed=3).run(lambda s: (3, 1))
    b = _sim(reqs, seed=3).run(lambda s: (3, 1))
    c = _sim(reqs, seed=4).run(lambda s: (3, 1))
    np.testing.assert_array_equal(a.step_ms, b.step_ms)
    assert a.accepted_tokens == b.accepted_tokens and a.accepted_tokens != c.accepted_tokens


def test_speculation_raises_throughput_at_light_load_and_acceptance_matches_profile():
    reqs = _requests(rate=5.0)
    off = _sim(reqs).run(lambda s: (0, 1))
    on = _sim(reqs).run(lambda s: (4, 1))
    assert on.mean_latency_s < 0.8 * off.mean_latency_s
    expect = PRE.acceptance.expected_accepted(4) / 4
    assert on.accept_rate == pytest.approx(expect, rel=0.05)


def test_peek_matches_execute_without_noise():
    reqs = _requests()
    sim = Simulator(reqs, PRE.cost, PRE.acceptance, EngineConfig(max_k=PRE.max_k), seed=0, noise=False)
    for _ in range(300):
        if sim.prepare() is None:
            break
        peeks = {k: sim.peek(k) for k in range(PRE.max_k + 1)}
        out = sim.execute(2, 1)
        # caps at output length can only lower the realised acceptance
        assert out.accepted_tokens <= peeks[2][0]
        assert out.step_ms == pytest.approx(peeks[2][1])
        assert peeks[0][0] == 0 and all(peeks[k][0] <= peeks[k + 1][0] for k in range(PRE.max_k))


def test_kv_capacity_limits_admission():
    reqs = RequestArrays.from_lists([0.0] * 10, [1000] * 10, [100] * 10)
    sim = _sim(reqs, kv_capacity_tokens=3300)
    max_running = 0
    while (s := sim.prepare()) is not None:
        max_running = max(max_running, s.running)
        sim.execute(0, 1)
    assert max_running == 3 and sim.stats().completed == 10


def test_bad_actions_and_config_are_refused():
    sim = _sim(_requests(5))
    with pytest.raises(RuntimeError, match="prepare"):
        sim.execute(1, 1)
    sim.prepare()
    with pytest.raises(ValueError, match="outside"):
        sim.execute(PRE.max_k + 1, 1)
    with pytest.raises(ValueError, match="width=2"):
        sim.execute(1, 2)
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_k"):
        Simulator(_requests(5), RooflineCost(), AcceptanceProfile(p=[0.5]), EngineConfig(max_k=3))


def test_window_scales_load():
    reqs = _requests(1000, rate=10.0)
    w1 = reqs.window(0, 20, 1.0)
    w4 = reqs.window(0, 20, 4.0)
    assert len(w4) == pytest.approx(4 * len(w1), rel=0.15)
    assert w4.arrival_s.min() >= 0 and w4.arrival_s.max() < 20


def test_replay_of_own_actions_is_faithful(small_synthetic_trace):
    """Bound stated in the README: every compared figure within 5%."""
    rep = replay_fidelity(load_trace(small_synthetic_trace), seed=0)
    for name in ("step_ms_mean", "step_ms_p50", "step_ms_p90", "decode_tps", "busy_s"):
        assert rep[name]["rel_error"] < 0.05, (name, rep[name])
    assert rep["step_ms_p99"]["rel_error"] < 0.10, rep["step_ms_p99"]


def test_trace_action_policy_follows_the_trace(small_synthetic_trace):
    t = load_trace(small_synthetic_trace)
    pol = trace_action_policy(t)

    class S:
        t_s = float(t.steps["t_s"][10])

    assert pol(S()) == (int(t.steps["k"][10]), int(t.steps["width"][10]) if t.steps["k"][10] else 1)


def test_only_the_proposing_share_drafts_and_a_trace_of_it_fits_back(tmp_path):
    """``propose`` (one rate per k, like vLLM's ngram matcher that finds nothing for some sequences):
    the simulator drafts for that share of the batch only, and fitting its trace recovers the rates."""
    from envs.profiles import fit_acceptance
    from envs.trace import TraceWriter

    truth = AcceptanceProfile(p=PRE.acceptance.p, propose=[0.9, 0.7, 0.55, 0.4, 0.4, 0.4])
    sim = Simulator(_requests(600, rate=40.0), PRE.cost, truth, EngineConfig(max_k=PRE.max_k, max_num_seqs=32),
                    seed=1)
    rng = np.random.default_rng(0)
    drafts, batch, gained = np.zeros(5), np.zeros(5), np.zeros(5)
    path = tmp_path / "propose.jsonl"
    with TraceWriter(path, max_k=PRE.max_k, widths=[1], source="synthetic") as w:
        while (s := sim.prepare()) is not None:
            k = int(rng.integers(0, 5)) if s.batch_size else 0
            out = sim.execute(k, 1)
            assert out.drafts <= out.batch_size and out.draft_tokens == out.drafts * k
            assert out.accepted_tokens <= out.drafts * k  # sequences without a draft accept nothing
            w.step(**out.record())
            if k and out.batch_size:
                drafts[k] += out.drafts
                batch[k] += out.batch_size
                gained[k] += out.accepted_tokens
    share = drafts[1:] / batch[1:]
    np.testing.assert_allclose(share, truth.propose[:4], atol=0.03)
    # accepted tokens per decoding sequence follow expected_gain (= propose x per-draft acceptance)
    np.testing.assert_allclose(gained[1:] / batch[1:], [truth.expected_gain(k) for k in range(1, 5)], rtol=0.06)
    fitted = fit_acceptance([load_trace(path)])
    np.testing.assert_allclose(fitted.propose[:4], truth.propose[:4], atol=0.04)
    np.testing.assert_allclose(fitted.p[:3], truth.p[:3], atol=0.05)
    # a profile without ``propose`` drafts for every sequence
    full = AcceptanceProfile(p=PRE.acceptance.p)
    assert full.propose_rate(3) == 1.0 and full.propose_rate(0) == 0.0
    with pytest.raises(ValueError, match="propose"):
        AcceptanceProfile(p=[0.5, 0.5], propose=[0.5, 0.0])
    with pytest.raises(ValueError, match="one number or one per k = 1..2"):
        AcceptanceProfile(p=[0.5, 0.5], propose=[0.5, 0.5, 0.5])


def test_concat_puts_request_streams_one_after_another():
    a = RequestArrays([5.0, 6.0, 9.0], [10, 20, 30], [1, 2, 3])
    b = RequestArrays([100.0, 101.5], [40, 50], [4, 5])
    c = RequestArrays.concat([a, RequestArrays([], [], []), b], gap_s=10.0)
    np.testing.assert_allclose(c.arrival_s, [0.0, 1.0, 4.0, 14.0, 15.5])
    np.testing.assert_array_equal(c.prompt_tokens, [10, 20, 30, 40, 50])
    np.testing.assert_array_equal(c.output_tokens, [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="at least one"):
        RequestArrays.concat([])


def test_requests_keep_their_agree_arrays_through_sort_concat_and_window():
    a = RequestArrays([2.0, 1.0], [10, 20], [2, 3], [[-1, 1], None])
    assert a.agree[0] is None and a.agree[1].tolist() == [-1, 1]  # sorted with its request
    c = RequestArrays.concat([a, RequestArrays([0.0], [5], [1])])
    assert [None if x is None else x.tolist() for x in c.agree] == [None, [-1, 1], None]
    w = c.window(0.5, 10.0)
    assert len(w) == 1 and w.agree[0].tolist() == [-1, 1]
    assert RequestArrays([0.0], [5], [2], [None]).agree is None
    with pytest.raises(ValueError, match="agree of request 0 has 1 entries, its output_tokens is 2"):
        RequestArrays([0.0], [5], [2], [[-1]])
    with pytest.raises(ValueError, match="one entry per request"):
        RequestArrays([0.0], [5], [2], [])


@pytest.mark.parametrize("k,steps,drafts,accepted", [(2, 5, 4, 4), (4, 4, 3, 6), (1, 6, 5, 3)])
def test_a_request_with_agree_walks_it_whatever_the_profile_and_seed(k, steps, drafts, accepted):
    # after t output tokens the draft agrees for agree[t] tokens; -1: none proposed (t = 0 is the prefill)
    agree = [-1, 0, 3, 2, 1, 0, -1, 3, 0, 0]
    for p, seed in ((0.99, 0), (0.01, 1)):
        sim = Simulator(RequestArrays([0.0], [8], [10], [agree]), PRE.cost, AcceptanceProfile(p=[p] * 4),
                        EngineConfig(max_k=4), seed=seed)
        got = []
        while (s := sim.prepare()) is not None:
            out = sim.execute(k if s.batch_size else 0)
            if out.batch_size:
                got.append((out.drafts, out.accepted_tokens))
        assert (len(got), sum(d for d, _ in got), sum(a for _, a in got)) == (steps, drafts, accepted)
        assert sim.stats().committed_tokens == 10


def test_requests_without_agree_still_draw_from_the_profile():
    # request 0 never gets a draft by its agree array; request 1 has none and draws (p ~ 1, all propose)
    reqs = RequestArrays([0.0, 0.0], [8, 8], [40, 40], [[-1] * 40, None])
    sim = Simulator(reqs, PRE.cost, AcceptanceProfile(p=[0.999] * 4), EngineConfig(max_k=4), seed=0)
    per_step = []
    while (s := sim.prepare()) is not None:
        out = sim.execute(4 if s.batch_size else 0)
        if out.batch_size == 2:
            per_step.append((out.drafts, out.accepted_tokens))
    assert per_step and all(d == 1 for d, _ in per_step)
    assert sum(a for _, a in per_step) >= 3.5 * len(per_step)


def test_walk_gain_is_the_static_walk_and_feeds_expected_gain():
    from envs.profiles import agree_walk_gain

    agree = [-1, 0, 3, 2, 1, 0, -1, 3, 0, 0]  # the request of the walk test above: 3/6, 4/5, 6/4 per step
    gain = agree_walk_gain([agree, None], 4)
    np.testing.assert_allclose(gain, [3 / 6, 4 / 5, 6 / 4, 6 / 4])
    assert agree_walk_gain([None, [-1]], 2) == [0.0, 0.0]  # nothing to walk
    prof = AcceptanceProfile(p=[0.9] * 4, walk_gain=gain)
    assert prof.expected_gain(2) == pytest.approx(0.8) and prof.expected_gain(0) == 0.0
    assert prof.expected_gain(2, width=2) == pytest.approx(prof.expected_accepted(2, width=2))  # trees: the draw
    with pytest.raises(ValueError, match="one value in \\[0, k\\] per k = 1..4"):
        AcceptanceProfile(p=[0.9] * 4, walk_gain=[0.5, 3.0, 1.0, 1.0])


def _walk_from(a, t, k):
    steps = acc = 0
    while t < len(a):
        g = min(k, a[t]) if a[t] > 0 else 0
        steps, acc, t = steps + 1, acc + g, t + 1 + g
    return acc, steps


def test_held_walks_are_the_static_walk_from_every_position():
    rng = np.random.default_rng(3)
    agree = [None if i % 4 == 1 else rng.integers(-1, 5, size=n).astype(np.int8)
             for i, n in enumerate(rng.integers(1, 70, size=25))]
    reqs = RequestArrays(np.arange(25.0), np.full(25, 8), [25 if a is None else len(a) for a in agree], agree)
    flat, starts = _flatten_agree(reqs)
    acc, steps = held_walks(flat, starts, 4)
    for i, a in enumerate(reqs.agree):
        if a is None:
            continue
        for k in range(1, 5):
            got = [(int(acc[k - 1, starts[i] + t]), int(steps[k - 1, starts[i] + t])) for t in range(len(a))]
            assert got == [_walk_from(a, t, k) for t in range(len(a))], (i, k)
    none = held_walks(*_flatten_agree(RequestArrays([0.0], [5], [3])), 4)
    assert none[0].shape == (4, 0)


def test_peek_held_counts_holding_k_not_this_steps_draw():
    agree = [-1, 0, 3, 2, 1, 0, -1, 3, 0, 0]  # from t = 1 held: k=1 3/6, k=2 4/5, k=4 6/4 per step
    sim = Simulator(RequestArrays([0.0], [8], [10], [agree]), PRE.cost, AcceptanceProfile(p=[0.5] * 4),
                    EngineConfig(max_k=4), seed=0)
    while sim.prepare().batch_size == 0:
        sim.execute(0)
    assert sim.peek(4)[0] == 0  # agree[1] = 0: this step's draw accepts nothing
    assert [sim.peek_held(k) for k in (0, 1, 2, 4)] == pytest.approx([0.0, 3 / 6, 4 / 5, 6 / 4])
    # two walking slots pool their remaining work; a slot without agree adds its realised draw
    reqs = RequestArrays([0.0, 0.0, 0.0], [8, 8, 8], [10, 4, 30], [agree, [-1, 4, 0, 0], None])
    sim = Simulator(reqs, PRE.cost, AcceptanceProfile(p=[0.999] * 4), EngineConfig(max_k=4), seed=0)
    while sim.prepare().batch_size < 3:
        sim.execute(0)
    pos = [1, 1]  # each walking request has its first token
    a0, s0 = _walk_from(agree, pos[0], 2)
    a1, s1 = _walk_from([-1, 4, 0, 0], pos[1], 2)
    drawn = sim.peek(2)[0] - min(2, agree[1]) - min(2, 4)
    assert sim.peek_held(2) == pytest.approx(2 * (a0 + a1) / (s0 + s1) + drawn)
    assert drawn == 2  # p ~ 1: the request without agree accepts both


# ---------------------------------------------------------------- closed-loop clients
def _closed(n=60, c=4, gap=0.002, seed=0):
    """A client keeping ``c`` requests in flight: the first ``c`` at t = 0, request i (i >= c) sent
    ``gap`` after request i - c finished; the recorded arrivals are placeholders (0.1 s apart)."""
    rng = np.random.default_rng(seed)
    after = np.where(np.arange(n) >= c, np.arange(n) - c, -1)
    arrival = np.where(after < 0, 0.0, 0.1 * np.arange(n))
    return RequestArrays(arrival, rng.integers(10, 200, n), rng.integers(20, 200, n), None, after,
                         np.where(after < 0, 0.0, gap))


def test_closed_loop_keeps_c_in_flight_and_sends_on_each_finish():
    reqs = _closed(c=4)
    sim = _sim(reqs, max_num_seqs=16)
    while (s := sim.prepare()) is not None:
        assert s.running + s.waiting <= 4
        sim.execute(2, 1)
    st = sim.stats()
    assert st.completed == len(reqs)
    linked = reqs.after >= 0
    # each request was sent exactly gap_s after the one it waited for finished, in the simulation
    np.testing.assert_allclose(sim.arrival_s[linked], sim.finish_s[reqs.after[linked]] + 0.002)
    assert np.all(sim.finish_s > sim.arrival_s)
    # latency counts from the simulated send, not the placeholder timestamps
    np.testing.assert_allclose(st.latencies_s, sim.finish_s - sim.arrival_s)


def test_closed_loop_runs_as_fast_as_the_engine_open_loop_at_the_recorded_pace():
    """Record a closed-loop client at k = 0, then replay: open loop (its recorded send times) k = 4
    cannot finish much sooner than the recording, whatever it saves per request; as the client,
    k = 4 (faster at light load) gets the same work done much sooner."""
    closed = _closed(c=2)
    rec = _sim(closed, max_num_seqs=16)
    s0 = rec.run(lambda s: (0, 1)).sim_time_s
    recorded = RequestArrays(rec.arrival_s, closed.prompt_tokens, closed.output_tokens)
    s_open = _sim(recorded, max_num_seqs=16).run(lambda s: (4, 1)).sim_time_s
    s_closed = _sim(closed, max_num_seqs=16).run(lambda s: (4, 1)).sim_time_s
    assert s_open > 0.9 * s0
    assert s_closed < 0.8 * s0


def test_closed_loop_links_survive_sort_window_and_concat():
    reqs = _closed(n=12, c=3)
    # unsorted input: links follow their requests (given order: request 0 waits on 1, 2 on 0)
    shuffled = RequestArrays([1.0, 0.0, 2.0], [7, 8, 9], [5, 5, 5], None, [1, -1, 0], [0.1, 0.0, 0.2])
    assert shuffled.prompt_tokens.tolist() == [8, 7, 9] and shuffled.after.tolist() == [-1, 0, 1]
    assert shuffled.gap_s.tolist() == [0.0, 0.1, 0.2]
    # a window keeps links inside it; a request whose releaser fell outside arrives at its recorded time
    w = reqs.window(0.35, 0.5)  # requests 4..8 (arrivals 0.4 .. 0.8)
    assert len(w) == 5 and w.after.tolist() == [-1, -1, -1, 0, 1]
    # concat shifts the links with their part
    both = RequestArrays.concat([reqs, reqs])
    assert both.closed_loop == 2 * reqs.closed_loop
    np.testing.assert_array_equal(both.after[12:], np.where(reqs.after >= 0, reqs.after + 12, -1))
    with pytest.raises(ValueError, match="does not arrive before it"):
        RequestArrays([0.0, 1.0], [5, 5], [5, 5], None, [1, -1], [0.0, 0.0])
    with pytest.raises(ValueError, match="after and gap_s go together"):
        RequestArrays([0.0, 1.0], [5, 5], [5, 5], None, [-1, 0], None)


def test_links_of_a_recorded_closed_loop_sweep():
    t = load_trace(TRACES / "cpu-tiny-ngram.sweep-c12-32.jsonl.gz")
    assert t.header["client"] == "closed"
    a, f = t.requests["arrival_s"], t.requests["finish_s"]
    after, gap = closed_loop_links(a, f)
    linked = after >= 0
    assert linked.sum() >= 0.97 * len(a)  # all but the first requests of a level
    assert np.all(after[linked] < np.flatnonzero(linked))
    np.testing.assert_allclose(gap[linked], a[linked] - f[after[linked]])
    assert np.all((gap[linked] >= 0) & (gap[linked] <= 0.05))
    # one finish releases one request, except the last finish of a level, which releases the next
    # level (12, 16, 24, 32 in flight: the sweep starts a level once the previous one drained)
    released = np.bincount(after[linked])
    assert sorted(released[released > 1].tolist()) == [16, 24, 32]
    assert RequestArrays.from_trace(t).closed_loop == linked.sum()  # the header turns it on
    assert RequestArrays.from_trace(t, closed_loop=False).closed_loop == 0


def test_replaying_a_closed_loop_sweep_as_its_client_keeps_its_batch():
    """Open loop, the replay of a saturated closed-loop sweep drifts to another batch size (the
    recorded pace is the recorded engine's, and with a step cost about proportional to the batch
    any batch keeps up); as the client, the replay keeps the recorded concurrency."""
    t = load_trace(TRACES / "cpu-tiny-ngram.sweep-c12-32.jsonl.gz")
    closed = replay_fidelity(t, seed=0)
    opened = replay_fidelity(t, seed=0, closed_loop=False)
    assert closed["closed_loop_requests"] > 500 and opened["closed_loop_requests"] == 0
    assert closed["batch_mean"]["rel_error"] < 0.05
    assert opened["batch_mean"]["rel_error"] > 0.2
    assert closed["steps_replay"] < 1.1 * closed["steps_trace"]


def test_thinning_is_a_weaker_drafter_that_keeps_the_walk_consistent():
    from envs.profiles import agree_walk_gain
    from envs.simulator import thin_agree

    rng = np.random.default_rng(0)
    # a request of easy and hard stretches: runs of agreement counting down, then failures
    base = np.concatenate([[-1]] + [np.minimum(np.arange(n, 0, -1) - 1, 4) for n in rng.integers(1, 12, 400)])
    base = base.astype(np.int8)
    assert thin_agree(base, 0.0, rng).tolist() == base.tolist()
    thin = [thin_agree(base, 0.2, np.random.default_rng(s)) for s in range(20)]
    for t in thin:
        assert t.dtype == base.dtype and len(t) == len(base)
        assert np.all(t <= base) and np.all((t < 0) == (base < 0))  # cut, never lengthened; -1 stays
        # a draft that matched m tokens from position i matches m - 1 from i + 1 (the same tokens)
        i = np.flatnonzero(t[:-1] > 0)
        assert np.all(t[i + 1] >= t[i] - 1)
    # the first position's acceptance drops by the factor 1 - eps
    p0 = np.mean(base[1:] > 0)
    assert np.mean([np.mean(t[1:] > 0) for t in thin]) == pytest.approx(0.8 * p0, rel=0.03)
    g0, g1 = agree_walk_gain([base], 4), agree_walk_gain(thin, 4)
    assert all(b < a for a, b in zip(g0, g1))  # every k's held acceptance drops
    with pytest.raises(ValueError, match="eps"):
        thin_agree(base, 1.5, rng)
    reqs = RequestArrays([0.0, 1.0], [8, 8], [len(base), 3], [base, None])
    t = reqs.thinned(0.5, np.random.default_rng(1))
    assert t.agree[1] is None and np.all(t.agree[0] <= base) and not np.array_equal(t.agree[0], base)
    assert reqs.thinned(0.0, rng) is reqs
