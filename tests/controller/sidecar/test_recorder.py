"""Recording received steps to rotating spec-trace/1 files that the format's reader accepts."""

from __future__ import annotations

from envs.trace import iter_trace, validate_files

from .conftest import random_steps, step


def test_recording_rotates_and_validates(start_sidecar, tmp_path):
    rec = tmp_path / "rec"
    sc = start_sidecar(record_dir=rec, record_max_steps=50, record_keep=2)
    steps = random_steps(130, seed=1)
    for i in range(0, 130, 10):
        assert sc.decide("vllm-0", steps[i:i + 10], max_k=4, widths=[1])[0] == 200
    assert sc.decide("vllm-1", [step(t_s=5.0), step(t_s=6.0)])[0] == 200
    # the engine restarted: its clock went back, so a new file starts
    assert sc.decide("vllm-1", [step(t_s=0.5)])[0] == 200
    sc.server.stop()  # shutdown closes the files
    files0 = sorted((rec / "vllm-0").glob("*.jsonl"))
    files1 = sorted((rec / "vllm-1").glob("*.jsonl"))
    assert len(files0) == 2 and len(files1) == 2
    report = validate_files([str(p) for p in files0 + files1])
    assert all(errs == [] for errs in report.values()), report
    lines = [r for p in files0 for _, r in iter_trace(p)]
    assert sum(r["type"] == "step" for r in lines) == 130 - 50  # 130 in 50/50/30 files; the oldest pruned
    head = next(iter_trace(files0[-1]))[1]
    assert head["source"] == "recorded" and head["max_k"] == 4 and head["widths"] == [1]
    assert sc.value("spec_controller_recorded_steps_total") == 133


def test_recording_flushes_while_running(start_sidecar, tmp_path):
    rec = tmp_path / "rec"
    sc = start_sidecar(record_dir=rec)
    assert sc.decide("e0", random_steps(5))[0] == 200
    from controller.sidecar.harness import wait_until

    path = wait_until(lambda: next(iter((rec / "e0").glob("*.jsonl")), None), 5, what="recording file")
    wait_until(lambda: len(path.read_text().splitlines()) == 6, 5, what="flushed lines")
