"""Drive a real in-process vLLM engine with a request load: open loop (arrival times) or closed loop.

``record-trace`` replays the Azure conversation trace's arrivals (open loop: a request is
added when its arrival time comes, whatever the engine is doing) and
``bench/bench_engine.py`` holds a fixed number of requests in flight (closed loop,
``concurrency``).  Both go through :func:`run_load`, which owns the engine loop
(``LLMEngine.add_request`` / ``step``), so arrivals are real-time and the plugin's
recorder sees the same queueing a server would.

Prompts are synthesised to the recorded token lengths from the corpus the tiny models were
trained on (:func:`synth_prompts`), passed as token ids so their length is exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["LoadRequest", "LoadResult", "corpus_token_ids", "run_load", "synth_prompts"]


@dataclass(frozen=True)
class LoadRequest:
    id: str
    arrival_s: float
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass
class LoadResult:
    wall_s: float
    output_tokens: int
    latencies_s: list[float] = field(default_factory=list)
    finished: int = 0
    tokens: dict[str, list[int]] = field(default_factory=dict)  # output token ids by request id (keep_tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mean_latency_s(self) -> float:
        return float(np.mean(self.latencies_s)) if self.latencies_s else float("nan")


def corpus_token_ids(tokenizer_json: str) -> list[int]:
    """The stdlib corpus (:func:`serving_patch.models.read_corpus`) under the model's tokenizer."""
    from tokenizers import Tokenizer

    from serving_patch.models import read_corpus

    tok = Tokenizer.from_file(str(tokenizer_json))
    texts, _ = read_corpus()
    return [i for enc in tok.encode_batch(texts) for i in enc.ids]


def synth_prompts(ids: Sequence[int], lengths: Sequence[int], seed: int = 0) -> list[list[int]]:
    """One corpus window per requested length, at seeded offsets (deterministic)."""
    rng = np.random.default_rng(seed)
    n = len(ids)
    out = []
    for length in lengths:
        length = int(max(1, min(length, n - 1)))
        start = int(rng.integers(0, n - length))
        out.append(list(ids[start: start + length]))
    return out


def run_load(llm, requests: Sequence[LoadRequest], *, concurrency: int | None = None,
             progress: Callable[[int], None] | None = None, max_wall_s: float | None = None,
             submit_s: float | None = None, waves: bool = False, keep_tokens: bool = False) -> LoadResult:
    """Run ``requests`` through ``llm`` (greedy, ``ignore_eos``) and time them.

    Open loop (``concurrency=None``): request i is added at ``arrival_s`` after the start;
    latency = finish - arrival.  Closed loop: ``concurrency`` requests in flight, the next
    added when one finishes; latency = finish - submission.  ``progress(n)`` is called with
    the number of newly finished requests.  ``max_wall_s`` aborts what is left after that long;
    ``submit_s`` (closed loop) stops adding requests after that long and lets the ones in
    flight finish (the batch drains, so a sweep also sees the smaller batch sizes).
    ``waves`` (closed loop): ``concurrency`` requests are added together and the next
    ``concurrency`` only once all of them have finished, so the batch drains from
    ``concurrency`` towards 1 within every wave (a batch job sent in chunks).
    ``keep_tokens`` keeps each finished request's output token ids in ``tokens``.
    """
    from vllm import SamplingParams

    if waves and concurrency is None:
        raise ValueError("run_load: waves=True needs a concurrency (the wave size)")
    engine = llm.llm_engine
    reqs = sorted(requests, key=lambda r: r.arrival_s) if concurrency is None else list(requests)
    submitted: dict[str, float] = {}
    res = LoadResult(wall_s=0.0, output_tokens=0)
    nxt = 0
    t0 = time.perf_counter()
    while nxt < len(reqs) or submitted:
        now = time.perf_counter() - t0
        if max_wall_s is not None and now > max_wall_s:
            for rid in list(submitted):
                engine.abort_request([rid])
            break
        if submit_s is not None and now > submit_s and concurrency is not None:
            reqs, submit_s = reqs[:nxt], None  # no more submissions: drain
        wave_open = not waves or not submitted  # a wave is added whole, once the last one has finished
        while nxt < len(reqs) and (reqs[nxt].arrival_s <= now if concurrency is None
                                   else wave_open and len(submitted) < concurrency):
            r = reqs[nxt]
            sp = SamplingParams(temperature=0.0, max_tokens=int(r.max_tokens), ignore_eos=True)
            engine.add_request(r.id, {"prompt_token_ids": r.prompt_token_ids}, sp)
            submitted[r.id] = r.arrival_s if concurrency is None else now
            nxt += 1
        if not submitted:
            if nxt >= len(reqs):  # submissions just stopped (submit_s) with nothing in flight
                break
            time.sleep(max(0.0, min(0.05, reqs[nxt].arrival_s - now)))
            continue
        done = 0
        for out in engine.step():
            if out.finished and out.request_id in submitted:
                start = submitted.pop(out.request_id)
                res.latencies_s.append(time.perf_counter() - t0 - start)
                res.output_tokens += len(out.outputs[0].token_ids)
                if keep_tokens:
                    res.tokens[out.request_id] = list(out.outputs[0].token_ids)
                res.finished += 1
                done += 1
        if done and progress is not None:
            progress(done)
    res.wall_s = time.perf_counter() - t0
    return res
