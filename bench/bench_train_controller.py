"""Benchmark: the main job end to end on the shipped traces, ratios side by side in one run.

Runs ``train-controller --trace 'traces/*.jsonl*'`` (default settings: hindsight training,
held-out last 20% of each timeline, load scales x0.5..x8) and prints, per engine group,
the issue's headline ratios measured in that one run: learned / oracle goodput and mean
latency per load, learned / max(off, best static k) per load, and learned vs the Nightjar
bandit, the EMA controller, goodput-greedy and the fitted batch-size table overall.

    python bench/bench_train_controller.py [--timesteps N] [--algo ppo] [extra train-controller args]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from machine import machine_line  # noqa: E402

from policies.cli import main as train_controller  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", nargs="+", default=["traces/*.jsonl*"])
    ap.add_argument("--out", default=None, help="keep the outputs here (default: a temp dir)")
    args, extra = ap.parse_known_args()
    print(machine_line())
    out = args.out or tempfile.mkdtemp(prefix="bench-tc-")
    t0 = time.perf_counter()
    rc = train_controller(["--trace", *args.trace, "--out", out, "--no-progress", *extra])
    wall = time.perf_counter() - t0
    if rc:
        return rc
    summary = json.loads(open(os.path.join(out, "summary.json")).read())
    print(f"\n=== train-controller wall time: {wall:.0f} s (budget 600 s) ===")
    for group, rat in summary.items():
        print(f"\n[{group}]")
        print(f"{'load':>6} {'learned/oracle goodput':>23} {'learned/oracle latency':>23} {'/oracle-ev goodput':>19} "
              f"{'/oracle-ev latency':>19} {'best static':>12} {'learned/best static':>20}")
        for load, r in rat["by_load"].items():
            print(f"{'x' + load:>6} {r['learned_vs_oracle_goodput']:>23.3f} {r['learned_vs_oracle_latency']:>23.3f} "
                  f"{r.get('learned_vs_oracle_ev_goodput', float('nan')):>19.3f} "
                  f"{r.get('learned_vs_oracle_ev_latency', float('nan')):>19.3f} "
                  f"{r['best_static']:>12} {r['learned_vs_best_static_goodput']:>20.3f}")
        o = rat["overall"]
        print("overall (geometric mean over loads): "
              + ", ".join(f"learned/{k[len('learned_vs_'):-len('_goodput')]} {v:.3f}" for k, v in o.items()
                          if k.startswith("learned_vs_")))
    print(f"\noutputs: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
