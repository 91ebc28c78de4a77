"""The one feature function: recent step history + the coming step -> observation vector.

ARCHITECTURE.md contract 2.  The gymnasium env (training) and the live controller
(serving) both call :func:`observe` on a :class:`FeatureState` they feed with
:meth:`FeatureState.update` after every finished step, so training and serving cannot
drift apart.  Plain Python floats and one preallocated numpy array: ~2 us a call.

Every feature lies in ``[0, 1]``:

==================  ===========================================================
``batch``           decoding requests / ``max_num_seqs``
``log_batch``       ``log1p(batch) / log1p(max_num_seqs)`` (resolution at small batch)
``waiting``         ``log1p(waiting) / log1p(8 * max_num_seqs)``, clipped
``kv_usage``        fraction of KV cache in use
``prefill``         pending prompt tokens / (4 * token budget), clipped
``alpha``           EMA of per-position acceptance, ``sum(accepted_per_pos) / sum(trials)``
                    (trials: drafts at position 0, accepted at i-1 after) -- the
                    drafter's current agreement with the target, independent of k
``accept0``         EMA of ``accepted_per_pos[0] / drafts`` (both EMAs hold their last value
                    while speculation is off)
==================  ===========================================================

With ``FeatureSpec.accept_trials = n`` (what training sets, ``envs.SpecDecodeEnv``) the two
acceptance EMAs weigh a step by its trials, ``1 - (1 - 1/n)^trials``, so they average over about
the last n drafted tokens at any batch size.  Per step (``ema``, ``accept_trials = 0``) they
averaged ten steps: ~25 trials at batch 1, where the EMA then swung over 0.2-0.7 around a mean of
0.5, and a policy whose batch-1 k follows alpha (1 below 0.2, 2-3 at 0.3, 3 at 0.4, 4 from 0.5)
ran k = 1..4 in turn where k = 3 alone was fastest (``bench/bench_engine.py``, concurrency 1).

The state also keeps an EMA of committed tokens per ms (the env's ``rate`` reward reads it), but
it is not observed, and neither are the step time, the last step's k and width, or how long ago
the last speculative step was: all of them move with the k the policy itself chooses, and in the
simulator none of them changes what an action gives, so whatever a network reads from them is
learned from the behaviour policy's habits.  Two such habits reached the engine
(``bench/bench_engine.py``):

- with the staleness observed, at the start of a heavy closed loop (no speculative step yet) the
  policy chose k = 0 from batch 11 up and, never speculating again, stayed off: 0.86 of the best
  fixed k at concurrency 32 (ngram);
- with the last k observed, at batch 16 it rated k = 1 above off after an off step and below it
  after a k = 1 step, so it alternated: speculative on most steps where its batch-size table (read
  at one last k) said off, 0.93 of off at concurrency 16 (draft_model).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

FEATURE_NAMES = ("batch", "log_batch", "waiting", "kv_usage", "prefill", "alpha", "accept0")
N_FEATURES = len(FEATURE_NAMES)
BATCH_FEATURES = (0, 1)  # the entries a batch-size table sweeps


@dataclass(frozen=True)
class FeatureSpec:
    """Normalisation constants; recorded in the policy artifact so serving normalises alike."""

    max_num_seqs: int = 256
    max_k: int = 4
    max_width: int = 1
    token_budget: int = 4096
    ema: float = 0.1            # weight of the newest step in the EMAs
    accept_prior: float = 0.6   # acceptance assumed before any speculative step was seen
    accept_trials: int = 0      # > 0: the acceptance EMAs average over about this many drafted
                                # tokens (trials), not ``1 / ema`` steps (0: per step, as before)

    def to_dict(self) -> dict:
        return asdict(self)


class FeatureState:
    """Exponential averages of the finished steps; one per engine (the sidecar keys them by engine id)."""

    __slots__ = ("spec", "alpha", "accept0", "tok_per_ms", "_log_seqs", "_log_wait", "_buf")

    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        self._log_seqs = math.log1p(spec.max_num_seqs)
        self._log_wait = math.log1p(8 * spec.max_num_seqs)
        self._buf = np.zeros(N_FEATURES, dtype=np.float32)
        self.reset()

    def reset(self) -> None:
        self.alpha = self.spec.accept_prior
        self.accept0 = self.spec.accept_prior
        self.tok_per_ms = 0.0

    def update(self, batch_size: int, k: int, width: int, drafts: int, accepted_per_pos, step_ms: float,
               committed_tokens: int | None = None) -> None:
        """Fold in one finished step (its ``spec-trace/1`` fields).  ``committed_tokens``
        defaults to ``batch_size + accepted`` as the trace format defines it."""
        a = self.spec.ema
        accepted = sum(accepted_per_pos) if k else 0
        if k and drafts:
            trials = drafts + accepted - (accepted_per_pos[-1] if accepted_per_pos else 0)
            n = self.spec.accept_trials
            if trials > 0:
                w = 1.0 - (1.0 - 1.0 / n) ** trials if n else a
                self.alpha += w * (accepted / trials - self.alpha)
            w = 1.0 - (1.0 - 1.0 / n) ** drafts if n else a
            self.accept0 += w * (accepted_per_pos[0] / drafts - self.accept0)
        if step_ms > 0:
            c = batch_size + accepted if committed_tokens is None else committed_tokens
            self.tok_per_ms += a * (c / step_ms - self.tok_per_ms)


def observe(state: FeatureState, batch_size: int, waiting: int, kv_usage: float, prefill_pending: int,
            out: np.ndarray | None = None) -> np.ndarray:
    """The observation for the coming step (see the module docstring for each entry).

    Writes into ``out`` when given (the env's buffer), else returns a fresh array.
    """
    s = state.spec
    o = np.empty(N_FEATURES, dtype=np.float32) if out is None else out
    o[0] = min(1.0, batch_size / s.max_num_seqs)
    o[1] = min(1.0, math.log1p(batch_size) / state._log_seqs)
    o[2] = min(1.0, math.log1p(waiting) / state._log_wait)
    o[3] = min(1.0, max(0.0, kv_usage))
    o[4] = min(1.0, prefill_pending / (4.0 * s.token_budget))
    o[5] = state.alpha
    o[6] = state.accept0
    return o


def batch_sweep(obs: np.ndarray, batch_sizes, spec: FeatureSpec) -> np.ndarray:
    """Copies of ``obs`` with the batch entries set to each of ``batch_sizes``: the rows a
    policy is evaluated on to build the per-batch-size decision table (contract 4)."""
    b = np.asarray(batch_sizes, dtype=np.float64)
    rows = np.repeat(np.asarray(obs, dtype=np.float32)[None, :], len(b), axis=0)
    rows[:, 0] = np.minimum(1.0, b / spec.max_num_seqs)
    rows[:, 1] = np.minimum(1.0, np.log1p(b) / math.log1p(spec.max_num_seqs))
    return rows
