"""A trace-driven simulator of a continuous-batching engine with speculative decoding.

What it models (vLLM V1's scheduler, simplified where noted):

* Requests arrive at their recorded ``arrival_s`` and wait in a FIFO queue (open loop), or,
  where the load came from a closed-loop client (``RequestArrays.after``), ``gap_s`` after the
  request that released them finished *in the simulation*: a client that keeps N requests in
  flight sends sooner when the engine runs faster, and an open-loop replay of its recorded
  arrival times cannot (it runs the engine at the recorded pace whatever the actions do).
* Each step, every running request that finished its prefill decodes: it is verified
  with ``k`` draft tokens (``width`` candidates per depth) and commits
  ``1 + accepted`` tokens, ``accepted`` drawn from the acceptance profile.  The token
  budget ``max_num_batched_tokens`` is charged ``1 + k * width`` per decoding request.
* The rest of the budget goes to chunked prefill: first requests part-way through their
  prompt, then new requests from the queue while a sequence slot (``max_num_seqs``) and
  KV room are free.  The step that finishes a prompt also samples its first token.
* KV: a request reserves ``prompt + output`` tokens when admitted (no preemption -- a
  simplification); ``kv_usage`` is the fraction of capacity holding context.
* The step's duration comes from the cost profile for ``(batch, k, width, prefill
  tokens, kv_usage)``, times log-normal noise of the profile's ``noise_sigma``.

Acceptance uses common random numbers: one uniform per sequence slot is drawn when a
step is prepared, and a sequence's acceptance length is ``L = F^-1(u)`` for the CDF of
the chosen width, truncated at ``k``.  So the outcome of every action is fixed before
the action is chosen, which is what the hindsight oracle needs (:meth:`Simulator.peek`).
Where the proposer drafts for only part of the batch (the profile's ``propose_rate(k)``
below 1, as with vLLM's ``ngram``), a sequence gets a draft iff ``u < propose_rate(k)``
and then ``L = F^-1(u / propose_rate(k))``; the others commit one token and count as no
draft.

Example::

    >>> from envs.profiles import PROFILES
    >>> pre = PROFILES["h100-llama3-8b-eagle"]
    >>> reqs = RequestArrays.from_lists([0.0, 0.01], [100, 50], [20, 30])
    >>> sim = Simulator(reqs, pre.cost, pre.acceptance, EngineConfig(max_k=pre.max_k), seed=0)
    >>> while sim.prepare() is not None:
    ...     _ = sim.execute(2, 1)
    >>> sim.stats().completed
    2
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from envs.profiles import AcceptanceProfile, CostModel, held_walks

__all__ = ["EngineConfig", "RequestArrays", "SimStats", "Simulator", "StepOutcome", "StepState", "closed_loop_links",
           "thin_agree"]

CLOSED_LOOP_TOL_S = 0.05  # a closed-loop client sends within this long of the finish that freed a slot


def closed_loop_links(arrival_s, finish_s, tol_s: float = CLOSED_LOOP_TOL_S) -> tuple[np.ndarray, np.ndarray]:
    """``(after, gap_s)`` of a load recorded from a closed-loop client: each request linked to a
    finish that came at most ``tol_s`` before its arrival (the engine step that freed its slot).

    Requests in arrival order, each linked to the latest finish within ``tol_s`` that has not
    released another request yet: one finish, one new request.  Requests beyond that (a client
    that sent a whole wave, or a new concurrency level, once the last request finished) are
    linked to the latest finish.  A request with no finish that close (the first ones of a run)
    stays open loop (``after = -1``).

        >>> after, gap = closed_loop_links([0.0, 0.0, 1.001, 1.5, 2.002, 2.003], [1.0, 2.0, 2.0, 3.0, 4.0, 4.1])
        >>> after.tolist()
        [-1, -1, 0, -1, 2, 1]
    """
    a = np.asarray(arrival_s, dtype=np.float64)
    f = np.asarray(finish_s, dtype=np.float64)
    n = len(a)
    after = np.full(n, -1, dtype=np.int64)
    gap = np.zeros(n)
    done = np.flatnonzero(np.isfinite(f))
    done = done[np.argsort(f[done], kind="stable")]
    fs = f[done]
    claimed = np.zeros(n, dtype=bool)
    for i in np.argsort(a, kind="stable").tolist():
        hi = int(np.searchsorted(fs, a[i], side="right"))  # finishes at or before the arrival ...
        lo = int(np.searchsorted(fs, a[i] - tol_s, side="left"))  # ... and at most tol_s before it
        if lo >= hi:
            continue
        near = done[lo:hi]
        free = near[~claimed[near]]
        j = int(free[-1]) if len(free) else int(near[-1])
        claimed[j] = True
        after[i], gap[i] = j, a[i] - f[j]
    return after, gap


def thin_agree(agree: np.ndarray, eps: float, rng: np.random.Generator) -> np.ndarray:
    """A weaker drafter's ``agree`` array: every output token independently becomes one the
    drafter cannot predict with probability ``eps``, and each draft stops at the first such token.

    ``agree[t]`` (the leading tokens of the draft proposed after ``t`` output tokens that match
    tokens ``t, t + 1, ...``) becomes ``min(agree[t], u - t)`` with ``u >= t`` the first broken
    token; ``-1`` (no draft) stays.  The same broken token cuts every draft that reaches it, so
    the array stays a consistent walk (a draft that matched up to ``u`` from ``t`` matches up to
    ``u`` from ``t + 1`` too), and per-position acceptance drops by the factor ``1 - eps``
    while its pattern along the request (easy and hard stretches) is kept.

    >>> thin_agree(np.array([3, 2, 1, 0, -1, 2, 1, 0]), 0.0, np.random.default_rng(0)).tolist()
    [3, 2, 1, 0, -1, 2, 1, 0]
    >>> thin_agree(np.array([3, 2, 1, 0, -1, 2, 1, 0]), 1.0, np.random.default_rng(0)).tolist()
    [0, 0, 0, 0, -1, 0, 0, 0]
    """
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps (the chance a token becomes unpredictable) must be in [0, 1], got {eps}")
    a = np.asarray(agree)
    n = len(a)
    if eps <= 0.0 or n == 0:
        return a.copy()
    t = np.arange(n)
    broken = np.append(np.flatnonzero(rng.random(n) < eps), 2 * n + 128)  # + a sentinel past any draft
    dist = broken[np.searchsorted(broken, t)] - t  # to the first broken token at or after t
    return np.where(a < 0, a, np.minimum(a, dist)).astype(a.dtype)


def _relink(after: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Closed-loop links ``after`` with each old request index ``j`` replaced by ``new[j]`` (-1
    stays -1, and so does a link to a request ``new`` maps to -1)."""
    return np.where(after >= 0, new[np.maximum(after, 0)], -1)


