"""Diagnostic (not a benchmark): one closed-loop level of ``bench_engine.py`` run for off, k = 1,
k = 2 and learned with every run recorded, then where each run's time went.

    C=16 ROUNDS=2 python bench/diag_closed_loop.py      # writes /tmp/diag-closed-loop/*.jsonl.gz

Prints tokens/s per run, and from the recorded steps: prefill steps and their time, the drain
(decode steps below the level), and the median clean decode step at the level's batch size per k;
learned's calibration (``stats()["source"]["calibration"]``) is saved next to the traces.
Session 26 (bench/HISTORY.md) used it to find that k = 1 ties off on decode steps at c=16 and
loses 8% end to end to desynchronised requests (prefills one at a time, a drain at the end).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import bench_engine as be  # noqa: E402  (also hides broken add-ons, as bench_engine does)


def where_time_went(path: Path, c: int) -> str:
    """One recorded run's steps: all, prefill, drain (decode below ``c``), clean decode at ``c`` per k."""
    from envs.trace import iter_trace

    st = [r for _, r in iter_trace(path) if r.get("type") == "step"]
    pf = [r for r in st if r.get("prefill_tokens")]
    drain = [r for r in st if 0 < r["batch_size"] < c and not r.get("prefill_tokens")]
    clean: dict[int, list[float]] = {}
    for q, r in zip(st, st[1:]):
        if not r.get("prefill_tokens") and r["k"] == q["k"] and r["batch_size"] == c:
            clean.setdefault(r["k"], []).append(r["step_ms"])

    def secs(rs):
        return sum(r["step_ms"] for r in rs) / 1000

    med = {k: (len(v), round(statistics.median(v), 1)) for k, v in sorted(clean.items())}
    return (f"{path.name}: {len(st)} steps {secs(st):.2f} s; prefill {len(pf)} steps {secs(pf):.2f} s; "
            f"drain {len(drain)} steps {secs(drain):.2f} s; clean decode at b={c} (k: n, median ms) {med}")


def learned_engine(out: Path):
    """The diagnostics' engine: ``(llm, its StepController, closed-loop prompts, policy path)`` for
    ``draft_model`` on the tiny pair, calibration on, warmed up; the policy trained under ``out``."""
    be.engine_defaults()
    from serving_patch import controllers
    from serving_patch.load import corpus_token_ids
    from serving_patch.models import build_tiny_models

    pair = build_tiny_models(log_fn=print)
    prompts = be.closed_loop_prompts(corpus_token_ids(str(pair.target / "tokenizer.json")))
    policy = be.find_policy(None, "draft_model", out)
    llm = be.make_llm(pair.target, pair.draft, be.EngineSpec(method="draft_model", max_k=be.MAX_K, max_num_seqs=32),
                      controller="static:0", log_stats=False, enable_prefix_caching=False)
    ctl = controllers()[-1]
    ctl.set_calibrate(True)
    be.run_level(llm, be.WARM, prompts, 8, 0)
    return llm, ctl, prompts, policy


def main() -> int:
    c, rounds = int(os.environ.get("C", "16")), int(os.environ.get("ROUNDS", "2"))
    out = Path(os.environ.get("OUT", "/tmp/diag-closed-loop"))
    out.mkdir(parents=True, exist_ok=True)
    llm, ctl, prompts, policy = learned_engine(out)
    configs = [("off", "static:0"), ("k1", "static:1"), ("k2", "static:2"), ("learned", f"embedded:{policy}")]
    runs: dict[str, list[Path]] = {}
    for r in range(rounds):
        for name, src in configs if r % 2 == 0 else configs[::-1]:
            ctl.set_source(src)
            ctl.reset_counters()
            path = out / f"{name}-c{c}-{r}.jsonl.gz"
            ctl.start_recording(str(path))
            tps, _ = be.run_level(llm, be.Level("closed", c), prompts, 64, offset=c)
            st = ctl.stats()
            ctl.stop_recording()
            runs.setdefault(name, []).append(path)
            print(f"{name} round {r}: {tps:.2f} tokens/s, steps by k {st['k_steps']}", flush=True)
            if name == "learned":
                (out / f"calib-c{c}-{r}.json").write_text(
                    json.dumps(st["source"].get("calibration"), indent=1, default=str))
    ctl.close()
    be.close_llm(llm)
    for paths in runs.values():
        for path in paths:
            print(where_time_went(path, c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
