"""``record-trace``: replay real request arrivals against a real vLLM engine and record the steps.

    record-trace --method draft_model --time-scale 0.2 --duration-s 60 \\
                 --out traces/cpu-tiny-draft_model.azure-x0.2.jsonl.gz

Arrivals and sizes come from the Azure LLM inference trace 2023 (conversation; Microsoft,
CC-BY 4.0; Patel et al., "Splitwise", ISCA 2024), the window ``[start_s, start_s +
duration_s * time_scale)`` of its original timeline, played ``time_scale`` times as fast
(so ``--duration-s`` is the length of the replay).  The tiny model pair
(``build-tiny-models``, built if missing) cannot serve Azure-sized requests at Azure's rate
on a 2-core CPU, so prompt and output lengths are scaled (``--prompt-scale``,
``--output-scale``) and clipped to the model's context; the scaled sizes are what the
trace's request records say.  Prompts are corpus windows of exactly those lengths.

``--concurrency C1 C2 ...`` records a closed-loop sweep instead (what ``bench/bench_engine.py``
runs): for ``--duration-s`` at each level, that many requests in flight, the next sent when
one finishes, then the batch drains before the next level; request sizes are the Azure
window's (scaled the same way) in order, and each request's arrival is its submission time.
A sweep covers every batch size up to the largest level densely, which the open-loop replay
of a light trace does not.  With ``--waves`` each level sends its requests in waves of that
many instead, the next wave once the whole wave has finished (the benchmark's ``w=N``
levels), so the batch drains from the level towards 1 in every wave.

The engine runs with the plugin recording (``SPEC_TRACE_OUT``) and a controller choosing k
(default ``static:<max_k>``) with exploration (``--explore``, a uniformly random k with that
probability each step), so the recorded trace shows the cost and acceptance of every k at
every load -- what ``train-controller`` needs.  vLLM verifies a step's drafts one step
later, so a step's time covers the verification at the previous step's k and the drafting
at this step's; ``--explore-hold`` (default 8) keeps each random k for that many steps so
most recorded steps draft and verify at one k.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["azure_requests", "main", "record"]

# the Azure sizes scaled for the tiny models (record-trace's defaults; bench_engine's wave levels use them too)
PROMPT_SCALE, OUTPUT_SCALE, MAX_PROMPT_TOKENS, MAX_OUTPUT_TOKENS = 0.125, 0.5, 384, 128


def azure_requests(ids, *, room: int, start_s: float = 0.0, window_s: float = 7200.0, time_scale: float = 1.0,
                   prompt_scale: float = PROMPT_SCALE, output_scale: float = OUTPUT_SCALE,
                   max_prompt_tokens: int = MAX_PROMPT_TOKENS, max_output_tokens: int = MAX_OUTPUT_TOKENS,
                   seed: int = 0, azure_csv: str | None = None) -> list:
    """The Azure conversation trace's requests in ``[start_s, start_s + window_s)`` of its original
    timeline (arrivals played ``time_scale`` times as fast), sizes scaled and clipped, a prompt + output
    within ``room`` tokens; prompts are windows of the corpus token ids ``ids`` of exactly those
    lengths (seeded).  Empty if the window holds no request."""
    import numpy as np

    from envs.azure import DEFAULT_AZURE_CSV, read_azure_csv
    from serving_patch.load import LoadRequest, synth_prompts

    load = read_azure_csv(azure_csv or DEFAULT_AZURE_CSV, time_scale=time_scale, start_s=start_s, duration_s=window_s)
    outs = np.clip(np.round(load.output_tokens * output_scale), 1, max_output_tokens).astype(int)
    prompts_len = np.clip(np.round(load.prompt_tokens * prompt_scale), 1, max_prompt_tokens).astype(int)
    prompts_len = np.minimum(prompts_len, room - outs)
    prompts = synth_prompts(ids, prompts_len, seed=seed)
    return [LoadRequest(f"r{i}", float(a), p, int(o)) for i, (a, p, o) in
            enumerate(zip(load.arrival_s, prompts, outs))]


def record(out: str | Path, *, method: str, max_k: int = 4, time_scale: float = 0.2, start_s: float = 0.0,
           duration_s: float = 60.0, prompt_scale: float = PROMPT_SCALE, output_scale: float = OUTPUT_SCALE,
           max_prompt_tokens: int = MAX_PROMPT_TOKENS, max_output_tokens: int = MAX_OUTPUT_TOKENS,
           controller: str | None = None,
           explore: float = 0.3, explore_hold: int = 8, max_num_seqs: int = 32, seed: int = 0,
           models_dir: str | None = None, azure_csv: str | None = None, progress: bool = True,
           concurrency: list[int] | None = None, waves: bool = False, log=print) -> dict:
    """Record one trace; returns a summary (requests, steps, wall time, the controller's stats)."""
    from envs.azure import AZURE_ATTRIBUTION
    from envs.trace import load_trace
    from serving_patch.engine import EngineSpec, close_llm, engine_defaults, make_llm
    from serving_patch.load import corpus_token_ids, run_load
    from serving_patch.models import build_tiny_models

    engine_defaults()
    if waves and not concurrency:
        raise ValueError("--waves needs --concurrency (the wave sizes)")
    if time_scale <= 0 or duration_s <= 0:
        raise ValueError(f"--time-scale and --duration-s must be > 0, got {time_scale} and {duration_s}")
    if not 0 < prompt_scale <= 1 or not 0 < output_scale <= 1:
        raise ValueError(f"--prompt-scale and --output-scale must be in (0, 1], got {prompt_scale}, {output_scale}")
    pair = build_tiny_models(models_dir, log_fn=log)
    spec = EngineSpec(method=method, max_k=max_k, max_num_seqs=max_num_seqs)
    if concurrency is not None and (not concurrency or min(concurrency) < 1 or max(concurrency) > max_num_seqs):
        raise ValueError(f"--concurrency levels must be in [1, --max-num-seqs={max_num_seqs}], got {concurrency}")
    # a sweep needs sizes for many requests: a long window of the original timeline, sizes only
    window = 7200.0 if concurrency else duration_s * time_scale
    ids = corpus_token_ids(str(pair.target / "tokenizer.json"))
    reqs = azure_requests(ids, room=spec.max_model_len - 1, start_s=start_s, window_s=window,
                          time_scale=1.0 if concurrency else time_scale, prompt_scale=prompt_scale,
                          output_scale=output_scale, max_prompt_tokens=max_prompt_tokens,
                          max_output_tokens=max_output_tokens, seed=seed, azure_csv=azure_csv)
    if not reqs:
        raise ValueError(f"the Azure window start_s={start_s}, duration {window:g} s (original timeline) holds no "
                         f"request: choose an earlier --start-s")
    controller = controller or f"static:{max_k}"
    sizes = (f"prompt x{prompt_scale:g} (<= {max_prompt_tokens}), output x{output_scale:g} (<= {max_output_tokens}); "
             f"{AZURE_ATTRIBUTION}")
    if concurrency:
        levels = ",".join(map(str, concurrency))
        kind = "waves of" if waves else "closed-loop sweep, concurrency"
        notes = (f"record-trace: {kind} {levels} for {duration_s:g} s each; request sizes from the Azure conv "
                 f"window from {start_s:g} s, {sizes}")
        what = f"{'waves of' if waves else 'closed loop at concurrency'} {levels}, {duration_s:g} s each"
    else:
        notes = f"record-trace: Azure conv window {start_s:g}+{duration_s * time_scale:g} s at x{time_scale:g}, {sizes}"
        what = f"{len(reqs)} requests, x{time_scale:g}, {duration_s:g} s"
    log(f"recording {method} (max_k={max_k}, {what}, controller {controller}, explore {explore:g} held "
        f"{explore_hold}) -> {out}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    llm = make_llm(pair.target, pair.draft, spec, controller=controller, trace_out=str(out), explore=explore,
                   explore_hold=explore_hold, seed=seed, notes=notes)
    from serving_patch.engine_hook import controllers

    ctl = controllers()[-1]
    t0 = time.perf_counter()

    def bar(desc: str, total: int | None = None):
        if not progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, unit="req", desc=desc, file=sys.stderr)

    if concurrency:
        results, used = [], 0
        for c in concurrency:
            b = bar(f"{method} c={c}")
            level = (reqs[used:] + reqs[:used])[:4096]
            results.append(run_load(llm, level, concurrency=c, submit_s=duration_s, max_wall_s=duration_s * 4 + 120,
                                    progress=None if b is None else b.update, waves=waves,
                                    keep_tokens=True))
            used = (used + results[-1].finished) % len(reqs)
            if b is not None:
                b.close()
        res = results[0]
        for r in results[1:]:
            res.wall_s += r.wall_s
            res.output_tokens += r.output_tokens
            res.latencies_s += r.latencies_s
            res.finished += r.finished
            res.tokens.update(r.tokens)
    else:
        b = bar(f"{method} x{time_scale:g}", len(reqs))
        res = run_load(llm, reqs, progress=None if b is None else b.update, max_wall_s=duration_s * 4 + 120,
                       keep_tokens=True)
        if b is not None:
            b.close()
    stats = ctl.stats()
    ctl.close()
    close_llm(llm)
    del llm
    annotated = add_agreement(out, method=method, max_k=max_k, requests=reqs, tokens=res.tokens,
                              draft_dir=pair.draft, max_model_len=spec.max_model_len, log=log,
                              header={"client": "closed" if concurrency else "open"})
    trace = load_trace(out)
    summary = {"out": str(out), "wall_s": round(time.perf_counter() - t0, 1),
               "requests": res.finished if concurrency else len(reqs),
               "finished": res.finished, "tokens_per_s": round(res.tokens_per_s, 1),
               "mean_latency_s": round(res.mean_latency_s, 3), "trace": trace.summary(),
               "controller": {k: stats[k] for k in ("steps", "explored", "fallbacks", "errors", "hook_us_per_step",
                                                    "mean_step_ms")},
               "recorder_us_per_step": stats.get("recorder", {}).get("us_per_step"),
               "agree_requests": annotated}
    return summary


