"""``record-trace`` on the real engine: a closed-loop sweep with progress bars writes a trace the
trainer can replay, every level's requests with unique ids."""

import importlib.util

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")]


def test_closed_loop_sweep_records_every_level(tmp_path):
    from envs.trace import load_trace, validate_files
    from serving_patch.record import record

    out = tmp_path / "sweep.jsonl.gz"
    summary = record(out, method="ngram", concurrency=[1, 3], duration_s=2.0, explore=0.5, explore_hold=4,
                     start_s=1200, progress=True, log=lambda m: None)
    assert validate_files([out]) == {out: []}
    t = load_trace(out)
    assert summary["finished"] == summary["requests"] == t.n_requests > 0
    assert len(set(t.request_ids)) == t.n_requests
    assert t.steps["batch_size"].max() == 3 and t.steps["batch_size"].min() <= 1
    assert summary["controller"]["explored"] > 0
