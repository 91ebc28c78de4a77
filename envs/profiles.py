"""Cost and acceptance profiles: what a step costs and how many drafts are accepted.

Two kinds of cost profile share one interface (:class:`CostModel`):

* :class:`FittedCost` is fitted from the ``step`` records of traces.  Its model is a
  non-negative linear model on physically meaningful terms (fixed step overhead, target
  tokens verified ``B * (1 + k * width)``, a hinge past the memory/compute knee, drafter
  passes ``k`` and drafter tokens ``k * B * width``, prefill tokens, KV context), fitted by
  NNLS on relative error, then multiplied by a per-cell correction for each
  ``(k, width, batch-size bucket)`` shrunk toward 1 when a cell has few steps.  The
  parametric part carries the fit to ``(k, batch)`` pairs the trace recorded rarely;
  the cell correction keeps well-observed cells exact.  Predictions outside the fitted
  range warn once with the range (never extrapolate silently).

* :class:`RooflineCost` is built from hardware and model numbers (peak FLOP/s, memory
  bandwidth, target and draft parameter counts, KV bytes per token), so a user can train
  for a GPU they have no trace from.  Each forward pass costs
  ``max(compute, memory)``: memory-bound at small batch (speculation is almost free),
  compute-bound at large batch (every draft token verified costs target FLOPs), the
  crossover Nightjar (arXiv 2512.22420) and ECHO (arXiv 2604.09603) describe.

Acceptance (:class:`AcceptanceProfile`) is a chain of conditional per-position rates:
``p[i] = P(position i accepted | positions < i accepted)`` for one draft candidate.  With a
tree of ``width`` candidates per depth the rate per depth is
``1 - (1 - p[i]) ** (width ** width_rho)`` (independent candidates when ``width_rho = 1``;
below 1 models the correlation of a drafter's top-w candidates).  Drift over time is a
logit offset ``delta[b]`` for time bin ``b`` shared by all positions:
``p_b[i] = sigmoid(logit(p[i]) + delta[b])`` -- a code-heavy phase has positive delta, a
chat-heavy phase negative.  Fitting estimates ``p`` from ``accepted_per_pos`` counts
pooled over the trace and each bin's delta by maximum likelihood with a shrinkage prior,
so bins with little speculation stay near the average.  Not every sequence gets a draft:
``propose`` is the fraction of decoding sequences with one when k > 0 (1 for a draft model,
~0.5-0.7 for vLLM's ``ngram`` proposer on the tiny models, which drafts only where the
context repeats an n-gram), one value per k: ``propose[k - 1]`` is fitted as ``drafts /
batch_size`` over the steps at that k (shrunk toward the value pooled over all k).  It falls
with k for ``ngram``: a longer k finishes a sequence's repetitive stretch in fewer steps, so
a larger share of the steps is spent where nothing matches.  The rates ``p`` are per drafted
sequence.  The cost profile is fitted on the same steps, so its ``(batch, k)`` cost already
averages over the drafted share.

Where the traces carry each request's draft agreement (``agree``, :mod:`serving_patch.agree`) the
simulator walks it instead of drawing from ``p``, and ``walk_gain[k - 1]`` (:func:`agree_walk_gain`:
accepted tokens per sequence-step of a static-k walk through every request) replaces
``propose x expected_accepted`` as the expected gain of a chain of k.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import nnls

from envs.trace import Trace

__all__ = [
    "AcceptanceProfile",
    "CostModel",
    "FittedCost",
    "RooflineCost",
    "PROFILES",
    "agree_walk_gain",
    "held_walks",
    "fit_acceptance",
    "fit_cost",
    "profile_from_dict",
]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p):
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


# =========================================================================== cost


class CostModel:
    """Predicts ``step_ms`` for a step shape; subclasses implement :meth:`predict_many`.

    ``noise_sigma`` is the log-normal spread of real step times around the prediction,
    used by the simulator to reproduce the step-time distribution, not only its mean.
    """

    noise_sigma: float = 0.0

    def predict_many(self, batch, k, width, prefill_tokens, kv_usage) -> np.ndarray:
        raise NotImplementedError

    def predict(self, batch: int, k: int, width: int = 1, prefill_tokens: int = 0, kv_usage: float = 0.0) -> float:
        return float(self.predict_many(np.array([batch]), np.array([k]), np.array([width]),
                                       np.array([prefill_tokens]), np.array([kv_usage]))[0])

    def to_dict(self) -> dict:
        raise NotImplementedError

    def predict_one(self, batch: int, k: int, width: int, prefill: int, kv_usage: float) -> float:
        """Scalar prediction; subclasses override it with a numpy-free form for the simulator."""
        return self.predict(batch, k, width, prefill, kv_usage)


@dataclass
class RooflineCost(CostModel):
    """Step time from hardware and model numbers (see module docstring).

    Defaults describe one H100 SXM serving Llama-3-8B in bf16 with an EAGLE-style
    one-layer drafter; every number is a public spec-sheet or model-card figure.
    """

    name: str = "h100-llama3-8b"
    peak_tflops: float = 989.0          # dense bf16, H100 SXM
    mem_bw_gbs: float = 3350.0          # HBM3
    flops_efficiency: float = 0.35      # achieved fraction of peak (decode-sized GEMMs, attention)
    bw_efficiency: float = 0.80         # achieved fraction of peak bandwidth
    target_params_b: float = 8.0        # billions
    draft_params_b: float = 0.25        # billions (one decoder layer + head)
    bytes_per_param: float = 2.0
    kv_bytes_per_token: float = 131072.0   # 32 layers * 8 kv heads * 128 dim * 2 (K,V) * 2 bytes
    kv_capacity_tokens: int = 300_000
    step_overhead_ms: float = 1.2       # scheduler, sampling, launch
    draft_pass_overhead_ms: float = 0.6  # per drafter step: launch, sampling, bookkeeping
    draft_pass_when_off: bool = False   # draft_model keeps its KV in sync with one pass at k=0
    noise_sigma: float = 0.03

    def _pass_ms(self, params_b, tokens, ctx_tokens):
        flops = 2.0 * params_b * 1e9 * tokens
        compute_ms = flops / (self.peak_tflops * 1e12 * self.flops_efficiency) * 1e3
        bytes_ = params_b * 1e9 * self.bytes_per_param + ctx_tokens * self.kv_bytes_per_token
        memory_ms = bytes_ / (self.mem_bw_gbs * 1e9 * self.bw_efficiency) * 1e3
        return np.maximum(compute_ms, memory_ms)

    def predict_many(self, batch, k, width, prefill_tokens, kv_usage) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float64)
        k = np.asarray(k, dtype=np.float64)
        width = np.asarray(width, dtype=np.float64)
        ctx = np.asarray(kv_usage, dtype=np.float64) * self.kv_capacity_tokens
        tokens = batch * (1.0 + k * width) + np.asarray(prefill_tokens, dtype=np.float64)
        verify = self._pass_ms(self.target_params_b, tokens, ctx)
        draft_ctx = ctx * self.draft_params_b / self.target_params_b
        one_draft = self._pass_ms(self.draft_params_b, batch * width, draft_ctx) + self.draft_pass_overhead_ms
        passes = np.where(k > 0, k, 1.0 if self.draft_pass_when_off else 0.0)
        return self.step_overhead_ms + verify + passes * np.where(batch > 0, one_draft, 0.0)


    def predict_one(self, batch: int, k: int, width: int, prefill: int, kv_usage: float) -> float:
        """Plain-Python scalar form of :meth:`predict_many` for the simulator's hot path."""
        ctx = kv_usage * self.kv_capacity_tokens
        flops_rate = self.peak_tflops * 1e9 * self.flops_efficiency      # FLOP per ms
        bw_rate = self.mem_bw_gbs * 1e6 * self.bw_efficiency              # bytes per ms
        tokens = batch * (1 + k * width) + prefill
        ms = max(2.0 * self.target_params_b * 1e9 * tokens / flops_rate,
                 (self.target_params_b * 1e9 * self.bytes_per_param + ctx * self.kv_bytes_per_token) / bw_rate)
        passes = k if k > 0 else (1 if self.draft_pass_when_off else 0)
        if passes and batch > 0:
            dctx = ctx * self.draft_params_b / self.target_params_b
            one = max(2.0 * self.draft_params_b * 1e9 * batch * width / flops_rate,
                      (self.draft_params_b * 1e9 * self.bytes_per_param + dctx * self.kv_bytes_per_token) / bw_rate)
            ms += passes * (one + self.draft_pass_overhead_ms)
        return self.step_overhead_ms + ms

    def to_dict(self) -> dict:
        return {"kind": "roofline", **asdict(self)}


