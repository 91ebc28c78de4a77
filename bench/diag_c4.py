"""Diagnostic (not a benchmark): what the online calibration learns across two load levels.

    C1=30 C4=10 python bench/diag_c4.py      # writes /tmp/diag-c4/*.jsonl.gz

Runs the learned controller (policy trained on the shipped traces, calibration on) for ``C1``
closed-loop rounds at concurrency 1, prints the calibration (overrides, acceptance per k, measured
rates per batch-size bucket), then ``C4`` rounds at concurrency 4 of static k = 1, static k = 2
and learned in alternating order, each run recorded, with the calibration after every round.
Session 31 (bench/HISTORY.md) used it to find that acceptance pooled per k compared traffic of
different times (k = 1's moved from 0.30 to 0.59 between the levels while k = 2's, explored in
holds, stayed below it).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import bench_engine as be  # noqa: E402  (also hides broken add-ons, as bench_engine does)
from diag_closed_loop import learned_engine  # noqa: E402

KEYS = ("overrides", "capped", "accept", "rates", "explorations")


def main() -> int:
    c1, c4 = int(os.environ.get("C1", "30")), int(os.environ.get("C4", "10"))
    out = Path(os.environ.get("OUT", "/tmp/diag-c4"))
    out.mkdir(parents=True, exist_ok=True)
    be.MIN_REQUESTS, be.PER_C = 2, 1  # as bench_engine --min-requests 2 --per-concurrency 1
    llm, ctl, prompts, policy = learned_engine(out)
    learned = f"embedded:{policy}"

    def calibration(st: dict) -> str:  # a learned run's stats (the calibration is kept across set_source)
        cal = st["source"]["calibration"]
        return json.dumps({k: cal[k] for k in KEYS})

    for r in range(c1):
        ctl.set_source(learned)
        ctl.reset_counters()
        tps, _ = be.run_level(llm, be.Level("closed", 1), prompts, 64, offset=1)
        print(f"c=1 learned round {r}: {tps:.1f} tokens/s, steps by k {ctl.stats()['k_steps']}", flush=True)
    print(f"calibration after c=1: {calibration(ctl.stats())}", flush=True)
    configs = [("k1", "static:1"), ("k2", "static:2"), ("learned", learned)]
    for r in range(c4):
        cal = ""
        for name, src in configs if r % 2 == 0 else configs[::-1]:
            ctl.set_source(src)
            ctl.reset_counters()
            ctl.start_recording(str(out / f"{name}-c4-{r}.jsonl.gz"))
            tps, _ = be.run_level(llm, be.Level("closed", 4), prompts, 64, offset=4)
            st = ctl.stats()
            ctl.stop_recording()
            print(f"c=4 {name} round {r}: {tps:.1f} tokens/s, steps by k {st['k_steps']}", flush=True)
            if name == "learned":
                cal = calibration(st)
        print(f"  calibration after learned's run in round {r}: {cal}", flush=True)
    ctl.close()
    be.close_llm(llm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