@dataclass(frozen=True)
class EngineConfig:
    """The engine settings the simulator needs; the trace header supplies them where it has them."""

    max_k: int = 4
    widths: tuple[int, ...] = (1,)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    kv_capacity_tokens: int = 300_000

    def __post_init__(self):
        for name in ("max_k", "max_num_seqs", "max_num_batched_tokens", "kv_capacity_tokens"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"EngineConfig.{name} must be an int >= 1, got {v!r}")
        object.__setattr__(self, "widths", tuple(sorted(set(int(w) for w in self.widths))))

    @classmethod
    def from_header(cls, header: dict, **overrides) -> EngineConfig:
        """Settings from a trace header (``max_k``, ``widths``, ``max_num_seqs`` and the optional
        ``max_num_batched_tokens`` / ``kv_capacity_tokens`` extension fields), then ``overrides``."""
        kw = {"max_k": header["max_k"], "widths": tuple(header["widths"])}
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_capacity_tokens"):
            if name in header:
                kw[name] = int(header[name])
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


@dataclass
class RequestArrays:
    """The load to replay: arrival times and sizes, sorted by arrival.

    ``agree`` (optional, one entry per request, ``None`` where unknown): the request's draft
    agreement array from its trace record (:mod:`serving_patch.agree`); the simulator walks it
    instead of drawing acceptance from the profile.

    ``after`` / ``gap_s`` (optional, closed-loop load, :func:`closed_loop_links`): request ``i``
    with ``after[i] = j >= 0`` is sent ``gap_s[i]`` after request ``j`` (an earlier one) finishes,
    not at ``arrival_s[i]``; ``-1`` = open loop, at ``arrival_s``.  ``arrival_s`` keeps the
    recorded time for the order and for windows (a request whose releaser falls outside a
    window arrives at its recorded time).
    """

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    agree: list | None = None
    after: np.ndarray | None = None
    gap_s: np.ndarray | None = None

    def __post_init__(self):
        self.arrival_s = np.asarray(self.arrival_s, dtype=np.float64)
        self.prompt_tokens = np.asarray(self.prompt_tokens, dtype=np.int64)
        self.output_tokens = np.asarray(self.output_tokens, dtype=np.int64)
        n = len(self.arrival_s)
        if not (n == len(self.prompt_tokens) == len(self.output_tokens)):
            raise ValueError("arrival_s, prompt_tokens and output_tokens must have the same length")
        if (self.after is None) != (self.gap_s is None):
            raise ValueError("after and gap_s go together: give both (closed-loop links) or neither")
        if self.after is not None:
            self.after = np.asarray(self.after, dtype=np.int64)
            self.gap_s = np.asarray(self.gap_s, dtype=np.float64)
            if self.after.shape != (n,) or self.gap_s.shape != (n,):
                raise ValueError(f"after and gap_s need one entry per request ({n}), got {self.after.shape} "
                                 f"and {self.gap_s.shape}")
            if np.any(self.after >= n) or np.any(self.after < -1) or np.any(self.gap_s < 0) or not np.all(
                    np.isfinite(self.gap_s)):
                raise ValueError("after must be -1 or a request index, gap_s finite and >= 0")
            if not np.any(self.after >= 0):
                self.after = self.gap_s = None
        if self.agree is not None:
            if len(self.agree) != len(self.arrival_s):
                raise ValueError(f"agree needs one entry per request ({len(self.arrival_s)}), got {len(self.agree)}")
            self.agree = [None if a is None else np.asarray(a, dtype=np.int8) for a in self.agree]
            for i, a in enumerate(self.agree):
                if a is not None and len(a) != self.output_tokens[i]:
                    raise ValueError(f"agree of request {i} has {len(a)} entries, its output_tokens is "
                                     f"{self.output_tokens[i]}")
            if all(a is None for a in self.agree):
                self.agree = None
        if len(self.arrival_s) and np.any(np.diff(self.arrival_s) < 0):
            order = np.argsort(self.arrival_s, kind="stable")
            self.arrival_s, self.prompt_tokens, self.output_tokens = (
                self.arrival_s[order], self.prompt_tokens[order], self.output_tokens[order])
            if self.agree is not None:
                self.agree = [self.agree[i] for i in order]
            if self.after is not None:
                new = np.empty(n, dtype=np.int64)
                new[order] = np.arange(n)
                self.after, self.gap_s = _relink(self.after[order], new), self.gap_s[order]
        if self.after is not None and np.any(self.after >= np.arange(n)):
            i = int(np.flatnonzero(self.after >= np.arange(n))[0])
            raise ValueError(f"request {i} is released by request {self.after[i]}, which does not arrive before it")

    @classmethod
    def from_lists(cls, arrival_s, prompt_tokens, output_tokens) -> RequestArrays:
        return cls(np.asarray(arrival_s), np.asarray(prompt_tokens), np.asarray(output_tokens))

    @classmethod
    def from_trace(cls, trace, closed_loop: bool | None = None) -> RequestArrays:
        """The trace's requests.  ``closed_loop`` (None: the header's ``client`` field says, True
        for ``"closed"``): link each request to the finish that released it
        (:func:`closed_loop_links`), so the simulator replays the client, not its timestamps."""
        r = trace.requests
        if closed_loop is None:
            closed_loop = trace.header.get("client") == "closed"
        after = gap = None
        if closed_loop:
            after, gap = closed_loop_links(r["arrival_s"], r["finish_s"])
        return cls(r["arrival_s"], r["prompt_tokens"], r["output_tokens"], trace.agree, after, gap)

    @property
    def closed_loop(self) -> int:
        """How many requests are released by another's finish (0: an open-loop load)."""
        return 0 if self.after is None else int(np.count_nonzero(self.after >= 0))

    @classmethod
    def concat(cls, parts: Sequence[RequestArrays], gap_s: float = 10.0) -> RequestArrays:
        """The parts one after another on one timeline: each part's first arrival ``gap_s``
        after the previous part's last one (the order of ``parts``; sizes unchanged)."""
        if not parts:
            raise ValueError("concat needs at least one RequestArrays")
        t, pt, ot, ag, af, gp, end, n = [], [], [], [], [], [], 0.0, 0
        for r in parts:
            if not len(r):
                continue
            shift = (end + gap_s if t else 0.0) - float(r.arrival_s[0])
            t.append(r.arrival_s + shift)
            pt.append(r.prompt_tokens)
            ot.append(r.output_tokens)
            ag.extend(r.agree if r.agree is not None else [None] * len(r))
            af.append(np.where(r.after >= 0, r.after + n, -1) if r.after is not None else np.full(len(r), -1))
            gp.append(r.gap_s if r.gap_s is not None else np.zeros(len(r)))
            end = float(t[-1][-1])
            n += len(r)
        if not t:
            return cls(np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))
        return cls(np.concatenate(t), np.concatenate(pt), np.concatenate(ot), ag, np.concatenate(af),
                   np.concatenate(gp))

    def __len__(self) -> int:
        return len(self.arrival_s)

    def window(self, start_s: float, duration_s: float, load_scale: float = 1.0) -> RequestArrays:
        """Requests arriving in ``[start_s, start_s + duration_s)`` of the *scaled* timeline,
        with arrival times divided by ``load_scale`` (x2 = twice the arrival rate) and
        shifted to start at 0."""
        if load_scale <= 0:
            raise ValueError(f"load_scale must be > 0, got {load_scale}")
        t = self.arrival_s / load_scale
        m = (t >= start_s) & (t < start_s + duration_s)
        idx = np.flatnonzero(m)
        agree = None if self.agree is None else [self.agree[i] for i in idx]
        after = gap = None
        if self.after is not None:  # links inside the window kept; a releaser outside it: open loop
            new = np.full(len(self), -1, dtype=np.int64)
            new[idx] = np.arange(len(idx))
            after, gap = _relink(self.after[idx], new), self.gap_s[idx]
        return RequestArrays(t[m] - start_s, self.prompt_tokens[m], self.output_tokens[m], agree, after, gap)

    @property
    def span_s(self) -> float:
        return float(self.arrival_s[-1]) if len(self.arrival_s) else 0.0

    def thinned(self, eps: float, rng: np.random.Generator) -> RequestArrays:
        """A copy whose ``agree`` arrays are those of a weaker drafter (:func:`thin_agree`)."""
        if self.agree is None or eps <= 0:
            return self
        agree = [None if a is None else thin_agree(a, eps, rng) for a in self.agree]
        return RequestArrays(self.arrival_s, self.prompt_tokens, self.output_tokens, agree, self.after, self.gap_s)


