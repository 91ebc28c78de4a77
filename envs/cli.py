"""``spec-trace``: check, inspect, import, synthesise, fit and replay ``spec-trace/1`` traces.

    spec-trace validate 'traces/*.jsonl*'         # every bad line of every file, exit 1 if any
    spec-trace info traces/                        # one summary row per trace
    spec-trace import-azure --time-scale 2 --duration-s 600 --out traces/azure-x2.jsonl
    spec-trace synth --requests traces/azure-x2.jsonl --profile h100-llama3-8b-eagle --out t.jsonl.gz
    spec-trace fit traces/t.jsonl.gz --out profile.json   # fitted cost + acceptance, held-out MAPE
    spec-trace replay traces/t.jsonl.gz            # simulator fidelity against the trace
    spec-trace profiles                            # the documented presets
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from envs.trace import TraceError, expand_paths


def _requests_from(path: str, args):
    from envs.azure import read_azure_csv
    from envs.simulator import RequestArrays
    from envs.trace import load_trace

    if path.endswith(".csv"):
        return read_azure_csv(path, time_scale=args.time_scale, start_s=args.start_s, duration_s=args.duration_s)
    trace = load_trace(path)
    if trace.n_requests == 0:
        raise ValueError(f"{path}: the trace has no request records to take arrivals from")
    reqs = RequestArrays.from_trace(trace)
    start = args.start_s / args.time_scale
    dur = args.duration_s / args.time_scale if args.duration_s is not None else float("inf")
    return reqs.window(start, dur, args.time_scale) if (args.time_scale != 1 or args.start_s or
                                                        args.duration_s is not None) else reqs


def cmd_validate(args) -> int:
    from envs.trace import validate_files

    results = validate_files(args.paths)
    bad = 0
    for path, errors in results.items():
        for err in errors[: args.max_errors]:
            print(err)
        if len(errors) > args.max_errors:
            print(f"{path}: ... and {len(errors) - args.max_errors} more errors")
        bad += len(errors)
        if not errors:
            print(f"{path}: ok")
    n_bad = sum(1 for e in results.values() if e)
    print(f"{len(results)} file(s) checked, {n_bad} with errors, {bad} bad line(s)")
    return 1 if bad else 0


def cmd_info(args) -> int:
    from envs.trace import load_trace

    for path in expand_paths(args.paths):
        print(json.dumps(load_trace(path).summary()))
    return 0


def cmd_import_azure(args) -> int:
    from envs.azure import DEFAULT_AZURE_CSV, read_azure_csv, write_requests_trace

    reqs = read_azure_csv(args.csv or DEFAULT_AZURE_CSV, time_scale=args.time_scale, start_s=args.start_s,
                          duration_s=args.duration_s)
    write_requests_trace(reqs, args.out, notes=f"time_scale={args.time_scale}, start_s={args.start_s}, "
                                                 f"duration_s={args.duration_s}. " + _attribution())
    print(f"wrote {len(reqs)} requests over {reqs.span_s:.1f}s to {args.out}")
    return 0


def _attribution() -> str:
    from envs.azure import AZURE_ATTRIBUTION
    return AZURE_ATTRIBUTION


def cmd_synth(args) -> int:
    from envs.profiles import PROFILES
    from envs.synth import synthesise

    if args.profile not in PROFILES:
        raise ValueError(f"--profile {args.profile!r} is unknown; choose one of {sorted(PROFILES)}")
    reqs = _requests_from(args.requests, args)
    summary = synthesise(reqs, PROFILES[args.profile], args.out, explore=args.explore, seed=args.seed,
                         progress=not args.quiet)
    print(json.dumps({"out": args.out, **summary}))
    return 0


def cmd_fit(args) -> int:
    from envs.scenario import Scenario

    sc = Scenario.from_traces(args.paths, seed=args.seed, acceptance_bin_s=args.bin_s)
    rep = sc.cost.report
    print(f"cost fit: {rep['n_train']} train / {rep['n_holdout']} held-out steps, "
          f"MAPE train {rep['mape_train']:.2%}, held-out {rep.get('mape_holdout', float('nan')):.2%}")
    for k, v in rep.get("mape_holdout_by_k", {}).items():
        print(f"  k={k}: held-out MAPE {v:.2%}")
    acc = sc.acceptance
    print("acceptance p per position: " + ", ".join(f"{p:.3f}" for p in acc.p)
          + f"; drift over {len(acc.delta)} bins of {acc.bin_s:g}s, std {acc.report['delta_std']:.3f} logits")
    if args.out:
        Path(args.out).write_text(json.dumps({"cost": sc.cost.to_dict(), "acceptance": acc.to_dict(),
                                              "config": sc.config.__dict__ | {"widths": list(sc.config.widths)},
                                              "provenance": sc.provenance}, indent=1))
        print(f"wrote {args.out}")
    return 0


def cmd_replay(args) -> int:
    from envs.synth import replay_fidelity
    from envs.trace import load_trace

    worst = 0.0
    for path in expand_paths(args.paths):
        rep = replay_fidelity(load_trace(path), seed=args.seed, closed_loop=not args.open_loop)
        worst = max(worst, rep["max_rel_error"])
        linked = rep["closed_loop_requests"]
        print(f"{path}: {rep['steps_trace']} steps recorded, {rep['steps_replay']} replayed"
              + (f" (closed loop: {linked} requests sent on a finish)" if linked else ""))
        for name in ("step_ms_mean", "step_ms_p50", "step_ms_p90", "step_ms_p99", "batch_mean", "decode_tps",
                     "busy_s"):
            v = rep[name]
            print(f"  {name:13s} trace {v['trace']:>11.3f}  replay {v['replay']:>11.3f}  error {v['rel_error']:.2%}")
    print(f"worst relative error {worst:.2%}")
    return 0


def cmd_profiles(args) -> int:
    from envs.profiles import PROFILES

    for name, p in PROFILES.items():
        print(f"{name}: max_k={p.max_k} widths={list(p.widths)} max_num_seqs={p.max_num_seqs}\n  {p.description}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="spec-trace", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("validate", help="check every line of traces; exit 1 on any error")
    p.add_argument("paths", nargs="+", help="files, directories or globs")
    p.add_argument("--max-errors", type=int, default=50, help="errors shown per file (all are counted)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("info", help="summarise traces")
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=cmd_info)

    def window_args(p):
        p.add_argument("--time-scale", type=float, default=1.0, help="arrival-rate multiplier (x2 = twice the load)")
        p.add_argument("--start-s", type=float, default=0.0, help="window start on the original timeline")
        p.add_argument("--duration-s", type=float, default=None, help="window length on the original timeline")

    p = sub.add_parser("import-azure", help="Azure LLM trace 2023 CSV -> request records (CC-BY 4.0)")
    p.add_argument("--csv", default=None, help="default: traces/azure/azure-llm-2023-conv.csv")
    p.add_argument("--out", required=True)
    window_args(p)
    p.set_defaults(func=cmd_import_azure)

    p = sub.add_parser("synth", help="requests + profile preset -> full synthetic trace with explored actions")
    p.add_argument("--requests", required=True, help="Azure-format CSV or a trace with request records")
    p.add_argument("--profile", required=True, help="preset name (see `spec-trace profiles`)")
    p.add_argument("--out", required=True, help=".jsonl or .jsonl.gz")
    p.add_argument("--explore", type=float, default=0.3, help="probability of a random action per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    window_args(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("fit", help="fit cost and acceptance profiles; print held-out error")
    p.add_argument("paths", nargs="+")
    p.add_argument("--out", default=None, help="write the fitted profiles as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bin-s", type=float, default=30.0, help="acceptance drift time bin (seconds)")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("replay", help="replay traces' own actions in the fitted simulator; print errors")
    p.add_argument("paths", nargs="+")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--open-loop", action="store_true",
                   help="replay recorded arrival times even where the header says the client was closed-loop")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("profiles", help="list the documented profile presets")
    p.set_defaults(func=cmd_profiles)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (TraceError, FileNotFoundError, ValueError) as exc:
        print(f"spec-trace {args.cmd}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
