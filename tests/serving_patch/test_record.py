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


def test_window_without_requests_is_a_clear_error(tmp_path, capsys):
    from serving_patch.record import main

    assert main(["--out", str(tmp_path / "x.jsonl"), "--method", "ngram", "--concurrency", "3",
                 "--start-s", "99999", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "start_s=99999.0, duration 7200 s (original timeline) holds no request" in err
    assert "choose an earlier --start-s" in err
    assert not (tmp_path / "x.jsonl").exists()


def test_waves_record_whole_waves_that_drain(tmp_path):
    """``--waves``: a wave is sent whole once the previous one has finished, so in the trace the
    batch only grows again after it has drained to nothing, and every wave finishes."""
    from envs.trace import load_trace, validate_files
    from serving_patch.record import main, record

    assert main(["--out", str(tmp_path / "x.jsonl"), "--method", "ngram", "--waves"]) == 2  # needs --concurrency
    out = tmp_path / "waves.jsonl.gz"
    summary = record(out, method="ngram", concurrency=[3], waves=True, duration_s=3.0, max_output_tokens=16,
                     explore=0.5, explore_hold=4, start_s=1200, progress=False, log=lambda m: None)
    assert validate_files([out]) == {out: []}
    t = load_trace(out)
    assert summary["finished"] == t.n_requests and t.n_requests % 3 == 0 and t.n_requests >= 6
    b = t.steps["batch_size"]
    rises = [i for i in range(1, len(b)) if b[i] > b[i - 1]]
    assert len(rises) >= t.n_requests // 3  # at least one rise per wave
    assert all(b[i - 1] == 0 for i in rises), [(int(b[i - 1]), int(b[i])) for i in rises]
    assert "waves of 3" in t.header["notes"]