@dataclass
class StepState:
    """What the scheduler knows before choosing an action (the decision's input)."""

    t_s: float
    batch_size: int       # requests decoding this step
    waiting: int          # queued, not yet admitted
    kv_usage: float
    prefill_pending: int  # prompt tokens still to prefill (running + waiting)
    running: int          # admitted requests (decoding or prefilling)


@dataclass
class StepOutcome:
    """What one step did: the ``spec-trace/1`` step fields plus what a reward needs."""

    t_s: float
    batch_size: int
    prefill_tokens: int
    waiting: int
    kv_usage: float
    k: int
    width: int
    drafts: int
    draft_tokens: int
    accepted_tokens: int
    accepted_per_pos: list
    step_ms: float
    committed_tokens: int     # tokens added to outputs (decode + first tokens), capped at output length
    in_system: int            # requests running or waiting during the step (Little's-law weight)
    finished: int             # requests completed at the end of this step

    def record(self) -> dict:
        """The ``step`` record for a trace writer."""
        return {"t_s": self.t_s, "batch_size": self.batch_size, "prefill_tokens": self.prefill_tokens,
                "waiting": self.waiting, "kv_usage": self.kv_usage, "k": self.k, "width": self.width,
                "drafts": self.drafts, "draft_tokens": self.draft_tokens, "accepted_tokens": self.accepted_tokens,
                "accepted_per_pos": self.accepted_per_pos, "step_ms": self.step_ms}


