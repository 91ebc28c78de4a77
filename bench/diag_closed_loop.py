"""Diagnostic (not a benchmark): one closed-loop level of ``bench_engine.py`` run for off, k = 1,
k = 2 and learned with every run recorded, then where each run's time went.

    C=16 ROUNDS=2 python bench/diag_closed_loop.py      # writes /tmp/diag-closed-loop/*.jsonl.gz

Prints tokens/s per run, and from the recorded steps: prefill steps and their time, the drain
(steps below the level), and the median clean decode step at the level's batch size per k;
learned's calibration (``stats()["source"]["calibration"]``) is saved next to the traces.
Session 26 (bench/HISTORY.md) used it to find that k = 1 ties off on decode steps at c=16 and
loses 8% end to end to the drain of desynchronised requests.
"""
import gzip
import json
import os
import sys
_HERE = os.path.dirname(os.path.abspath(__file__)); sys.path[:0] = [os.path.dirname(_HERE), _HERE]
import bench_engine as be
from pathlib import Path
from serving_patch.engine import EngineSpec, close_llm, engine_defaults, make_llm
be.engine_defaults()
import numpy as np
from serving_patch.load import corpus_token_ids, synth_prompts
from serving_patch.models import build_tiny_models
from serving_patch import controllers, drafter
pair = build_tiny_models(log_fn=print)
ids = corpus_token_ids(str(pair.target / "tokenizer.json"))
prompts = synth_prompts(ids, np.random.default_rng(1).integers(32, 161, size=256), seed=2)
out = Path(os.environ.get("OUT", "/tmp/diag-closed-loop")); out.mkdir(parents=True, exist_ok=True)
policy = be.find_policy(None, "draft_model", out)
C = int(os.environ.get("C", "16")); ROUNDS = int(os.environ.get("ROUNDS", "2"))
lv = be.Level("closed", C)
llm = make_llm(pair.target, pair.draft, EngineSpec(method="draft_model", max_k=4, max_num_seqs=32),
               controller="static:0", log_stats=False, enable_prefix_caching=False)
ctl = controllers()[-1]; ctl.set_calibrate(True)
be.run_level(llm, be.WARM, prompts, 8, 0)
configs = [("off", "static:0"), ("k1", "static:1"), ("k2", "static:2"), ("learned", f"embedded:{policy}")]
res = {}
for r in range(ROUNDS):
    for name, src in (configs if r % 2 == 0 else configs[::-1]):
        ctl.set_source(src); ctl.reset_counters()
        p = out / f"{name}-c{C}-{r}.jsonl.gz"
        ctl.start_recording(str(p))
        tps, lat = be.run_level(llm, lv, prompts, 64, offset=C)
        st = ctl.stats(); ctl.stop_recording()
        res.setdefault(name, []).append(tps)
        print(name, r, f"{tps:.2f} tok/s", "k_steps", st["k_steps"], flush=True)
        if name == "learned":
            json.dump(st["source"].get("calibration"), open(out / f"calib-c{C}-{r}.json", "w"), indent=1, default=str)
print({k: [round(x, 2) for x in v] for k, v in res.items()})
ctl.close(); close_llm(llm)

import statistics

for p in sorted(out.glob(f"*-c{C}-*.jsonl.gz")):
    with gzip.open(p, "rt") as f:
        st = [r for r in map(json.loads, f) if r.get("type") == "step"]
    pf = [r for r in st if r.get("prefill_tokens")]
    drain = [r for r in st if 0 < r["batch_size"] < C and not r.get("prefill_tokens")]
    clean = {}
    for q, r in zip(st, st[1:]):
        if not r.get("prefill_tokens") and r["k"] == q["k"] and r["batch_size"] == C:
            clean.setdefault(r["k"], []).append(r["step_ms"])
    print(f"{p.name}: {len(st)} steps {sum(r['step_ms'] for r in st) / 1000:.2f} s; prefill {len(pf)} steps "
          f"{sum(r['step_ms'] for r in pf) / 1000:.2f} s; drain {len(drain)} steps "
          f"{sum(r['step_ms'] for r in drain) / 1000:.2f} s; clean decode at b={C} (k: n, median ms) "
          f"{ {k: (len(v), round(statistics.median(v), 1)) for k, v in sorted(clean.items())} }")
