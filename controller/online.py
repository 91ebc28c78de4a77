"""Online calibration: correct the policy's decision table from the steps the engine runs.

A policy trained offline ranks the k's by the cost and acceptance profiles fitted to the
traces it was trained on.  Served on other traffic (other request sizes, another CPU or GPU)
those rankings can be off by a few per cent, the same size as the gaps between neighbouring
k's (``bench/bench_engine.py`` measured 2-3% below the best fixed k on a machine and request
mix the training traces did not match).  :class:`OnlineCalibration` measures, for every batch
size the engine actually runs, the decode rate of the k's next to the policy's choice and
overrides the policy's k wherever the measurements say, with confidence, that another k is
faster.  Elsewhere the policy's table passes through unchanged.

Per batch size ``b`` and k it keeps the mean step time of *clean* steps (no prefill tokens in
the step, and drafted and verified at the same k: vLLM verifies at step n+1 the drafts made at
the end of step n, so a step is clean when the next step's record has its k).  Acceptance
``a(k)`` (mean accepted tokens per decoding request and step) is pooled over batch sizes, with
exponential forgetting, and comes only from steps that *ran* k.  Reading a shorter k's
acceptance off a longer k's steps (the first j entries of ``accepted_per_pos``) looks exact for
a draft model, which proposes the same first j tokens whatever k, but it is biased: acceptance
comes in easy and hard stretches and a long k walks through the easy ones faster, so its steps
start in hard places more often.  Measured on the tiny pair (``draft_model``, closed loop at
concurrency 1 and 4): held k = 1 accepts 0.544 and 0.560 tokens per step, the first position of
k = 4's steps 0.502 and 0.509, 8-10% less; read that way the rates ranked k = 3 above k = 1 at
batch 4 where k = 1 was 5% faster end to end.  Held, the clean-step rates
``b * (1 + a(k)) / T(b, k)`` ranked k = 1..4 as the whole runs did at concurrency 1, 4 and 16.
Each rate carries a standard error (step time's and acceptance's); at batch 1 acceptance's
dominates (a step accepts 0..k tokens), so a few hundred steps there decide only gaps of 5% or
more and the policy's k stands below that.

Exploration: at a batch size seen at least ``min_seen`` times, the k's next to the current
choice (and any measured k still within noise of it) are run in holds of ``hold`` steps, at
most once every ``explore_every`` steps at that batch size, until each has ``min_steps``
clean steps (contenders within noise: up to ``max_steps``).  A neighbour found faster becomes
the choice and its own neighbours are explored next (hill climbing in k).  The override needs
the measured gain to exceed ``z`` standard errors and ``margin``; anything less keeps the
policy's k, so noise cannot make the table flap.

All of it runs on the controller's background thread (a few microseconds per step); the step
path still only indexes the table.

    >>> cal = OnlineCalibration(max_k=2, max_num_seqs=4, min_seen=2, min_steps=2, explore_every=1, hold=2)
    >>> cal.table((0, 2, 2, 2, 2))   # nothing measured yet: the policy's table
    (0, 2, 2, 2, 2)
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["OnlineCalibration"]


class OnlineCalibration:
    """Measured decode rates per (batch size, k) that override a policy's table (module docstring)."""

    def __init__(self, max_k: int, max_num_seqs: int, *, min_seen: int = 24,
                 min_steps: int = 12, max_steps: int = 128, hold: int = 6, explore_every: int = 12,
                 z: float = 2.0, margin: float = 0.005, cap: int = 256, accept_decay: float = 0.998):
        if max_k < 1 or max_num_seqs < 1:
            raise ValueError(f"need max_k >= 1 and max_num_seqs >= 1, got {max_k} and {max_num_seqs}")
        if not (1 <= min_steps <= max_steps <= cap) or hold < 2 or explore_every < 1 or min_seen < 1:
            raise ValueError("need 1 <= min_steps <= max_steps <= cap, hold >= 2 (one step of a hold verifies the "
                             "previous k), explore_every >= 1 and min_seen >= 1")
        if not 0 < accept_decay <= 1:
            raise ValueError(f"accept_decay must be in (0, 1], got {accept_decay}")
        self.max_k, self.max_num_seqs = max_k, max_num_seqs
        self.min_seen, self.min_steps, self.max_steps, self.hold = min_seen, min_steps, max_steps, hold
        self.explore_every, self.z, self.margin, self.cap, self.decay = explore_every, z, margin, cap, accept_decay
        nb, nk = max_num_seqs + 1, max_k + 1
        self.n = [[0] * nk for _ in range(nb)]        # clean steps per (b, k), capped at ``cap``
        self.mean = [[0.0] * nk for _ in range(nb)]   # their mean step ms (a moving mean past the cap)
        self.var = [[0.0] * nk for _ in range(nb)]
        self.seen = [0] * nb                          # steps at b, any k
        self.since = [0] * nb                         # steps at b since the last exploration there
        # per k, decayed sums over the steps that ran it: steps, requests (b), b*x and b*x^2 with x
        # the step's accepted tokens per request
        self.acc = [[0.0, 0.0, 0.0, 0.0] for _ in range(nk)]
        self._pending: dict | None = None             # the last record: clean or not, the next one tells
        self._explore: list | None = None             # [b, k, verifying steps left, steps left]
        self._override: dict[int, int] = {}           # b -> k where measurements overrule the policy
        self._prior: tuple[int, ...] = ()
        self._dirty = True
        self._touched: set[int] = set()               # batch sizes with new clean steps
        self._full_at = 0
        self.records = self.clean = self.explorations = self.explore_steps = 0

    def resume(self) -> None:
        """Forget the step in flight and any exploration: the steps in between were not this policy's."""
        if self._explore is not None:
            self.since[self._explore[0]] = 0
        self._pending = self._explore = None
        self._dirty = True

    # ------------------------------------------------------------------ measurements
    def observe(self, rec: dict[str, Any]) -> None:
        """Fold in one finished step's ``spec-trace/1`` fields (in step order)."""
        self.records += 1
        b, k = int(rec["batch_size"]), min(int(rec["k"]), self.max_k)
        prev, self._pending = self._pending, rec
        if prev is not None and min(int(prev["k"]), self.max_k) == k:
            self._add_time(prev)
        if 0 < b <= self.max_num_seqs:
            self.seen[b] += 1
            self.since[b] += 1
        self._add_accept(b, k, rec.get("accepted_per_pos") or ())
        ex = self._explore
        if ex is not None:
            ex[3] -= 1
            if b == ex[0] and k == ex[1]:
                ex[2] -= 1
                self.explore_steps += 1
            if ex[2] <= 0 or ex[3] <= 0:
                self.since[ex[0]] = 0
                self._explore = None
        self._dirty = True

    def _add_time(self, rec: dict) -> None:
        b, k, ms = int(rec["batch_size"]), min(int(rec["k"]), self.max_k), float(rec["step_ms"])
        if not 0 < b <= self.max_num_seqs or rec.get("prefill_tokens", 0) or not ms > 0:
            return
        self.clean += 1
        self._touched.add(b)
        n = min(self.n[b][k] + 1, self.cap)
        self.n[b][k] = n
        m = self.mean[b][k]
        d = ms - m
        m += d / n
        self.mean[b][k] = m
        self.var[b][k] += (d * (ms - m) - self.var[b][k]) / n

    def _add_accept(self, b: int, k: int, per_pos) -> None:
        # forgetting per k, at that k's own steps: a k the engine runs rarely (explored) keeps
        # its evidence, the one it runs follows drift over its last ~1/(1 - decay) steps
        if b <= 0 or k <= 0:
            return
        x = sum(per_pos[:k]) / b
        a, dec = self.acc[k], self.decay
        a[0] = a[0] * dec + 1.0
        a[1] = a[1] * dec + b
        a[2] = a[2] * dec + b * x
        a[3] = a[3] * dec + b * x * x

    def accept(self, k: int) -> float | None:
        """Mean accepted tokens per decoding request and step at k (None: not measured)."""
        if k == 0:
            return 0.0
        a = self.acc[k]
        return a[2] / a[1] if a[1] > 0 else None

    def accept_se(self, k: int) -> float:
        """Standard error of :meth:`accept` (requests within a step taken as independent)."""
        a = self.acc[k]
        if k == 0 or a[0] < 2:
            return 0.0 if k == 0 else math.inf
        m = a[2] / a[1]
        per_request_var = max(a[3] - m * m * a[1], 0.0) / a[0]  # E[b (x - m)^2] = var of one request
        return math.sqrt(per_request_var / a[1])

    def rate(self, b: int, k: int) -> tuple[float, float] | None:
        """(committed tokens per ms, its relative standard error) of k at batch size b, or None."""
        n = self.n[b][k]
        a = self.accept(k)
        if n < self.min_steps or a is None:
            return None
        m = self.mean[b][k]
        return b * (1.0 + a) / m, math.hypot(math.sqrt(max(self.var[b][k], 0.0) / n) / m, self.accept_se(k) / (1.0 + a))

    # ------------------------------------------------------------------ decisions
    def _beats(self, r1: tuple[float, float], r0: tuple[float, float]) -> bool:
        """Whether rate r1 is above r0 by more than noise (z standard errors) and the margin."""
        gain = r1[0] / r0[0] - 1.0
        return gain > self.margin and gain > self.z * math.hypot(r1[1], r0[1])

    def choose(self, b: int, prior_k: int) -> int:
        """The calibrated k at batch size b: the fastest measured k that beats the policy's, else the policy's."""
        base = self.rate(b, prior_k)
        if base is None:
            return prior_k
        best, best_r = prior_k, base
        for k in range(self.max_k + 1):
            if k == prior_k:
                continue
            r = self.rate(b, k)
            if r is not None and r[0] > best_r[0] and self._beats(r, base):
                best, best_r = k, r
        return best

    def _to_explore(self, b: int, cur: int) -> int | None:
        """The k to explore next at b (fewest clean steps first), or None."""
        if self.n[b][cur] < self.min_steps:
            return None  # the choice itself is not measured yet: nothing to compare with
        base = self.rate(b, cur)
        pick, pick_n = None, None
        for k in range(self.max_k + 1):
            if k == cur:
                continue
            n = self.n[b][k]
            if abs(k - cur) == 1 and n < self.min_steps:
                want = True
            elif self.min_steps <= n < self.max_steps and base is not None:
                r = self.rate(b, k)
                want = r is not None and not self._beats(base, r) and not self._beats(r, base)  # within noise
            else:
                want = False
            if want and (pick_n is None or n < pick_n):
                pick, pick_n = k, n
        return pick

    def table(self, prior) -> tuple[int, ...]:
        """The policy's k per batch size (``prior[b]``) with the measured overrides and any exploration."""
        prior = tuple(prior)
        if self._dirty or prior != self._prior:
            # the batch sizes with new clean steps, all of them when the policy's table or (every 16
            # records) the pooled acceptance moved: a few microseconds per step on the refresher
            full = prior != self._prior or self.records - self._full_at >= 16
            self._prior, self._dirty = prior, False
            hi = min(len(prior), self.max_num_seqs + 1)
            todo = range(1, hi) if full else [b for b in self._touched if b < hi]
            if full:
                self._full_at = self.records
            self._touched.clear()
            ov = self._override
            for b in todo:
                if self.seen[b] >= self.min_seen or any(self.n[b]):
                    k = self.choose(b, min(prior[b], self.max_k))
                    if k != prior[b]:
                        ov[b] = k
                        continue
                ov.pop(b, None)
            if self._explore is None:
                self._start_exploring(prior)
        if not self._override and self._explore is None:
            return prior
        out = list(prior)
        for b, k in self._override.items():
            if b < len(out):
                out[b] = k
        if self._explore is not None and self._explore[0] < len(out):
            out[self._explore[0]] = self._explore[1]
        return tuple(out)

    def _start_exploring(self, prior: tuple[int, ...]) -> None:
        # the busiest batch size that is due: exploration goes where the engine spends its steps
        cands = [b for b in range(1, min(len(prior), self.max_num_seqs + 1))
                 if self.seen[b] >= self.min_seen and self.since[b] >= self.explore_every]
        for b in sorted(cands, key=lambda b: -self.seen[b]):
            cur = self._override.get(b, min(prior[b], self.max_k))
            k = self._to_explore(b, cur)
            if k is not None:
                # hold + 1 verifying steps: the first verifies the previous k, the last drafts the next one
                self._explore = [b, k, self.hold, 4 * self.hold]
                self.explorations += 1
                return

    def stats(self) -> dict[str, Any]:
        measured = {}
        for b in range(1, self.max_num_seqs + 1):
            row = {k: round(r[0], 4) for k in range(self.max_k + 1) if (r := self.rate(b, k)) is not None}
            if row:
                measured[b] = row
        return {"records": self.records, "clean_steps": self.clean, "explorations": self.explorations,
                "explore_steps": self.explore_steps, "overrides": dict(self._override),
                "accept": [None if (a := self.accept(k)) is None else round(a, 4) for k in range(self.max_k + 1)],
                "accept_se": [round(se, 4) if math.isfinite(se := self.accept_se(k)) else None
                              for k in range(self.max_k + 1)],
                "rates": measured}