@dataclass
class SimStats:
    """Totals of a run, for evaluation and for checking a simulator against a trace."""

    steps: int
    completed: int
    total_requests: int
    sim_time_s: float
    busy_time_s: float
    committed_tokens: int
    drafted_tokens: int
    accepted_tokens: int
    latencies_s: np.ndarray = field(repr=False)
    ttft_s: np.ndarray = field(repr=False)
    step_ms: np.ndarray = field(repr=False)

    @property
    def goodput_tps(self) -> float:
        """Committed tokens per busy second (the engine's throughput while it has work)."""
        return self.committed_tokens / self.busy_time_s if self.busy_time_s > 0 else 0.0

    @property
    def mean_latency_s(self) -> float:
        return float(np.mean(self.latencies_s)) if len(self.latencies_s) else math.nan

    @property
    def p99_latency_s(self) -> float:
        return float(np.percentile(self.latencies_s, 99)) if len(self.latencies_s) else math.nan

    @property
    def accept_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else math.nan

    def summary(self) -> dict:
        return {"steps": self.steps, "completed": self.completed, "requests": self.total_requests,
                "sim_time_s": round(self.sim_time_s, 3), "goodput_tps": round(self.goodput_tps, 2),
                "mean_latency_s": round(self.mean_latency_s, 4), "p99_latency_s": round(self.p99_latency_s, 4),
                "mean_step_ms": round(self.busy_time_s * 1000.0 / self.steps, 4) if self.steps else None,
                "accept_rate": round(self.accept_rate, 4) if self.drafted_tokens else None}


