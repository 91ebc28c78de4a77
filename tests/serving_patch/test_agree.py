"""Per-request draft agreement: computed like vLLM drafts, written into recorded traces, and walked by
the simulator it reproduces what the real engine accepted."""

import importlib.util

import numpy as np
import pytest

from envs.trace import TraceWriter, load_trace
from serving_patch.agree import annotate_trace, run_lengths

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


def test_run_lengths_count_consecutive_matches_capped():
    m = np.array([1, 1, 0, 1, 1, 1, 1, 1, 0], dtype=bool)
    assert run_lengths(m, 4).tolist() == [2, 1, 0, 4, 4, 3, 2, 1, 0]


def test_annotate_adds_agree_to_the_matching_requests_only(tmp_path):
    p = tmp_path / "t.jsonl.gz"
    with TraceWriter(p, max_k=4, widths=[1], source="recorded") as w:
        w.request(id="r0-1a2b3c4d", arrival_s=0.0, prompt_tokens=5, output_tokens=3, finish_s=1.0)
        w.request(id="r1-0f0f0f0f", arrival_s=0.5, prompt_tokens=5, output_tokens=2, finish_s=1.0)
        w.request(id="r2", arrival_s=0.6, prompt_tokens=5, output_tokens=2)
    # r1's driver-side array is longer than the record (an aborted request): left out, not forced in
    assert annotate_trace(p, {"r0": [-1, 2, 1], "r1": [-1, 0, 0], "r2": [-1, 1]}) == 2
    t = load_trace(p)
    assert [None if a is None else a.tolist() for a in t.agree] == [[-1, 2, 1], None, [-1, 1]]
    # header fields are merged in (record-trace stamps the client kind); the agree arrays stay
    assert annotate_trace(p, {}, header={"client": "closed"}) == 0
    t = load_trace(p)
    assert t.header["client"] == "closed" and t.header["source"] == "recorded" and t.agree[0].tolist() == [-1, 2, 1]


@needs_vllm
@pytest.mark.slow
def test_ngram_agree_follows_vllms_matcher():
    from serving_patch.agree import ngram_agree

    # no bigram repeats: no draft anywhere
    assert ngram_agree([1, 2, 3], [4, 5, 6, 7], 4).tolist() == [-1, -1, -1, -1]
    # periodic: from the first repeated bigram on, the draft is the period's next tokens and all agree
    out = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2]
    assert ngram_agree([1, 2, 3, 4, 5], out, 4).tolist() == [-1, -1, 4, 4, 4, 4, 4, 4, 4, 3, 2, 1]
    assert ngram_agree([1, 2, 3, 4, 5], out, 2).tolist() == [-1, -1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1]


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("method,acc_tol", [("ngram", 0.02), ("draft_model", 0.03)])
def test_simulator_walking_recorded_agree_reproduces_the_engine(tmp_path, method, acc_tol):
    """A static-k recording carries every request's agree array; the simulator replaying those
    requests at the same k takes as many sequence-steps as the engine did (within 1%) and accepts as
    many tokens (the engine also accepts drafts past a request's last token, which agree cannot see)."""
    from envs.scenario import Scenario
    from envs.simulator import Simulator
    from serving_patch.record import record

    out = tmp_path / f"{method}.jsonl.gz"
    summary = record(out, method=method, controller="static:2", explore=0.0, concurrency=[8], waves=True,
                     duration_s=2.0, max_output_tokens=48, start_s=1200, progress=False, log=lambda m: None)
    t = load_trace(out)
    assert summary["agree_requests"] == t.n_requests > 0
    assert all(a is not None and a[0] == -1 for a in t.agree)
    sc = Scenario.from_traces([out])
    sim = Simulator(sc.requests, sc.cost, sc.acceptance, sc.config, seed=0)
    seq = acc = 0
    while (s := sim.prepare()) is not None:
        o = sim.execute(2 if s.batch_size else 0)
        seq += o.batch_size
        acc += o.accepted_tokens
    real_seq, real_acc = int(t.steps["batch_size"].sum()), int(t.steps["accepted_tokens"].sum())
    assert real_acc > 0
    assert abs(seq - real_seq) <= 0.01 * real_seq, (seq, real_seq)
    assert abs(acc - real_acc) <= acc_tol * real_acc, (acc, real_acc)
