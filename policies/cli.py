"""``train-controller``: traces in, a trained controller and an honest report out.

    train-controller --trace 'traces/*.jsonl*' --out out/controller

Traces are grouped by engine configuration (model, draft, hardware, method, max_k, widths):
one controller per group, in ``OUT/<group>/``.  For each group it fits the cost and
acceptance profiles, trains on the first 80% of the timeline, evaluates the learned
policy next to every baseline and the hindsight oracle on the held-out last 20% across
the load scales, and writes ``policy.json`` (numpy-loadable artifact), ``vllm_schedule.json``,
``report.md``, ``report.json``, PNG plots and the SB3 checkpoint.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from envs.trace import Trace, TraceError, expand_paths, load_trace
from policies.machine import machine_line

TEST_FRACTION = 0.2


def group_traces(traces: list[Trace]) -> dict[str, list[Trace]]:
    """Traces that describe the same engine setup (they can share one cost profile)."""
    groups: dict[tuple, list[Trace]] = {}
    for t in traces:
        h = t.header
        key = (h.get("model"), h.get("draft"), h.get("hardware"), h.get("method"), h["max_k"], tuple(h["widths"]))
        groups.setdefault(key, []).append(t)
    out = {}
    for key, ts in groups.items():
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(str(x) for x in key[:1] + key[3:5] if x)).strip("-")
        if not name or name in out:
            name = f"{name or 'group'}-{len(out)}"
        # the longest timeline gives the arrivals (most held-out windows); others add cost coverage
        out[name] = sorted(ts, key=lambda t: -(t.requests["arrival_s"][-1] if t.n_requests else -1))
    return out


def _versions() -> dict:
    import gymnasium
    import stable_baselines3
    import torch

    return {"python": platform.python_version(), "numpy": np.__version__, "gymnasium": gymnasium.__version__,
            "stable_baselines3": stable_baselines3.__version__, "torch": torch.__version__}


def typical_decision(artifact, scenario, trace: Trace):
    """The policy's batch-size table at the trace's typical state (median KV use, no queue, fitted acceptance)."""
    from controller.features import FeatureState

    st = FeatureState(artifact.feature_spec)
    st.alpha = st.accept0 = float(scenario.acceptance.p[0])
    kv = float(np.median(trace.steps["kv_usage"])) if trace.n_steps else 0.0
    return artifact.decision(st, waiting=0, kv_usage=kv, prefill_pending=0)


def run_group(name: str, traces: list[Trace], args, out: Path, log) -> dict:
    from envs.scenario import Scenario
    from envs.spec_env import SpecDecodeEnv
    from policies.baselines import baseline_suite
    from policies.evaluate import evaluate, held_out_windows, summarise
    from policies.report import summary_table, write_report
    from policies.train import LearnedPolicy, TrainConfig, config_dict, export_artifact, train

    out.mkdir(parents=True, exist_ok=True)
    log(f"[{name}] {len(traces)} trace(s): fitting profiles")
    scenario = Scenario.from_traces(traces, seed=args.seed, closed_loop=args.closed_loop)
    if scenario.requests.closed_loop:
        log(f"[{name}] closed loop: {scenario.requests.closed_loop} of {len(scenario.requests)} requests are sent "
            f"when the one they waited for finishes")
    rep = scenario.cost.report
    log(f"[{name}] cost fit held-out MAPE {rep.get('mape_holdout', float('nan')):.2%} on {rep['n_steps']} steps; "
        f"acceptance p0 {scenario.acceptance.p[0]:.3f}")
    cfg = TrainConfig(algo=args.algo, timesteps=args.timesteps, budget_minutes=args.budget_minutes, seed=args.seed,
                      window_s=args.window_s, load_scales=tuple(args.load_scales),
                      train_range=(0.0, 1.0 - TEST_FRACTION), progress=not args.no_progress,
                      min_gain=args.min_gain,
                      **({} if args.accept_thinning is None else {"accept_thinning": args.accept_thinning}),
                      **({} if args.accept_trials is None else {"accept_trials": args.accept_trials}))
    log(f"[{name}] training ({cfg.algo}, {cfg.timesteps} timesteps"
        + (f", budget {cfg.budget_minutes} min" if cfg.budget_minutes else "") + ")")
    res = train(scenario, cfg)
    log(f"[{name}] trained {res.timesteps} timesteps in {res.seconds:.0f}s ({res.stopped})")
    env = SpecDecodeEnv(scenario, window_s=args.window_s, load_scales=args.load_scales,
                        accept_trials=cfg.accept_trials)
    artifact = export_artifact(res.model, env, version=f"{name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}",
                               min_gain=cfg.min_gain)

    windows = held_out_windows(scenario, args.load_scales, args.window_s, args.eval_windows, (1 - TEST_FRACTION, 1.0))
    user_table = json.loads(args.table) if args.table else None
    policies = [LearnedPolicy(artifact)] + baseline_suite(env, traces, user_table, seed=args.seed)
    log(f"[{name}] evaluating {len(policies)} policies on {len(windows)} held-out windows")
    t0 = time.perf_counter()
    results = evaluate(policies, scenario, windows, window_s=args.window_s, seed=args.seed)
    summary = summarise(results)
    log(f"[{name}] evaluation took {time.perf_counter() - t0:.0f}s")

    decision = typical_decision(artifact, scenario, traces[0])
    schedule = {"num_speculative_tokens_per_batch_size": decision.ranges(),
                "num_speculative_tokens": int(scenario.config.max_k),
                "widths_by_batch_size": [[b, w] for b, (_k, w) in enumerate(decision.table) if b and w != 1],
                "note": "the learned policy's k per batch size at the trace's typical state (median KV use, no "
                        "queue, fitted acceptance); paste into vLLM's speculative_config. The plugin adapts per step."}
    (out / "vllm_schedule.json").write_text(
        "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in schedule.items()) + "\n}\n")

    meta = {"test_fraction": TEST_FRACTION, "window_s": args.window_s, "windows_per_load": args.eval_windows,
            "machine": machine_line().removeprefix("machine: "),
            "train": {"algo": cfg.algo, "timesteps": res.timesteps, "seconds": res.seconds,
                                            "stopped": res.stopped},
            "cost_fit": scenario.cost.report, "acceptance_fit": scenario.acceptance.report}
    report = write_report(out, name, summary, results, env.actions.actions, res.curve, meta,
                          make_plots=not args.no_plots)
    artifact.provenance = {"traces": [{"path": str(t.path), "sha256": t.sha256, "source": t.header["source"]}
                                      for t in traces],
                           "seed": args.seed, "versions": _versions(), "train_config": config_dict(cfg),
                           "engine": scenario.config.__dict__ | {"widths": list(scenario.config.widths)},
                           "closed_loop_requests": scenario.requests.closed_loop,
                           "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    artifact.evaluation = {"ratios": report["ratios"], "summary": report["summary"]}
    artifact.save(out / "policy.json")
    res.model.save(out / "sb3_model.zip")
    print(f"\n== {name} ==  ({out})")
    print(summary_table(summary))
    o = report["ratios"]["overall"]
    print(f"learned/oracle goodput: overall {o['learned_vs_oracle_goodput']:.3f}, worst load "
          f"{o['min_learned_vs_oracle_goodput']:.3f}; "
          f"worst mean-latency ratio {o['max_learned_vs_oracle_latency']:.3f}; "
          + (f"vs expected-value oracle {o['learned_vs_oracle_ev_goodput']:.3f} (worst load "
             f"{o['min_learned_vs_oracle_ev_goodput']:.3f}, worst latency {o['max_learned_vs_oracle_ev_latency']:.3f}); "
             if "learned_vs_oracle_ev_goodput" in o else "")
          + f"worst learned/best-static {o['min_learned_vs_best_static_goodput']:.3f}; "
          + ", ".join(f"vs {k[11:-8]} {v:.3f}" for k, v in o.items()
                      if k.startswith("learned_vs_") and not k.startswith("learned_vs_oracle")))
    print(f"vLLM schedule: {schedule['num_speculative_tokens_per_batch_size']}")
    return report


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="train-controller", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", nargs="+", required=True, metavar="GLOB", help="trace files, directories or globs")
    ap.add_argument("--out", default="out/controller", help="output directory (default: out/controller)")
    ap.add_argument("--algo", default="hindsight", choices=("hindsight", "ppo", "dqn", "maskable-ppo"))
    ap.add_argument("--timesteps", type=int, default=150_000, help="training samples / env steps")
    ap.add_argument("--min-gain", type=float, default=None,
                    help="hindsight: speculate only where the predicted speed-up over k = 0 is at least 1 + this "
                         "(default 0.02; 0 = the plain argmax)")
    ap.add_argument("--accept-thinning", type=float, default=None, metavar="EPS",
                    help="training episodes replay the traces with a weaker drafter: each output token becomes "
                         "unpredictable with a chance drawn from [0, EPS), so the policy learns how the best k "
                         "moves with the acceptance it observes (default 0.3; 0 = the traces' own level)")
    ap.add_argument("--accept-trials", type=int, default=None, metavar="N",
                    help="the acceptance features (alpha, accept0) average over about the last N drafted tokens, "
                         "at any batch size (default 150: about 60 steps at batch 1; 0 = a per-step average, "
                         "whose window in tokens grows with the batch)")
    ap.add_argument("--budget-minutes", type=float, default=None, help="stop training after this wall time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--load-scales", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0],
                    help="arrival-rate multipliers to evaluate (and train) on")
    ap.add_argument("--window-s", type=float, default=30.0, help="episode / evaluation window (seconds)")
    ap.add_argument("--eval-windows", type=int, default=2, help="held-out windows per load scale")
    ap.add_argument("--table", default=None,
                    help="a user batch-size table to compare, vLLM list form, e.g. '[[1,16,4],[17,64,2],[65,256,0]]'")
    ap.add_argument("--closed-loop", action="store_true",
                    help="replay traces recorded from a closed-loop client (header \"client\": \"closed\", e.g. "
                         "record-trace --concurrency) as that client: each request sent when the one it waited for "
                         "finishes in the simulation, not at its recorded time")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-plots", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        if args.timesteps < 1:
            raise ValueError(f"--timesteps must be >= 1, got {args.timesteps}")
        if args.min_gain is not None and args.algo != "hindsight":
            raise ValueError(f"--min-gain applies to --algo hindsight (its outputs are speed-ups over k = 0), not "
                             f"{args.algo}: leave it out")
        if args.min_gain is not None and not 0 <= args.min_gain < 1:
            raise ValueError(f"--min-gain must be in [0, 1), got {args.min_gain}")
        if args.accept_thinning is not None and not 0 <= args.accept_thinning < 1:
            raise ValueError(f"--accept-thinning must be in [0, 1), got {args.accept_thinning}")
        if args.accept_trials is not None and args.accept_trials < 0:
            raise ValueError(f"--accept-trials must be >= 0 drafted tokens (0 = per step), got {args.accept_trials}")
        if any(s <= 0 for s in args.load_scales):
            raise ValueError(f"--load-scales must be positive, got {args.load_scales}")
        if args.table:
            try:
                t = json.loads(args.table)
                assert isinstance(t, list) and all(isinstance(r, list) and len(r) == 3 for r in t)
            except (json.JSONDecodeError, AssertionError):
                raise ValueError(f"--table must be a JSON list of [lo, hi, k] triples, got {args.table!r}") from None
        paths = expand_paths(args.trace)
        traces = [load_trace(p) for p in paths]
        usable = [t for t in traces if t.n_steps and t.n_requests]
        for t in traces:
            if t not in usable:
                log(f"skipping {t.path}: it needs both request and step records (an imported trace needs "
                    f"`spec-trace synth` first)")
        if not usable:
            raise ValueError("no trace has both request and step records to train on")
        import torch
        torch.set_num_threads(1)
        out = Path(args.out)
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # range warnings are summarised in the report
            reports = {name: run_group(name, ts, args, out / name, log) for name, ts in group_traces(usable).items()}
        (out / "summary.json").write_text(json.dumps({n: r["ratios"] for n, r in reports.items()}, indent=1,
                                                     default=float))
        log(f"done in {time.perf_counter() - started:.0f}s; reports in {out}/*/report.md")
        return 0
    except (TraceError, FileNotFoundError, ValueError) as exc:
        print(f"train-controller: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