# A prediction this far past the largest fitted value warns (once per quantity).
EXTRAPOLATION_TOLERANCE = 1.1

# Terms of the fitted model; see FittedCost.
_COST_TERMS = ("const", "tokens", "hinge", "draft_on", "draft_passes", "draft_tokens", "prefill",
               "kv", "kv_x_tokens")


def _design(batch, k, width, prefill, kv, knee):
    batch = np.asarray(batch, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    width = np.asarray(width, dtype=np.float64)
    tokens = batch * (1.0 + k * width)
    cols = [
        np.ones_like(batch),
        tokens,
        np.maximum(tokens + prefill - knee, 0.0),
        (k > 0).astype(np.float64),
        k,
        k * batch * width,
        np.asarray(prefill, dtype=np.float64),
        np.asarray(kv, dtype=np.float64),
        np.asarray(kv, dtype=np.float64) * tokens,
    ]
    return np.stack(cols, axis=1)


def _batch_bucket(batch) -> np.ndarray:
    """0, 1, 2-3, 4-7, 8-15, ... : log2 buckets, so cells have comparable data."""
    b = np.asarray(batch, dtype=np.int64)
    return np.where(b <= 0, 0, np.floor(np.log2(np.maximum(b, 1))).astype(np.int64) + 1)


@dataclass
class FittedCost(CostModel):
    """Step-time model fitted from traces (see module docstring for the terms)."""

    coef: list[float]
    knee: float
    cells: dict[str, float] = field(default_factory=dict)  # "k,width,bucket" -> multiplicative correction
    noise_sigma: float = 0.0
    ranges: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self._coef = np.asarray(self.coef, dtype=np.float64)
        self._warned: set[str] = set()
        self._cell_lut: dict[tuple[int, int, int], float] = {}
        for key, v in self.cells.items():
            kk, ww, bb = (int(x) for x in key.split(","))
            self._cell_lut[(kk, ww, bb)] = float(v)

    def _check_range(self, batch, k, width, prefill):
        r = self.ranges
        if not r:
            return
        checks = (
            ("batch_size", np.max(batch) if len(batch) else 0, r.get("batch_max")),
            ("k", np.max(k) if len(k) else 0, r.get("k_max")),
            ("prefill_tokens", np.max(prefill) if len(prefill) else 0, r.get("prefill_max")),
        )
        for name, value, hi in checks:
            if hi is not None and value > hi * EXTRAPOLATION_TOLERANCE and name not in self._warned:
                self._warned.add(name)
                warnings.warn(
                    f"cost profile asked for {name}={value}, more than 10% beyond the fitted range [0, {hi}]; the "
                    f"prediction extrapolates the linear model. Record traces that cover it for an exact fit.",
                    stacklevel=3)
        seen_w = r.get("widths")
        if seen_w is not None and "width" not in self._warned:
            unseen = set(np.unique(width).tolist()) - set(seen_w)
            if unseen:
                self._warned.add("width")
                warnings.warn(f"cost profile asked for width {sorted(unseen)} never seen in the fitted traces "
                              f"(seen {seen_w}); the prediction extrapolates.", stacklevel=3)

    def predict_many(self, batch, k, width, prefill_tokens, kv_usage) -> np.ndarray:
        batch = np.atleast_1d(np.asarray(batch))
        k = np.atleast_1d(np.asarray(k))
        width = np.atleast_1d(np.asarray(width))
        prefill_tokens = np.atleast_1d(np.asarray(prefill_tokens))
        self._check_range(batch, k, width, prefill_tokens)
        base = _design(batch, k, width, prefill_tokens, kv_usage, self.knee) @ self._coef
        if self._cell_lut:
            buckets = _batch_bucket(batch)
            corr = np.array([self._cell_lut.get((int(a), int(b) if a else 1, int(c)), 1.0)
                             for a, b, c in zip(k, width, buckets)])
            base = base * corr
        return np.maximum(base, 1e-3)

    def predict_one(self, batch: int, k: int, width: int, prefill: int, kv_usage: float) -> float:
        """Plain-Python scalar form of :meth:`predict_many` for the simulator's hot path."""
        c = self._coef
        tokens = batch * (1 + k * width)
        hinge = tokens + prefill - self.knee
        v = (c[0] + c[1] * tokens + (c[2] * hinge if hinge > 0 else 0.0) + (c[3] if k > 0 else 0.0) + c[4] * k
             + c[5] * k * batch * width + c[6] * prefill + c[7] * kv_usage + c[8] * kv_usage * tokens)
        if self._cell_lut:
            bucket = 0 if batch <= 0 else int(batch).bit_length()
            v *= self._cell_lut.get((k, width if k else 1, bucket), 1.0)
        r = self.ranges
        if r and (batch > r["batch_max"] * EXTRAPOLATION_TOLERANCE or k > r["k_max"]
                  or prefill > r["prefill_max"] * EXTRAPOLATION_TOLERANCE):
            self._check_range(np.array([batch]), np.array([k]), np.array([width]), np.array([prefill]))
        return v if v > 1e-3 else 1e-3

    def cost_table(self, max_batch: int, max_k: int, widths: list[int], kv_usage: float = 0.3) -> np.ndarray:
        """Dense ``[batch, k, width_index]`` table (prefill 0) for fast lookups in the simulator."""
        b, kk, wi = np.meshgrid(np.arange(max_batch + 1), np.arange(max_k + 1), np.arange(len(widths)),
                                indexing="ij")
        w = np.asarray(widths)[wi]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.predict_many(b.ravel(), kk.ravel(), w.ravel(), np.zeros(b.size), np.full(b.size, kv_usage))
        return out.reshape(b.shape)

    def to_dict(self) -> dict:
        return {"kind": "fitted", "coef": list(map(float, self.coef)), "terms": list(_COST_TERMS),
                "knee": self.knee, "cells": self.cells, "noise_sigma": self.noise_sigma, "ranges": self.ranges,
                "report": self.report}


def _mape(pred, y) -> float:
    return float(np.mean(np.abs(pred - y) / y)) if len(y) else math.nan


def fit_cost(traces: list[Trace], *, holdout: float = 0.2, seed: int = 0, shrink: float = 20.0,
             max_rows: int = 200_000) -> FittedCost:
    """Fit :class:`FittedCost` to the step records of ``traces``.

    A random ``holdout`` fraction of steps is kept out of the fit and the MAPE on it is
    reported in ``profile.report`` (with train MAPE and per-k held-out MAPE).  ``shrink`` is
    the number of steps at which a cell's correction counts half.
    """
    cols = {n: np.concatenate([t.steps[n] for t in traces]) for n in
            ("batch_size", "k", "width", "prefill_tokens", "kv_usage", "step_ms")}
    n = len(cols["step_ms"])
    if n < 20:
        raise ValueError(f"cannot fit a cost profile from {n} step records (need at least 20); "
                         f"record or synthesise a longer trace")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(n)
    n_hold = int(round(n * holdout)) if holdout > 0 else 0
    hold, train = idx[:n_hold], idx[n_hold:]
    if len(train) > max_rows:
        train = train[:max_rows]
    b, k, w, pf, kv, y = (cols[c] for c in ("batch_size", "k", "width", "prefill_tokens", "kv_usage", "step_ms"))
    tokens = b * (1.0 + k * w) + pf
    knees = np.unique(np.quantile(tokens[train], [0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.97]))
    knees = np.concatenate([knees, [tokens.max() + 1.0]])  # the last one = no hinge
    best = None
    for knee in knees:
        A = _design(b[train], k[train], w[train], pf[train], kv[train], knee) / y[train, None]
        coef, _ = nnls(A, np.ones(len(train)), maxiter=2000)
        err = _mape(_design(b[train], k[train], w[train], pf[train], kv[train], knee) @ coef, y[train])
        if best is None or err < best[0]:
            best = (err, knee, coef)
    _, knee, coef = best
    model = FittedCost(coef=list(coef), knee=float(knee))
    # per-cell multiplicative corrections, shrunk toward 1 (log space)
    base = model.predict_many(b[train], k[train], w[train], pf[train], kv[train])
    logr = np.log(y[train] / base)
    wkey = np.where(k[train] > 0, w[train], 1)
    keys = np.stack([k[train].astype(np.int64), wkey.astype(np.int64), _batch_bucket(b[train])], axis=1)
    uniq, inv, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    sums = np.bincount(inv.ravel(), weights=logr, minlength=len(uniq))
    cells = {f"{a},{c},{d}": float(np.exp(s / (cnt + shrink)))
             for (a, c, d), s, cnt in zip(uniq, sums, counts)}
    fitted = FittedCost(coef=list(coef), knee=float(knee), cells=cells)
    pred_train = fitted.predict_many(b[train], k[train], w[train], pf[train], kv[train])
    resid = np.log(y[train] / pred_train)
    fitted.noise_sigma = float(np.std(resid))
    fitted.ranges = {"batch_max": int(b.max()), "k_max": int(k.max()), "widths": sorted(set(w.tolist())),
                     "prefill_max": int(pf.max()), "kv_max": float(kv.max())}
    report = {"n_steps": int(n), "n_train": int(len(train)), "n_holdout": int(len(hold)),
              "mape_train": _mape(pred_train, y[train])}
    if len(hold):
        pred = fitted.predict_many(b[hold], k[hold], w[hold], pf[hold], kv[hold])
        report["mape_holdout"] = _mape(pred, y[hold])
        report["mape_holdout_by_k"] = {int(kk): _mape(pred[k[hold] == kk], y[hold][k[hold] == kk])
                                       for kk in np.unique(k[hold])}
    fitted.report = report
    return fitted


# =========================================================================== acceptance


@dataclass
class AcceptanceProfile:
    """Per-position conditional acceptance with width scaling and time drift (module docstring).

    ``p``: single-candidate conditional acceptance per position (length = max depth).
    ``delta``: logit offset per time bin of ``bin_s`` seconds; ``cyclic`` repeats the
    pattern past its end (synthetic phases), otherwise the last bin holds.
    """

    p: list[float]
    width_rho: float = 0.7
    bin_s: float = 30.0
    delta: list[float] = field(default_factory=lambda: [0.0])
    cyclic: bool = False
    propose: float | list[float] = 1.0
    walk_gain: list[float] | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        p = np.asarray(self.p, dtype=np.float64)
        if p.ndim != 1 or len(p) < 1 or np.any((p < 0) | (p > 1)):
            raise ValueError(f"acceptance p must be a non-empty list of probabilities, got {self.p!r}")
        prop = np.atleast_1d(np.asarray(self.propose, dtype=np.float64))
        if prop.ndim != 1 or len(prop) not in (1, len(p)) or np.any(~((prop > 0) & (prop <= 1))):
            raise ValueError(f"acceptance propose (the fraction of sequences that get a draft, one number or one per "
                             f"k = 1..{len(p)}) must hold values in (0, 1], got {self.propose!r}")
        self._propose = np.broadcast_to(prop, p.shape).copy()
        if self.walk_gain is not None:
            g = np.asarray(self.walk_gain, dtype=np.float64)
            if g.shape != p.shape or np.any((g < 0) | (g > np.arange(1, len(p) + 1))):
                raise ValueError(f"acceptance walk_gain needs one value in [0, k] per k = 1..{len(p)}, "
                                 f"got {self.walk_gain!r}")
            self.walk_gain = g.tolist()
        if self.bin_s <= 0:
            raise ValueError(f"bin_s must be > 0, got {self.bin_s}")
        if not self.delta:
            self.delta = [0.0]
        self._logit_p = _logit(p)
        self._delta = np.asarray(self.delta, dtype=np.float64)
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    @property
    def depth(self) -> int:
        return len(self.p)

    def bin_index(self, t_s: float) -> int:
        b = int(t_s // self.bin_s) if t_s > 0 else 0
        n = len(self._delta)
        return b % n if self.cyclic else min(b, n - 1)

    def rates(self, t_s: float = 0.0, width: int = 1, delta_shift: float = 0.0) -> np.ndarray:
        """Conditional acceptance per depth at time ``t_s`` for ``width`` candidates."""
        d = self._delta[self.bin_index(t_s)] + delta_shift
        q = _sigmoid(self._logit_p + d)
        if width > 1:
            q = 1.0 - (1.0 - q) ** (width ** self.width_rho)
        return q

    def length_cdf(self, t_s: float, width: int) -> np.ndarray:
        """CDF over acceptance length ``L`` in ``0..depth`` (cached per time bin and width)."""
        key = (self.bin_index(t_s), width)
        cdf = self._cache.get(key)
        if cdf is None:
            q = self.rates(t_s, width)
            surv = np.concatenate([[1.0], np.cumprod(q)])  # P(L >= j)
            pmf = surv - np.concatenate([surv[1:], [0.0]])
            cdf = np.cumsum(pmf)
            cdf[-1] = 1.0
            self._cache[key] = cdf
        return cdf

    def expected_accepted(self, k: int, width: int = 1, t_s: float = 0.0) -> float:
        """E[accepted tokens per drafted sequence] with ``k`` drafts: sum_i prod_{j<=i} q_j."""
        if k <= 0:
            return 0.0
        q = self.rates(t_s, width)[: min(k, self.depth)]
        return float(np.cumprod(q).sum())

    def propose_rate(self, k: int) -> float:
        """The fraction of decoding sequences that get a draft at speculative length ``k`` (0 at k = 0)."""
        if k <= 0:
            return 0.0
        return float(self._propose[min(k, self.depth) - 1])

    def expected_gain(self, k: int, width: int = 1, t_s: float = 0.0) -> float:
        """E[accepted tokens per decoding sequence]: :meth:`expected_accepted` times :meth:`propose_rate`,
        or, for chains when the profile has them, the static-k walks' ``walk_gain[k - 1]``."""
        if k > 0 and width == 1 and self.walk_gain is not None:
            return float(self.walk_gain[min(k, self.depth) - 1])
        return self.propose_rate(k) * self.expected_accepted(k, width, t_s)

    def thinned(self, eps: float, agree=None) -> AcceptanceProfile:
        """The profile of a weaker drafter that cannot predict a token with chance ``eps``
        (:func:`envs.simulator.thin_agree`): every position's conditional acceptance times
        ``1 - eps``; ``walk_gain`` from ``agree`` (the thinned arrays) when given."""
        if eps <= 0:
            return self
        gain = agree_walk_gain(agree, self.depth) if agree is not None and self.walk_gain is not None else None
        return AcceptanceProfile(p=(np.asarray(self.p) * (1.0 - eps)).tolist(), width_rho=self.width_rho,
                                 bin_s=self.bin_s, delta=list(self.delta), cyclic=self.cyclic,
                                 propose=self._propose.tolist(), walk_gain=gain, report=self.report)

    def mean_delta(self) -> float:
        return float(np.mean(self._delta))

    def to_dict(self) -> dict:
        return {"kind": "acceptance", "p": list(map(float, self.p)), "width_rho": self.width_rho,
                "bin_s": self.bin_s, "delta": list(map(float, self.delta)), "cyclic": self.cyclic,
                "propose": self._propose.tolist(), "walk_gain": self.walk_gain, "report": self.report}


def _position_counts(trace: Trace):
    """Trials and successes per (step, position): trials = drafts for pos 0, else accepted at pos-1."""
    app = trace.accepted_per_pos.astype(np.float64)
    k = trace.steps["k"].astype(np.int64)
    drafts = trace.steps["drafts"].astype(np.float64)
    trials = np.concatenate([drafts[:, None], app[:, :-1]], axis=1)
    valid = np.arange(app.shape[1])[None, :] < k[:, None]
    trials = np.where(valid, trials, 0.0)
    return trials, np.where(valid, app, 0.0)


def _newton_offset(trials, succ, base_logit, e, d0: float = 0.0, prior: float = 0.0) -> float:
    """MLE of a scalar logit offset ``d`` for binomial counts with rate
    ``1 - (1 - sigmoid(base_logit + d)) ** e``, with a Gaussian prior of precision ``prior / 4``."""
    d = d0
    for _ in range(25):
        q = _sigmoid(base_logit + d)
        r = np.clip(1.0 - (1.0 - q) ** e, 1e-9, 1 - 1e-9)
        dr = e * (1.0 - q) ** (e - 1.0) * q * (1.0 - q)  # dr/dd
        grad = np.sum(succ * dr / r - (trials - succ) * dr / (1 - r)) - d * prior * 0.25
        hess = -np.sum(trials * dr * dr / (r * (1 - r))) - prior * 0.25
        if hess >= 0:
            break
        step = grad / hess
        d -= float(np.clip(step, -2.0, 2.0))
        if abs(step) < 1e-7:
            break
    return d


def _fit_propose(traces: list[Trace], depth: int, prior: float) -> list[float]:
    """Per k = 1..depth, the share of decoding sequences that got a draft on the steps at that k,
    shrunk toward the share pooled over every k > 0 (``prior`` sequences make a k's own count half)."""
    k = np.concatenate([t.steps["k"] for t in traces]).astype(np.int64)
    batch = np.concatenate([t.steps["batch_size"] for t in traces]).astype(np.float64)
    drafts = np.concatenate([t.steps["drafts"] for t in traces]).astype(np.float64)
    on = k > 0
    if batch[on].sum() <= 0:
        return [1.0] * depth
    pooled = min(1.0, drafts[on].sum() / batch[on].sum())
    n = np.bincount(k[on], weights=batch[on], minlength=depth + 1)[1: depth + 1]
    d = np.bincount(k[on], weights=drafts[on], minlength=depth + 1)[1: depth + 1]
    return np.clip((d + prior * pooled) / (n + prior), 0.01, 1.0).tolist()


def fit_acceptance(traces: list[Trace], *, bin_s: float = 30.0, width_rho: float = 0.7,
                   prior_strength: float = 200.0, iterations: int = 4,
                   propose_prior: float = 200.0) -> AcceptanceProfile:
    """Fit an :class:`AcceptanceProfile` from ``accepted_per_pos`` (see the module docstring).

    Alternates two maximum-likelihood steps: each time bin's drift offset ``delta[b]`` given
    ``p`` (with a prior: ``prior_strength`` draft trials make a bin's estimate count half, so
    bins with little speculation shrink toward no drift), then each position's ``p[i]`` given
    the offsets.  ``delta`` is centred (weighted by drafts per bin), so ``p`` is the
    acceptance at the trace's average drift level.  With several traces the drift timeline is
    the one of the first trace (their
    time axes are unrelated); ``p`` pools all of them.
    """
    depth = max(t.max_k for t in traces)
    rows = []  # per trace: trials, successes, width exponent, bin index (or -1: no drift)
    for j, t in enumerate(traces):
        trials, succ = _position_counts(t)
        pad = depth - trials.shape[1]
        if pad:
            trials = np.pad(trials, ((0, 0), (0, pad)))
            succ = np.pad(succ, ((0, 0), (0, pad)))
        e = t.steps["width"].astype(np.float64) ** width_rho
        if j == 0 and t.n_steps:
            bins = (t.steps["t_s"] // bin_s).astype(np.int64)
        else:
            bins = np.full(t.n_steps, -1, dtype=np.int64)
        rows.append((trials, succ, e, bins))
    trials = np.concatenate([r[0] for r in rows])
    succ = np.concatenate([r[1] for r in rows])
    e = np.concatenate([r[2] for r in rows])
    bins = np.concatenate([r[3] for r in rows])
    tried = trials.sum(axis=0)
    if tried[0] <= 0:
        raise ValueError("cannot fit acceptance: no step in the traces has k > 0 with drafts. Record or "
                         "synthesise a trace with speculation on (an exploration rate > 0).")
    n_bins = int(bins.max()) + 1 if (bins >= 0).any() else 1
    lp = np.zeros(depth)
    delta = np.zeros(n_bins)
    bin_weight = np.bincount(bins[bins >= 0], weights=trials[bins >= 0, 0], minlength=n_bins)[:n_bins]
    last = int(np.max(np.nonzero(tried > 0)[0]))
    for _ in range(iterations):
        d_step = np.where(bins >= 0, delta[np.maximum(bins, 0)], 0.0)
        for i in range(last + 1):
            m = trials[:, i] > 0
            lp[i] = _newton_offset(trials[m, i], succ[m, i], d_step[m], e[m], d0=lp[i])
        lp[last + 1:] = lp[last]  # positions never tried continue the last observed one
        for b in range(n_bins):
            m = (bins == b) & (trials[:, 0] > 0)
            if m.any():
                delta[b] = _newton_offset(trials[m, : last + 1], succ[m, : last + 1], lp[None, : last + 1],
                                          e[m, None], d0=delta[b], prior=prior_strength)
        # the level is shared between p and delta: centre delta (weighted by each bin's drafts)
        if bin_weight.sum() > 0:
            centre = float(np.sum(delta * bin_weight) / bin_weight.sum())
            delta -= centre
            lp += centre
    p = np.clip(_sigmoid(lp), 1e-3, 1 - 1e-3)
    propose = _fit_propose(traces, depth, propose_prior)
    report = {"n_draft_trials": float(tried[0]), "p": p.tolist(), "bins": n_bins,
              "delta_std": float(np.std(delta)), "propose": propose}
    return AcceptanceProfile(p=p.tolist(), width_rho=width_rho, bin_s=bin_s, delta=delta.tolist(), propose=propose,
                             report=report)


# =========================================================================== serialisation and presets


def held_walks(agree_flat: np.ndarray, starts: np.ndarray | None, max_k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(accepted, steps)``, each ``[k - 1, i]``: the accepted tokens and sequence-steps of walking the
    request whose ``agree`` array holds flat position ``i`` at a static ``k`` from that position to
    its end (``agree_flat``: the requests' arrays end to end; ``starts``: each request's first
    position in it, -1 for a request without one) -- what *holding* k from here gives, which a
    per-step draw misjudges (it reaches into a repetitive stretch that holding a long k would
    have used up in a few steps).  Pointer doubling over all
    requests at once: ``log2(longest request)`` numpy passes per k."""
    n = len(agree_flat)
    acc_out = np.zeros((max_k, n), dtype=np.int32)
    steps_out = np.zeros((max_k, n), dtype=np.int32)
    if starts is None or n == 0:
        return acc_out, steps_out
    ok = np.sort(starts[starts >= 0])
    ends = np.append(ok[1:], n)
    end_of = np.repeat(ends, ends - ok)  # each position's request end (exclusive)
    a = agree_flat.astype(np.int64)
    idx = np.arange(n)
    for k in range(1, max_k + 1):
        g = np.where(a > 0, np.minimum(a, k), 0)
        nxt = idx + 1 + g
        jump = np.append(np.where(nxt >= end_of, n, nxt), n)  # n: the end (no steps, nothing accepted)
        steps = np.append(np.ones(n, dtype=np.int64), 0)
        acc = np.append(g, 0)
        while (jump[:n] < n).any():
            steps, acc, jump = steps + steps[jump], acc + acc[jump], jump[jump]
        acc_out[k - 1], steps_out[k - 1] = acc[:n], steps[:n]
    return acc_out, steps_out


def agree_walk_gain(arrays, depth: int) -> list[float]:
    """Per k = 1..depth, accepted tokens per sequence-step when every request's ``agree`` array
    (:mod:`serving_patch.agree`) is walked at that static k from its first decode step: the settled
    acceptance of holding k, request mix included (a long k leaves a repetitive stretch sooner)."""
    arrays = [np.asarray(a, dtype=np.int8) for a in arrays if a is not None and len(a) > 1]
    if not arrays:
        return [0.0] * depth
    starts = np.cumsum([0] + [len(a) for a in arrays[:-1]])
    acc, steps = held_walks(np.concatenate(arrays), starts, depth)
    first = starts + 1  # the first decode step: the prefill produced token 0
    return (acc[:, first].sum(axis=1) / steps[:, first].sum(axis=1)).tolist()


def profile_from_dict(d: dict):
    """Rebuild a cost or acceptance profile from its ``to_dict()`` form."""
    kind = d.get("kind")
    body = {k: v for k, v in d.items() if k not in ("kind", "terms")}
    if kind == "roofline":
        return RooflineCost(**body)
    if kind == "fitted":
        return FittedCost(**body)
    if kind == "acceptance":
        return AcceptanceProfile(**body)
    raise ValueError(f"unknown profile kind {kind!r}: expected 'roofline', 'fitted' or 'acceptance'")


@dataclass(frozen=True)
class ProfilePreset:
    """A documented hardware + model + drafter setting the synthesiser can turn into traces."""

    name: str
    description: str
    cost: RooflineCost
    acceptance: AcceptanceProfile
    max_k: int
    widths: tuple[int, ...]
    max_num_seqs: int
    max_num_batched_tokens: int
    method: str

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "description": self.description, "cost": self.cost.to_dict(),
                           "acceptance": self.acceptance.to_dict(), "max_k": self.max_k,
                           "widths": list(self.widths), "max_num_seqs": self.max_num_seqs,
                           "max_num_batched_tokens": self.max_num_batched_tokens, "method": self.method})


def _geometric(alpha: float, depth: int, decay: float = 0.96) -> list[float]:
    return [float(min(0.99, alpha * decay ** i)) for i in range(depth)]


PROFILES: dict[str, ProfilePreset] = {
    "h100-llama3-8b-eagle": ProfilePreset(
        name="h100-llama3-8b-eagle",
        description=(
            "1x H100 SXM, Llama-3-8B bf16 target, EAGLE-style one-layer drafter (0.25B), chain drafts. "
            "Memory-bound up to a few hundred tokens per step, so speculation wins at small batch and "
            "loses once B * (1 + k) passes the compute knee (best k at 30% KV: 4 up to batch ~32, 1-2 at "
            "64-128, off from ~192). Acceptance 0.70 at position 0 with a slight decay per position "
            "(EAGLE on chat, MT-Bench-like), no drift."),
        cost=RooflineCost(),
        acceptance=AcceptanceProfile(p=_geometric(0.70, 6), width_rho=0.7),
        max_k=6, widths=(1,), max_num_seqs=256, max_num_batched_tokens=4096, method="eagle"),
    "h100-llama3-8b-tree-drift": ProfilePreset(
        name="h100-llama3-8b-tree-drift",
        description=(
            "Same hardware and models with tree drafts of width 1, 2 or 4 and acceptance drift: the "
            "traffic alternates between a chat-heavy phase (acceptance offset -0.9 logits, ~0.49 at "
            "position 0) and a code-heavy phase (+0.9 logits, ~0.85) every 60 s. A policy that watches "
            "recent acceptance can drop to k=0 or narrow trees in chat phases and go deep in code phases; "
            "a fixed batch-size table cannot."),
        cost=RooflineCost(name="h100-llama3-8b-tree"),
        acceptance=AcceptanceProfile(p=_geometric(0.70, 4), width_rho=0.7, bin_s=60.0, delta=[-0.9, 0.9],
                                     cyclic=True),
        max_k=4, widths=(1, 2, 4), max_num_seqs=256, max_num_batched_tokens=4096, method="eagle"),
}

