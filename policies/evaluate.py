"""Run policies side by side on the same held-out windows, arrivals and seeds.

Each policy gets a fresh env per window with ``reset(seed=..., options={"load_scale",
"start_s"})``, so every policy replays the same requests with the same simulator seed
(common random numbers for acceptance and step-time noise, step by step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from envs.scenario import Scenario
from envs.spec_env import SpecDecodeEnv
from policies.baselines import Policy

__all__ = ["EvalResult", "PairedRatio", "evaluate", "held_out_windows", "paired_ratio", "summarise"]


@dataclass
class EvalResult:
    policy: str
    load_scale: float
    start_s: float
    goodput_tps: float
    mean_latency_s: float
    p99_latency_s: float
    accept_rate: float
    completed: int
    requests: int
    steps: int
    # action choices by batch size: counts[batch_bucket][action_index]
    action_counts: np.ndarray = field(repr=False, default=None)


def held_out_windows(scenario: Scenario, load_scales: Sequence[float], window_s: float, n_windows: int,
                     time_range: tuple[float, float]) -> list[tuple[float, float]]:
    """``n_windows`` evenly spaced ``(load_scale, start_s)`` windows per load inside ``time_range``.

    A window in which no request arrives (sparse traffic at a light load) cannot be evaluated: its
    start moves to the nearest arrival in the range (windows that land on the same start are kept
    once), so a light load is measured where its traffic is instead of stopping the run.
    """
    out = []
    span = scenario.requests.span_s
    for scale in load_scales:
        lo, hi = time_range[0] * span / scale, time_range[1] * span / scale
        latest = max(lo, hi - window_s)
        starts = np.linspace(lo, latest, n_windows) if n_windows > 1 else [lo]
        t = scenario.requests.arrival_s / scale
        t = t[(t >= lo) & (t <= hi)]
        if not len(t):
            raise ValueError(f"no request arrives in the held-out part of the trace ({time_range[0]:.0%}-"
                             f"{time_range[1]:.0%} of its timeline) at load x{scale:g}: raise the load scale "
                             f"(--load-scales) or give a longer trace")
        seen = set()
        for s in starts:
            if not np.any((t >= s) & (t < s + window_s)):
                s = float(t[np.argmin(np.abs(t - s))])  # the nearest arrival opens the window
            if s not in seen:
                seen.add(s)
                out.append((float(scale), float(s)))
    return out


def _bucket(b: int) -> int:
    return 0 if b <= 0 else int(b).bit_length()


def run_episode(policy: Policy, env: SpecDecodeEnv, load_scale: float, start_s: float, seed: int) -> EvalResult:
    obs, _ = env.reset(seed=seed, options={"load_scale": load_scale, "start_s": start_s})
    policy.reset(env)
    n_buckets = _bucket(env.scenario.config.max_num_seqs) + 1
    counts = np.zeros((n_buckets, env.action_space.n), dtype=np.int64)
    done = False
    info: dict = {}
    while not done:
        a = policy.act(obs, env)
        counts[_bucket(env._state.batch_size), a] += 1
        obs, _, term, trunc, info = env.step(a)
        policy.update(info)
        done = term or trunc
    st = env.sim.stats()
    return EvalResult(policy.name, load_scale, start_s, st.goodput_tps, st.mean_latency_s, st.p99_latency_s,
                      st.accept_rate, st.completed, st.total_requests, st.steps, counts)


def evaluate(policies: Sequence[Policy], scenario: Scenario, windows: Sequence[tuple[float, float]], *,
             window_s: float, seed: int = 0, progress: Callable[[str], None] | None = None) -> list[EvalResult]:
    """Every policy on every window; the window index seeds the simulator (same for all policies).
    Each policy observes with its own acceptance window (``Policy.accept_trials``: a learned
    policy's is its artifact's)."""
    results = []
    for pol in policies:
        env = SpecDecodeEnv(scenario, window_s=window_s, load_scales=sorted({w[0] for w in windows}),
                            noise=True, accept_trials=pol.accept_trials)
        for i, (scale, start) in enumerate(windows):
            results.append(run_episode(pol, env, scale, start, seed=seed * 100_003 + i))
        if progress:
            progress(pol.name)
    return results


def summarise(results: Sequence[EvalResult]) -> dict:
    """``{policy: {load_scale: {goodput_tps, mean_latency_s, p99_latency_s, accept_rate}}}`` averaged
    over windows (goodput: total committed tokens / total busy time across windows is approximated by
    the mean of per-window goodput; latency: request-weighted mean)."""
    out: dict = {}
    for r in results:
        out.setdefault(r.policy, {}).setdefault(r.load_scale, []).append(r)
    summary: dict = {}
    for pol, by_scale in out.items():
        summary[pol] = {}
        for scale, rs in sorted(by_scale.items()):
            req = np.array([r.completed for r in rs], dtype=float)
            summary[pol][scale] = {
                "goodput_tps": float(np.mean([r.goodput_tps for r in rs])),
                "mean_latency_s": float(np.sum([r.mean_latency_s * r.completed for r in rs]) / max(req.sum(), 1)),
                "p99_latency_s": float(np.mean([r.p99_latency_s for r in rs])),
                "accept_rate": float(np.nanmean([r.accept_rate for r in rs])) if any(
                    np.isfinite(r.accept_rate) for r in rs) else float("nan"),
                "windows": len(rs),
            }
    return summary


@dataclass(frozen=True)
class PairedRatio:
    """A/B over paired runs: the geometric mean of ``a_i / b_i`` and its confidence interval."""

    ratio: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def verdict(self) -> str:
        """``"above"`` / ``"below"`` when the interval excludes 1, else ``"tie"`` (within the noise)."""
        if self.low > 1.0:
            return "above"
        if self.high < 1.0:
            return "below"
        return "tie"

    def not_worse(self, margin: float) -> bool:
        """Whether the interval rules out ``a`` being more than ``margin`` below ``b`` (low >= 1 - margin)."""
        if not 0 < margin < 1:
            raise ValueError(f"margin must be in (0, 1), got {margin}")
        return self.low >= 1 - margin

    def margin_verdict(self, margin: float) -> str:
        """Non-inferiority at ``margin`` (e.g. 0.02): can the interval rule out ``a`` being more than
        ``margin`` below ``b``?  What an A/A comparison (the same configuration twice) can show, where
        "above" never can: ``"not worse than -2%"`` when ``low >= 1 - margin`` (and, when also
        ``high <= 1 + margin``, ``"equivalent within +-2%"``); ``"more than 2% below"`` when
        ``high < 1 - margin``; else ``"undecided at 2%"`` (too much noise for that many pairs)."""
        pct = f"{100 * margin:g}%"
        if self.high < 1 - margin:
            return f"more than {pct} below"
        if not self.not_worse(margin):
            return f"undecided at {pct}"
        if self.high <= 1 + margin:
            return f"equivalent within +-{pct}"
        return f"not worse than -{pct}"

    def __str__(self) -> str:
        return (f"{self.ratio:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.confidence:.0%} CI, n={self.n}) "
                f"-> {self.verdict}")


def paired_ratio(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedRatio:
    """Compare two configurations measured in pairs (run ``i`` of each back to back).

    Works on log ratios ``log(a_i / b_i)``: a paired t-interval of their mean, exponentiated, so a
    slow drift of the machine that hits both runs of a pair alike cancels, and 1.05 and 1/1.05 are
    symmetric.  With one pair the interval is unbounded (no spread to estimate).
    """
    from scipy import stats

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired_ratio needs two equally long non-empty sequences, got {a.shape} and {b.shape}")
    if np.any(a <= 0) or np.any(b <= 0) or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("paired_ratio needs positive finite measurements (e.g. tokens/s)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = np.log(a / b)
    m = float(d.mean())
    if len(d) < 2:
        return PairedRatio(float(np.exp(m)), 0.0, math.inf, 1, confidence)
    half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return PairedRatio(float(np.exp(m)), float(np.exp(m - half)), float(np.exp(m + half)), len(d), confidence)