def _flatten_agree(requests: RequestArrays) -> tuple[np.ndarray, np.ndarray | None]:
    """The requests' agree arrays end to end, and each request's start in it (-1: none); (empty, None)
    when no request has one."""
    if requests.agree is None:
        return np.zeros(0, dtype=np.int8), None
    off = np.full(len(requests), -1, dtype=np.int64)
    parts, n = [], 0
    for i, a in enumerate(requests.agree):
        if a is not None:
            off[i] = n
            parts.append(a)
            n += len(a)
    return np.concatenate(parts), off


class Simulator:
    """Replays request arrivals through a continuous-batching engine (module docstring).

    Drive it with ``state = sim.prepare()`` (``None`` once every request finished) and
    ``outcome = sim.execute(k, width)``.  ``time_offset_s`` shifts the acceptance
    profile's drift timeline, so a window cut from the middle of a trace sees that
    part of the drift.  All randomness comes from ``seed``.
    """

    def __init__(self, requests: RequestArrays, cost: CostModel, acceptance: AcceptanceProfile,
                 config: EngineConfig, *, seed: int | None = None, time_offset_s: float = 0.0,
                 noise: bool = True, record_steps: bool = True):
        if acceptance.depth < config.max_k:
            raise ValueError(f"acceptance profile has {acceptance.depth} positions but the engine's max_k is "
                             f"{config.max_k}: fit or build the profile for max_k >= {config.max_k}")
        self.requests = requests
        self.cost = cost
        self.acceptance = acceptance
        self.config = config
        self.time_offset_s = float(time_offset_s)
        self.noise = noise
        self.record_steps = record_steps
        self._agree_flat, self._agree_off = _flatten_agree(requests)
        self._held: tuple[np.ndarray, np.ndarray] | None = None  # held_walks, computed on the first peek_held
        # closed-loop links: the open-loop requests (recorded arrival order), and who each finish releases
        n = len(requests)
        after = requests.after if requests.after is not None else np.full(n, -1, dtype=np.int64)
        open_ = np.flatnonzero(after < 0)
        linked = np.flatnonzero(after >= 0)
        linked = linked[np.argsort(after[linked], kind="stable")]
        self._released_by = np.zeros(n + 1, dtype=np.int64)  # CSR: _released[_released_by[j]:_released_by[j + 1]]
        np.cumsum(np.bincount(after[linked], minlength=n), out=self._released_by[1:])
        self._released = linked
        self._open_r = open_.tolist()
        self._open_t = requests.arrival_s[open_].tolist()
        self.reset(seed)

    # ------------------------------------------------------------------ state
    def reset(self, seed: int | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        S = self.config.max_num_seqs
        n = len(self.requests)
        self.arrival_s = self.requests.arrival_s.copy()  # closed-loop requests: set when released
        self.t = self._open_t[0] if self._open_t else 0.0
        self._next = 0                        # next open-loop request to arrive (index into _open_r)
        self._release_q: list[tuple[float, int]] = []  # (arrival, request) of released closed-loop requests
        self._queue: deque[int] = deque()
        self._slot_req = np.full(S, -1, dtype=np.int64)
        self._out_left = np.zeros(S, dtype=np.int64)
        self._ctx = np.zeros(S, dtype=np.int64)
        self._decoding = np.zeros(S, dtype=bool)
        self._free: list[int] = list(range(S - 1, -1, -1))
        self._prefilling: list[int] = []      # slots part-way through their prompt (FIFO)
        self._prefill_left: dict[int, int] = {}
        self._n_decoding = 0
        self._ctx_total = 0
        self._reserved = 0
        self._pending_prefill = 0             # prompt tokens of running prefills (waiting ones added on read)
        self._waiting_prefill = 0
        self.finish_s = np.full(n, np.nan)
        self.first_token_s = np.full(n, np.nan)
        self._u = np.zeros(S)
        self._slot_off = np.full(S, -1, dtype=np.int64)  # where the slot's request's agree array starts, -1: none
        self._slot_total = np.zeros(S, dtype=np.int64)   # the slot's request's output_tokens
        self._prepared = False
        self._steps = 0
        self._busy = 0.0
        self._committed = 0
        self._drafted = 0
        self._accepted = 0
        self._completed = 0
        self._step_ms: list[float] = []
        self._noise_buf = np.empty(0)
        self._noise_i = 0

    def _next_arrival(self) -> tuple[float, int]:
        """The earliest request not yet queued, ``(arrival, request)``; ``(inf, -1)`` when none is known yet."""
        i = self._next
        nxt = (self._open_t[i], self._open_r[i]) if i < len(self._open_r) else (math.inf, -1)
        if self._release_q and self._release_q[0][0] < nxt[0]:
            return self._release_q[0]
        return nxt

    def _admit_arrivals(self) -> None:
        while True:
            t, r = self._next_arrival()
            if r < 0 or t > self.t:
                return
            if self._release_q and self._release_q[0][1] == r:
                heapq.heappop(self._release_q)
            else:
                self._next += 1
            self._queue.append(r)
            self._waiting_prefill += int(self.requests.prompt_tokens[r])

    @property
    def completed(self) -> int:
        """Requests finished so far."""
        return self._completed

    def prepare(self) -> StepState | None:
        """Admit arrivals up to now (jumping idle time) and describe the coming step."""
        self._admit_arrivals()
        if not self._queue and not self._prefilling and self._n_decoding == 0:
            t, r = self._next_arrival()
            if r < 0:  # every open-loop request arrived and every release happened: the run is over
                return None
            self.t = max(self.t, t)
            self._admit_arrivals()
        # one uniform per slot: the realised acceptance of every action is fixed now
        self._u = self.rng.random(self.config.max_num_seqs)
        self._prepared = True
        S = self.config.max_num_seqs
        kv = min(1.0, self._ctx_total / self.config.kv_capacity_tokens)
        return StepState(self.t, self._n_decoding, len(self._queue), kv,
                         self._pending_prefill + self._waiting_prefill, S - len(self._free))

    def peek(self, k: int, width: int = 1) -> tuple[int, float]:
        """``(accepted_tokens, step_ms without noise)`` the prepared step would have with ``(k, width)``,
        ignoring output caps -- for the hindsight oracle.  Does not change the simulator."""
        B = self._n_decoding
        acc = 0
        if k > 0 and B:
            lengths, _ = self._accept_lengths(self._decoding, k, self.t + self.time_offset_s, width)
            acc = int(np.minimum(lengths, k).sum())
        prefill = self._prefill_budget(B, k, width)
        kv = min(1.0, self._ctx_total / self.config.kv_capacity_tokens)
        return acc, self.cost.predict_one(B, k, width, prefill, kv)

    def peek_held(self, k: int, width: int = 1) -> float:
        """Accepted tokens the prepared step would have with ``(k, width)`` if ``k`` were then held.
        The slots walking their request's ``agree`` array count, together, their accepted tokens per
        sequence-step over the rest of their requests at k (:func:`held_walks`, pooled over the
        slots: the rate of finishing their remaining work holding k); any other slot its realised
        draw as in :meth:`peek`.  The hindsight trainer's label: a policy that cannot see where in
        its repetitive stretches each sequence is cannot harvest them step by step the way the
        realised draw suggests."""
        B = self._n_decoding
        if k == 0 or not B:
            return 0.0
        if width != 1 or self._agree_off is None:
            return float(self.peek(k, width)[0])
        dec = self._decoding
        lengths, _ = self._accept_lengths(dec, k, self.t + self.time_offset_s, width)
        off = self._slot_off[dec]
        walk = off >= 0
        drawn = float(np.minimum(lengths[~walk], k).sum())
        if not walk.any():
            return drawn
        if self._held is None:
            self._held = held_walks(self._agree_flat, self._agree_off, self.config.max_k)
        at = off[walk] + (self._slot_total[dec] - self._out_left[dec])[walk]
        acc, steps = self._held
        return drawn + float(walk.sum() * acc[k - 1, at].sum() / steps[k - 1, at].sum())

    def _accept_lengths(self, dec: np.ndarray, k: int, t_s: float, width: int) -> tuple[np.ndarray, int]:
        """Acceptance lengths (before the cap at k) of the decoding slots ``dec``, and how many of
        them got a draft.  A slot whose request carries an ``agree`` array walks it (chains,
        ``width`` 1): the length is its entry at the tokens the request has, -1 = no draft.  Any
        other slot draws from the profile with its prepared uniform ``u``: drafted iff
        ``u < propose`` (the profile's rate at this k), length from ``u / propose`` (so
        ``propose = 1`` draws exactly as without it)."""
        u = self._u[dec]
        cdf = self.acceptance.length_cdf(t_s, width)
        propose = self.acceptance.propose_rate(k)
        if propose >= 1.0:
            lengths, drafted = np.searchsorted(cdf, u, side="right"), np.ones(len(u), dtype=bool)
        else:
            drafted = u < propose
            lengths = np.where(drafted, np.searchsorted(cdf, u / propose, side="right"), 0)
        if self._agree_off is not None and width == 1:
            off = self._slot_off[dec]
            walk = off >= 0
            if walk.any():
                pos = self._slot_total[dec] - self._out_left[dec]
                a = self._agree_flat[np.where(walk, off + pos, 0)].astype(np.int64)
                lengths = np.where(walk, np.maximum(a, 0), lengths)
                drafted = np.where(walk, a >= 0, drafted)
        return lengths, int(drafted.sum())

    def _prefill_budget(self, B: int, k: int, width: int) -> int:
        budget = max(0, self.config.max_num_batched_tokens - B * (1 + k * width))
        return min(budget, self._pending_prefill + self._waiting_prefill)

    def _noise(self) -> float:
        sigma = getattr(self.cost, "noise_sigma", 0.0)
        if not self.noise or sigma <= 0:
            return 1.0
        if self._noise_i >= len(self._noise_buf):
            self._noise_buf = self.rng.lognormal(-0.5 * sigma * sigma, sigma, 4096)
            self._noise_i = 0
        v = self._noise_buf[self._noise_i]
        self._noise_i += 1
        return float(v)

    def execute(self, k: int, width: int = 1) -> StepOutcome:
        """Run the prepared step with speculative length ``k`` and tree ``width``."""
        if not self._prepared:
            raise RuntimeError("call prepare() before execute(); prepare() returned None once the run is over")
        cfg = self.config
        if not 0 <= k <= cfg.max_k:
            raise ValueError(f"k={k} is outside [0, max_k={cfg.max_k}]")
        if k == 0:
            width = 1
        elif width not in cfg.widths:
            raise ValueError(f"width={width} is not supported by the engine (widths {list(cfg.widths)})")
        self._prepared = False
        t0 = self.t
        B = self._n_decoding
        waiting = len(self._queue)
        kv_usage = min(1.0, self._ctx_total / cfg.kv_capacity_tokens)
        in_system = cfg.max_num_seqs - len(self._free) + waiting

        # ---- decode: acceptance from the prepared uniforms
        accepted = 0
        drafts = 0
        app: list[int] = []
        committed = 0
        finished_slots = None
        if B:
            dec = self._decoding
            if k > 0:
                lengths, drafts = self._accept_lengths(dec, k, t0 + self.time_offset_s, width)
                acc = np.minimum(lengths, k)
                counts = np.bincount(acc, minlength=k + 1)
                app = counts[::-1].cumsum()[::-1][1:].tolist()  # drafts whose position i was accepted
                accepted = int(acc.sum())
                tokens = acc + 1
            else:
                tokens = 1
            left = self._out_left[dec]
            gained = np.minimum(tokens, left)
            committed = int(gained.sum()) if k > 0 else int(B)  # left >= 1 for every decoding slot
            self._out_left[dec] = left - gained
            self._ctx[dec] += gained
            self._ctx_total += committed
            finished_slots = np.flatnonzero(dec & (self._out_left <= 0))

        # ---- chunked prefill with what is left of the token budget
        budget = max(0, cfg.max_num_batched_tokens - B * (1 + k * width))
        prefill = 0
        newly_decoding: list[int] = []
        first_token_slots: list[int] = []
        while budget > 0:
            if not self._prefilling:
                if not self._queue or not self._free:
                    break
                r = self._queue[0]
                need = int(self.requests.prompt_tokens[r] + self.requests.output_tokens[r])
                if self._reserved + need > cfg.kv_capacity_tokens and self._reserved > 0:
                    break  # no KV room: wait for a request to finish
                self._queue.popleft()
                slot = self._free.pop()
                self._slot_req[slot] = r
                pt = int(self.requests.prompt_tokens[r])
                self._prefill_left[slot] = pt
                self._out_left[slot] = int(self.requests.output_tokens[r])
                self._slot_total[slot] = self._out_left[slot]
                if self._agree_off is not None:
                    self._slot_off[slot] = self._agree_off[r]
                self._ctx[slot] = 0
                self._reserved += need
                self._waiting_prefill -= pt
                self._pending_prefill += pt
                self._prefilling.append(slot)
            slot = self._prefilling[0]
            chunk = min(budget, self._prefill_left[slot])
            self._prefill_left[slot] -= chunk
            self._pending_prefill -= chunk
            self._ctx[slot] += chunk
            self._ctx_total += chunk
            budget -= chunk
            prefill += chunk
            if self._prefill_left[slot] == 0:
                self._prefilling.pop(0)
                del self._prefill_left[slot]
                first_token_slots.append(slot)

        step_ms = self.cost.predict_one(B, k, width, prefill, kv_usage) * self._noise()
        t1 = t0 + step_ms / 1000.0

        # ---- first tokens of prompts finished this step
        for slot in first_token_slots:
            r = int(self._slot_req[slot])
            self.first_token_s[r] = t1
            self._out_left[slot] -= 1
            self._ctx[slot] += 1
            self._ctx_total += 1
            committed += 1
            if self._out_left[slot] <= 0:
                self._finish(slot, t1)
            else:
                newly_decoding.append(slot)
        n_finished = len(first_token_slots) - len(newly_decoding)
        if finished_slots is not None and len(finished_slots):
            for slot in finished_slots.tolist():
                self._finish(slot, t1)
            n_finished += len(finished_slots)
        for slot in newly_decoding:
            self._decoding[slot] = True
            self._n_decoding += 1

        self.t = t1
        self._steps += 1
        self._busy += step_ms / 1000.0
        self._committed += committed
        draft_tokens = drafts * k * width
        self._drafted += draft_tokens
        self._accepted += accepted
        if self.record_steps:
            self._step_ms.append(step_ms)
        return StepOutcome(t0, B, prefill, waiting, kv_usage, k, width, drafts, draft_tokens, accepted, app,
                           step_ms, committed, in_system, n_finished)

    def _finish(self, slot: int, t: float) -> None:
        r = int(self._slot_req[slot])
        self.finish_s[r] = t
        if self._decoding[slot]:
            self._decoding[slot] = False
            self._n_decoding -= 1
        self._ctx_total -= int(self._ctx[slot])
        self._reserved -= int(self.requests.prompt_tokens[r] + self.requests.output_tokens[r])
        self._ctx[slot] = 0
        self._slot_req[slot] = -1
        self._slot_off[slot] = -1
        self._free.append(slot)
        self._completed += 1
        lo, hi = self._released_by[r], self._released_by[r + 1]
        for c in self._released[lo:hi].tolist():  # the closed-loop client sends the next request(s)
            t_c = t + float(self.requests.gap_s[c])
            self.arrival_s[c] = t_c
            heapq.heappush(self._release_q, (t_c, c))

    # ------------------------------------------------------------------ results
    def stats(self) -> SimStats:
        done = np.isfinite(self.finish_s)
        lat = self.finish_s[done] - self.arrival_s[done]
        ttft_m = np.isfinite(self.first_token_s)
        ttft = self.first_token_s[ttft_m] - self.arrival_s[ttft_m]
        return SimStats(self._steps, int(done.sum()), len(self.requests), self.t, self._busy, self._committed,
                        self._drafted, self._accepted, lat, ttft, np.asarray(self._step_ms))

    def run(self, policy, max_steps: int | None = None) -> SimStats:
        """Run to the end with ``policy(state) -> (k, width)``; returns :meth:`stats`."""
        n = 0
        while (state := self.prepare()) is not None:
            k, w = policy(state)
            self.execute(k, w)
            n += 1
            if max_steps is not None and n >= max_steps:
                break
        return self.stats()
