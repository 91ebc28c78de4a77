"""Per-request draft agreement: what every speculative length would have accepted, position by position.

With greedy decoding a request's tokens do not depend on k (the equivalence tests), and neither
do the drafts: ``ngram`` matches the context, ``draft_model`` continues it greedily.  So the
draft proposed after ``t`` output tokens, and how far it agrees with the tokens the target then
produced, is a property of the request alone.  :func:`ngram_agree` and :func:`draft_model_agree`
compute it for every ``t`` (the request record's optional ``agree`` field, ``spec-trace/1``):

* ``agree[t]`` = how many leading tokens of the draft proposed after ``t`` output tokens match
  output tokens ``t, t + 1, ...`` (capped at ``max_k`` and at the tokens the request has);
* ``-1`` = no draft is proposed there (``ngram`` found no match; ``t = 0``, the prefill step).

A step that speculates ``k`` tokens for a sequence that has ``t`` tokens then accepts
``min(k, agree[t])`` (nothing at -1) and the sequence moves on by that plus one.  The simulator
walks these arrays (:class:`envs.simulator.Simulator`), which gives it what a per-step
acceptance draw misses: a long k runs through a request's repetitive stretches in a few steps
and spends its remaining steps where drafts fail, so acceptance per step depends on the k
history and on which requests are still running.  On this machine the walk reproduces the
engine's own step counts and accepted tokens exactly for ``ngram``
(``tests/serving_patch/test_agree.py``).

``record-trace`` adds the field after the run (off the engine's step path): the load driver
keeps each request's output tokens (:func:`serving_patch.load.run_load`), and
:func:`annotate_trace` rewrites the request records.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from serving_patch.engine import NGRAM_MAX_N, NGRAM_MIN_N, engine_defaults

__all__ = ["annotate_trace", "draft_model_agree", "ngram_agree", "run_lengths"]


def run_lengths(match: np.ndarray, max_k: int) -> np.ndarray:
    """``out[t]`` = number of consecutive True in ``match[t:]`` from ``t``, capped at ``max_k``."""
    match = np.asarray(match, dtype=bool)
    out = np.zeros(len(match), dtype=np.int64)
    run = 0
    for t in range(len(match) - 1, -1, -1):
        run = run + 1 if match[t] else 0
        out[t] = min(run, max_k)
    return out


def ngram_agree(prompt: Sequence[int], output: Sequence[int], max_k: int, *, min_n: int = NGRAM_MIN_N,
                max_n: int = NGRAM_MAX_N, max_model_len: int = 1 << 30) -> np.ndarray:
    """``agree`` of one request under vLLM's own ``ngram`` matcher (the function its proposer calls)."""
    engine_defaults()  # numba reads its thread count once: the same as the engines of this process will use
    from vllm.v1.spec_decode.ngram_proposer import _find_longest_matched_ngram_and_propose_tokens as propose

    tokens = np.asarray(list(prompt) + list(output), dtype=np.int32)
    p, n = len(prompt), len(output)
    out = np.full(n, -1, dtype=np.int64)
    for t in range(1, n):
        draft = propose(tokens[: p + t], min_n, max_n, max_model_len, max_k)
        if len(draft):
            want = tokens[p + t: p + t + len(draft)]
            m = len(want)
            miss = np.flatnonzero(draft[:m] != want)
            out[t] = int(miss[0]) if len(miss) else m
    return out


def draft_model_agree(draft_dir: str | os.PathLike, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                      max_k: int) -> list[np.ndarray]:
    """``agree`` of each ``(prompt, output)`` under a greedy draft model (Hugging Face checkpoint).

    The draft proposed after ``t`` output tokens agrees with the target for as long as the draft
    model's greedy next token, fed the target's tokens, equals the target's: one teacher-forced
    pass per request gives every position.  (vLLM's drafter runs in its own kernels; a near tie
    can resolve differently, which moves a count by a token here and there.)
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(draft_dir), torch_dtype=torch.float32)
    model.eval()
    out = []
    with torch.inference_mode():
        for prompt, output in requests:
            p, n = len(prompt), len(output)
            ids = torch.tensor([list(prompt) + list(output)], dtype=torch.long)
            pred = model(ids).logits[0].argmax(-1).numpy()  # pred[j]: the draft's token after ids[:j + 1]
            match = pred[p - 1: p + n - 1] == np.asarray(output)  # match[t]: the draft's guess for output t
            a = run_lengths(match, max_k)
            a[0] = -1  # output token 0 comes from the prefill step, which verifies no draft
            out.append(a)
    return out


_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def annotate_trace(path: str | os.PathLike, agree: Mapping[str, Sequence[int]],
                   header: Mapping[str, Any] | None = None) -> int:
    """Add ``agree`` to the request records of the trace at ``path`` whose id is a key of ``agree``
    (vLLM's per-request suffix ``-xxxxxxxx`` is ignored when matching), and ``header``'s fields to
    its header; the file is rewritten in place (gzip kept).  Returns how many records got ``agree``."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    if header:
        lines[0] = json.dumps({**json.loads(lines[0]), **header}, separators=(",", ":"))
    n = 0
    for i, line in enumerate(lines):
        if '"request"' not in line:
            continue
        rec = json.loads(line)
        if rec.get("type") != "request":
            continue
        rid = rec["id"]
        a = agree.get(rid)
        if a is None:
            a = agree.get(_SUFFIX.sub("", rid))
        if a is None or len(a) != rec["output_tokens"]:
            continue  # unknown, or aborted with fewer tokens than the driver saw
        rec["agree"] = [int(x) for x in a]
        lines[i] = json.dumps(rec, separators=(",", ":"))
        n += 1
    tmp = path.with_name(path.name + ".tmp")
    with opener(tmp, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return n
