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


def test_recorded_requests_make_a_trace_the_trainer_can_replay(start_sidecar, tmp_path):
    """Requests that come with the decide calls are written beside the steps, so the sidecar's
    recording holds arrivals: a Scenario (what train-controller builds) replays it."""
    from envs.scenario import Scenario
    from envs.trace import load_trace

    rec = tmp_path / "rec"
    sc = start_sidecar(record_dir=rec)
    steps = random_steps(60, seed=3)
    reqs = [{"id": f"r{i}", "arrival_s": 0.1 * i, "prompt_tokens": 50 + i, "output_tokens": 20, "finish_s": 0.1 * i + 2}
            for i in range(12)]
    for j in range(6):
        assert sc.decide("e0", steps[10 * j:10 * j + 10], requests=reqs[2 * j:2 * j + 2], max_k=4, widths=[1])[0] == 200
    # arrival order is the engine's promise; one that goes back (an engine restart) is dropped, counted
    back = {"id": "late", "arrival_s": 0.0, "prompt_tokens": 5, "output_tokens": 1}
    assert sc.decide("e0", [], requests=[back], max_k=4, widths=[1])[0] == 200
    assert sc.value("spec_controller_recorded_requests_total") == 12
    assert sc.value("spec_controller_recorder_errors_total") == 1
    sc.server.stop()
    (path,) = sorted((rec / "e0").glob("*.jsonl"))
    assert validate_files([str(path)]) == {path: []}
    t = load_trace(path)
    assert t.n_requests == 12 and t.n_steps == 60
    assert list(t.requests["prompt_tokens"]) == [50 + i for i in range(12)]
    scen = Scenario.from_traces([t])
    assert len(scen.requests.arrival_s) == 12


def test_bad_request_records_are_422_naming_the_field(start_sidecar, tmp_path):
    sc = start_sidecar(record_dir=tmp_path / "rec")
    bad = {"id": "r0", "arrival_s": 1.0, "prompt_tokens": 5, "output_tokens": 0}
    status, body = sc.decide("e0", [], requests=[bad])
    assert status == 422
    assert body["detail"][0]["loc"][:4] == ["body", "requests", 0, "output_tokens"], body
