"""train-controller end to end on a small trace, and its refusals of bad input."""

import json

from controller.artifact import PolicyArtifact
from policies.cli import main


def test_tiny_run_writes_everything(tmp_path, small_synthetic_trace, capsys):
    out = tmp_path / "out"
    rc = main(["--trace", str(small_synthetic_trace), "--out", str(out), "--timesteps", "1500", "--load-scales", "1",
               "2", "--eval-windows", "1", "--window-s", "10", "--no-progress",
               "--table", "[[1, 16, 3], [17, 256, 1]]", "--accept-trials", "40"])
    assert rc == 0
    (group,) = [p for p in out.iterdir() if p.is_dir()]
    for f in ("policy.json", "vllm_schedule.json", "report.md", "report.json", "sb3_model.zip",
              "goodput_latency_vs_load.png", "k_by_batch.png", "accept_rate_vs_load.png", "training_curve.png"):
        assert (group / f).exists(), f
    art = PolicyArtifact.load(group / "policy.json")
    assert art.provenance["traces"][0]["sha256"] and art.provenance["versions"]["stable_baselines3"]
    assert "ratios" in art.evaluation
    # the served features average acceptance as training did
    assert art.feature_spec.accept_trials == 40 and art.provenance["train_config"]["accept_trials"] == 40
    sched = json.loads((group / "vllm_schedule.json").read_text())["num_speculative_tokens_per_batch_size"]
    assert sched[0][0] == 1 and sched[-1][1] == art.feature_spec.max_num_seqs
    assert all(a[1] + 1 == b[0] for a, b in zip(sched, sched[1:]))  # contiguous ranges
    report = json.loads((group / "report.json").read_text())
    pols = set(report["summary"])
    assert {"learned", "oracle", "off", "static-k1", "table-user", "table-fitted", "nightjar", "ema",
            "goodput-greedy"} <= pols
    printed = capsys.readouterr().out
    assert "| **learned** |" in printed and "learned/oracle goodput" in printed


def test_bad_inputs(tmp_path, capsys):
    assert main(["--trace", str(tmp_path / "none*.jsonl")]) == 2
    assert "no trace file matches" in capsys.readouterr().err
    assert main(["--trace", "traces", "--table", "[1,2]"]) == 2
    assert "--table must be" in capsys.readouterr().err
    assert main(["--trace", "traces", "--algo", "ppo", "--min-gain", "0.02"]) == 2
    assert "--min-gain applies to --algo hindsight" in capsys.readouterr().err
    assert main(["--trace", "traces", "--min-gain", "1.5"]) == 2
    assert "--min-gain must be in [0, 1)" in capsys.readouterr().err
    assert main(["--trace", "traces", "--accept-thinning", "1"]) == 2
    assert "--accept-thinning must be in [0, 1), got 1.0" in capsys.readouterr().err
    assert main(["--trace", "traces", "--accept-trials", "-1"]) == 2
    assert "--accept-trials must be >= 0 drafted tokens (0 = per step), got -1" in capsys.readouterr().err
    imported = tmp_path / "imp.jsonl"
    imported.write_text('{"type":"header","schema":"spec-trace/1","source":"imported","max_k":1,"widths":[1]}\n'
                        '{"type":"request","id":"a","arrival_s":0,"prompt_tokens":3,"output_tokens":4}\n')
    assert main(["--trace", str(imported)]) == 2
    err = capsys.readouterr().err
    assert "spec-trace synth" in err and "no trace has both" in err


def test_closed_loop_training_replays_the_sweep_as_its_client(tmp_path, capsys):
    from pathlib import Path

    sweep = Path(__file__).resolve().parents[2] / "traces" / "cpu-tiny-ngram.sweep-c12-32.jsonl.gz"
    out = tmp_path / "out"
    rc = main(["--trace", str(sweep), "--out", str(out), "--timesteps", "500", "--load-scales", "1",
               "--eval-windows", "1", "--window-s", "20", "--no-progress", "--no-plots", "--closed-loop"])
    assert rc == 0
    assert "closed loop: 573 of 585 requests are sent when the one they waited for finishes" in capsys.readouterr().err
    (group,) = [p for p in out.iterdir() if p.is_dir()]
    art = PolicyArtifact.load(group / "policy.json")
    assert art.provenance["closed_loop_requests"] == 573