def add_agreement(out, *, method: str, max_k: int, requests: list, tokens: dict, draft_dir, max_model_len: int,
                  log=print, header: dict | None = None) -> int:
    """Add each finished request's ``agree`` array (:mod:`serving_patch.agree`) and ``header``'s
    fields to the trace ``out``; returns how many request records got ``agree``."""
    from serving_patch.agree import annotate_trace, draft_model_agree, ngram_agree

    t0 = time.perf_counter()
    prompts = {r.id: r.prompt_token_ids for r in requests}
    done = [(rid, prompts[rid], toks) for rid, toks in tokens.items() if rid in prompts and toks]
    if method == "ngram":
        arrays = [ngram_agree(p, o, max_k, max_model_len=max_model_len) for _, p, o in done]
    else:
        arrays = draft_model_agree(draft_dir, [(p, o) for _, p, o in done], max_k)
    n = annotate_trace(out, {rid: a for (rid, _, _), a in zip(done, arrays)}, header=header)
    log(f"draft agreement of {n} requests added to {out} ({time.perf_counter() - t0:.1f} s)")
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="record-trace", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="trace file to write (.jsonl or .jsonl.gz)")
    ap.add_argument("--method", required=True, choices=("draft_model", "ngram"))
    ap.add_argument("--max-k", type=int, default=4, help="num_speculative_tokens of the engine (default 4)")
    ap.add_argument("--time-scale", type=float, default=0.2, help="arrival-rate multiplier of the Azure trace")
    ap.add_argument("--start-s", type=float, default=0.0, help="window start on the original Azure timeline")
    ap.add_argument("--duration-s", type=float, default=60.0, help="length of the replay in seconds")
    ap.add_argument("--prompt-scale", type=float, default=PROMPT_SCALE)
    ap.add_argument("--output-scale", type=float, default=OUTPUT_SCALE)
    ap.add_argument("--max-prompt-tokens", type=int, default=MAX_PROMPT_TOKENS)
    ap.add_argument("--max-output-tokens", type=int, default=MAX_OUTPUT_TOKENS)
    ap.add_argument("--controller", default=None,
                    help="SPEC_CONTROLLER for the recording engine (default static:<max-k>); see serving_patch.config")
    ap.add_argument("--explore", type=float, default=0.3, help="fraction of steps on a uniformly random k")
    ap.add_argument("--explore-hold", type=int, default=8,
                    help="steps each random k is held (so a step drafts and verifies at one k; default 8)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None,
                    help="record a closed-loop sweep at these concurrency levels (--duration-s each) instead of "
                         "replaying the arrivals")
    ap.add_argument("--waves", action="store_true",
                    help="with --concurrency: send each level's requests in waves of that many, the next wave once "
                         "the whole wave has finished, so the batch drains from the level towards 1 in every wave")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models-dir", default=None, help="tiny model cache (default $SPEC_MODELS_DIR)")
    ap.add_argument("--azure-csv", default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        summary = record(args.out, method=args.method, max_k=args.max_k, time_scale=args.time_scale,
                         start_s=args.start_s, duration_s=args.duration_s, prompt_scale=args.prompt_scale,
                         output_scale=args.output_scale, max_prompt_tokens=args.max_prompt_tokens,
                         max_output_tokens=args.max_output_tokens, controller=args.controller, explore=args.explore,
                         explore_hold=args.explore_hold, concurrency=args.concurrency, waves=args.waves,
                         max_num_seqs=args.max_num_seqs, seed=args.seed, models_dir=args.models_dir,
                         azure_csv=args.azure_csv, progress=not args.no_progress,
                         log=lambda m: print(m, file=sys.stderr, flush=True))
    except (ValueError, FileNotFoundError) as exc:
        print(f"record-trace: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
