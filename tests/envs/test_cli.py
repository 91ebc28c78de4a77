"""The spec-trace CLI end to end: import -> synth -> validate -> fit -> replay, and its errors."""

import json

from envs.cli import main


def test_pipeline(tmp_path, capsys):
    req = tmp_path / "az.jsonl"
    out = tmp_path / "syn.jsonl.gz"
    prof = tmp_path / "profile.json"
    assert main(["import-azure", "--time-scale", "2", "--duration-s", "60", "--out", str(req)]) == 0
    assert main(["synth", "--requests", str(req), "--profile", "h100-llama3-8b-eagle", "--out", str(out),
                 "--quiet", "--seed", "3"]) == 0
    assert main(["validate", str(out)]) == 0
    assert main(["info", str(out)]) == 0
    assert main(["fit", str(out), "--out", str(prof)]) == 0
    fitted = json.loads(prof.read_text())
    assert fitted["cost"]["kind"] == "fitted" and fitted["provenance"]["traces"][0]["sha256"]
    assert main(["replay", str(out)]) == 0
    text = capsys.readouterr().out
    assert "held-out" in text and "worst relative error" in text and "decode_tps" in text


def test_synth_from_csv_window(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert main(["synth", "--requests", "traces/azure/azure-llm-2023-conv.csv", "--duration-s", "20",
                 "--profile", "h100-llama3-8b-tree-drift", "--out", str(out), "--quiet"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["completed"] == line["requests"] > 0


def test_errors_are_clear_and_exit_2(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "missing*.jsonl")]) == 2
    assert "no trace file matches" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type":"header","schema":"spec-trace/1","source":"recorded","max_k":2,"widths":[1]}\n{"type":"x"}\n')
    assert main(["fit", str(bad)]) == 2
    assert "bad.jsonl:2: type: expected one of" in capsys.readouterr().err
    assert main(["synth", "--requests", str(bad), "--profile", "nope", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "--profile 'nope' is unknown" in capsys.readouterr().err


def test_synth_from_a_closed_loop_sweep_sends_requests_when_the_simulation_did(tmp_path, capsys):
    out = tmp_path / "closed.jsonl.gz"
    sweep = "traces/cpu-tiny-ngram.sweep-c12-32.jsonl.gz"
    assert main(["synth", "--requests", sweep, "--duration-s", "30", "--profile", "h100-llama3-8b-eagle",
                 "--out", str(out)]) == 0
    assert main(["validate", str(out)]) == 0
    from envs.trace import load_trace

    t = load_trace(out)
    assert t.header["client"] == "closed"
    # on the (much faster) H100 profile the client sends its next requests long before the CPU engine did
    rec = load_trace(sweep).requests["arrival_s"]
    assert t.requests["arrival_s"][-1] < 0.5 * rec[rec < 30].max()
