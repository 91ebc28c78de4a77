"""Online calibration: correct the policy's decision table from the steps the engine runs.

A policy trained offline ranks the k's by the cost and acceptance profiles fitted to the
traces it was trained on.  Served on other traffic (other request sizes, another CPU or GPU)
those rankings can be off by a few per cent, the same size as the gaps between neighbouring
k's (``bench/bench_engine.py`` measured 2-3% below the best fixed k on a machine and request
mix the training traces did not match).  :class:`OnlineCalibration` measures, for every batch
size the engine actually runs, the decode rate of the k's next to the policy's choice and
overrides the policy's k wherever the measurements say, with confidence, that another k is
faster.  Elsewhere the policy's table passes through unchanged.

Batch sizes close together share their measurements and their decision: size 1 stands alone,
2..7 go in pairs, larger ones fall into buckets about 25% wide (8-9, 10-12, 13-15, 16-19, 20-23,
24-29, 30-37, ...; :func:`bucket_of`).  A closed loop at concurrency 32 wanders over 26..32 as requests
finish and start; measured and explored one size at a time that is seven hill climbs, each
taking its own exploration steps, where two will do.  Per bucket and k it keeps the *clean*
steps (no prefill tokens in the step, and drafted and verified at the same k: vLLM verifies at
step n+1 the drafts made at the end of step n, so a step is clean when the next step's record
has its k), weighted to forget past ``cap`` steps, and fits them as ``T = alpha_k + beta * b``
with one slope per bucket, so that k's run at different mixes of the bucket's sizes are
compared at the same batch size (``b / T`` grows with b: raw means would favour whichever k
happened to run at the larger sizes).  Acceptance
``a(k)`` (mean accepted tokens per decoding request and step) is pooled over batch sizes, with
exponential forgetting, and comes only from steps that *ran* k.  Two k's acceptances are
compared over the same minutes of traffic (:meth:`OnlineCalibration.aligned_accept`): the rarer
k's own steps against the other's recent acceptance (its last ~32 steps) at the times the rarer
one ran; pooled, an explored k keeps what it saw when it last ran while the k the engine runs
follows today's requests (between two load levels of ``bench_engine``, session 31, that put
k = 2 ahead of k = 1 at batch 4 where it was 5% slower end to end).  Reading a shorter k's
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
more.  For a k *shorter* than the one compared with, a second estimate has almost none of that
noise: the longer k's own steps cut to k drafts (``accept(k0) - cut_loss(k0, k)``) give k's
acceptance on the same steps, requests and positions.  Its bias (above) runs one way, against
the shorter k, so it can show that shortening gains, never that lengthening does; either
estimate clearing the bar decides (:meth:`OnlineCalibration._gains`).  On the tiny pair at
batch 1, k = 3 is 3% faster than the policy's k = 4 end to end: the cut estimate settles that
in a few hundred steps, held acceptance not in the thousands a benchmark gives it.

At batch 1 a third estimate replaces both once it can be made: :class:`Batch1Stream` walks one
chain per k over the same stream of tokens (a step there is one request's, and a greedy
drafter's proposal for a position depends only on the tokens before it), so the k's are compared
on the very same requests and positions, and step times are compared step by step with the
nearest steps of the other k (``pair_window`` records), so that drift in the machine's speed
moves both sides alike (:meth:`OnlineCalibration._stream_gain`).  It needs ``stream_chunks``
chunks of the stream and ``min_context`` positions seen after as many matched drafts as the
longer k reads; only that k's own steps show those, so until then it is explored (up to
``max_steps`` clean steps).  Off for ``ngram`` (``stream=False``): its proposal can depend on
where its step started.

In every bucket step times are paired the same way: each clean step of a k with the latest
unpaired clean steps (up to four, their mean) of each other k at the *same batch size* within
``pair_window`` records, every step in at most one pair per other k, and where a comparison has
``min_steps`` pairs the held and cut estimates take the time ratio from them instead of from each
k's fitted steps.  Fitted steps compare stretches that ran at different times: at batch 16
(``bench/diag_closed_loop.py``) the VM's speed moved ~10% between the stretch that ran off and the
one that ran k = 1, and the fits rated k = 1 14% faster where, step by step, the two tied.

Speculation must beat off by ``min_gain`` (3%, like the policy's ``--min-gain``): a move from off
to k > 0 needs a gain above it (z standard errors up), and after the climb a k > 0 gives way to
off where a fair estimate (held or stream) shows it short of ``min_gain`` (its upper bound, z
standard errors up, below it); while neither is shown, k stays (absence of proof is not a
shortfall: at batch 1 a k = 1 15% ahead of off went off whenever its standard error swelled).
Where the policy says off, off stands (``speculate_over_off=False``, the default): the
calibration compares clean steps, and those do not see what speculating costs a closed loop end
to end.  At concurrency 16 on the AMD VM (session 29) clean steps put k = 1 more than 3% + 2 SE
ahead of off, the calibration ran k = 1 and 2 on every step where the policy said off, and the
engine lost 7% to off end to end; nor are holds of k > 0 explored there.  With
``speculate_over_off=True`` a k > 0 replaces the policy's off once it clears ``min_gain``.
A k longer than the policy's has to clear ``min_gain`` too above batch 1 (``_bar``; a shorter
one only ``margin``): at concurrency 4 the calibration moved batch 2-5 from the policy's k = 1 to
k = 2 on clean steps a few per cent apart, where static k = 2 ran 5% slower end to end.
Clean steps do not show what speculation costs a closed loop on top: at concurrency 16 here k = 1
tied off step for step but lost 8% end to end, its requests drifting out of step (prefills next
to decodes, a drain at the end of each wave) where off kept them in lockstep.

Exploration: in a bucket seen at least ``min_seen`` times, the k's next to the current choice
are run in holds of ``hold`` steps, at most once every ``explore_every`` steps there, until each
has ``min_steps`` clean steps and its acceptance rests on ``min_requests`` decoding requests; measured k's still within noise of the choice are run again, up to
``max_steps`` clean steps, at that pace while they measure faster and only every
``refine_every`` steps while they measure slower (running a slightly slower k a third of the
time costs more than the decision it would buy), and only while ``max_steps`` could decide the
comparison (``resolve``: at batch 1 held acceptance cannot rank k's a few per cent apart in
hundreds of steps, so there only the cut estimate, or a large measured gain, earns refining).
A neighbour found faster becomes the choice and its own neighbours are explored next (hill
climbing in k).  The override needs the measured gain
to exceed ``z`` standard errors and ``margin``; anything less keeps the policy's k, so noise
cannot make the table flap.  The decision climbs the same way (:meth:`OnlineCalibration.choose`:
from the policy's k to the k that beats it most, then on while another beats that one), and an
acceptance counts only once it rests on ``min_requests`` decoding requests (a few dozen batch-1
steps understate their own standard error).

All of it runs when the embedded source is polled, on the engine's thread right after each step
(tens of microseconds per step; ``serving_patch.sources.EmbeddedSource``); the step's own path
still only indexes the table.

    >>> cal = OnlineCalibration(max_k=2, max_num_seqs=4, min_seen=2, min_steps=2, explore_every=1, hold=2)
    >>> cal.table((0, 2, 2, 2, 2))   # nothing measured yet: the policy's table
    (0, 2, 2, 2, 2)
"""

from __future__ import annotations

import math
import random
from typing import Any

__all__ = ["Batch1Stream", "OnlineCalibration", "bucket_of"]

_PAIR_GROUP = 4  # steps of the other k whose mean log time one step is paired with (at most)
_RECENT = 32  # steps of its own a k's recent acceptance remembers
_ALIGN = 64  # records: a k that ran longer ago than this has no recent acceptance to compare with


def bucket_of(b: int, ratio: float = 1.25) -> int:
    """The batch-size bucket that shares measurements and decisions: 1 alone, then pairs (2-3,
    4-5, 6-7), then ~25% wide (8-9, 10-12, 13-15, 16-19, 20-23, 24-29, 30-37, ...).

    >>> [bucket_of(b) for b in (1, 2, 3, 4, 7, 8, 9, 16, 19, 30, 32)]
    [1, 2, 2, 3, 4, 5, 5, 8, 8, 11, 11]
    """
    if b < 8:
        return 1 if b <= 1 else 2 + (b - 2) // 2
    return 1 + math.ceil(math.log(b / 4) / math.log(ratio) - 1e-9)


def _mean_se(sx: float, sxx: float, a: list[float]) -> tuple[float, float]:
    """Mean per request of a quantity x from decayed sums ``sx`` = sum b*x and ``sxx`` = sum b*x^2
    over the steps whose decayed step and request counts are ``a[0]`` and ``a[1]``, and its
    standard error (requests within a step taken as independent)."""
    m = sx / a[1]
    per_request_var = max(sxx - m * m * a[1], 0.0) / a[0]  # E[b (x - m)^2] = var of one request
    return m, math.sqrt(per_request_var / a[1])


class Batch1Stream:
    """Batch-1 acceptance as one token stream, and the steps every k takes over the same tokens.

    At batch size 1 a step's ``accepted_per_pos`` belongs to one request, and with greedy
    drafting the draft's proposal for a position depends only on the tokens before it (the
    target's, once accepted), so the run of steps is a function of one bit per output token:
    ``m_i`` = whether the draft's proposal for position i matches the target's token.  A step
    that verified n drafts and accepted a of them shows ``m = 1`` for a positions, then ``m = 0``
    if a < n; when all n were accepted the next position (the target's bonus token) was never
    proposed and stays unknown.  Unknown positions are drawn once, when they arrive, from the
    stream's own run-length statistics (``P(m = 1 | j known ones before it)``, counted where
    the context is known), and then one chain per k walks the same stream: its step count over
    a stretch of tokens is what k would have taken to write them.  Every k is so compared on
    the very same requests and positions: no between-request noise (what held rates at batch 1
    drown in) and no stretch bias (what a longer k's steps cut to fewer drafts carry).  What
    remains is the imputation at unknown positions (~10% of them), which favours the k that
    ran: its own chain never reads them.

    Per ``chunk`` positions it keeps each k's step count, exponentially forgotten over chunks
    (``decay``), and :meth:`tokens_ratio` gives the ratio of tokens per step of two k's with a
    standard error from the chunks' spread.

        >>> st = Batch1Stream(max_k=2, chunk=4)
        >>> for _ in range(8):
        ...     st.step(2, 1)         # each step: 2 drafts, the first accepted (m = 1, 0)
        >>> st.positions, [round(x, 2) for x in st.steps_per_chunk()]
        (16, [4.0, 2.0, 2.0])
    """

    def __init__(self, max_k: int, chunk: int = 64, decay: float = 0.99, seed: int = 0):
        if max_k < 1 or chunk < 1 or not 0 < decay <= 1:
            raise ValueError(f"need max_k >= 1, chunk >= 1 and decay in (0, 1], got {max_k}, {chunk}, {decay}")
        self.max_k, self.chunk, self.decay = max_k, chunk, decay
        self._rng = random.Random(seed)
        nk = max_k + 1
        self.ones = [0.0] * nk      # m = 1 after j known ones (j capped at max_k), known context only
        self.trials = [0.0] * nk
        self._ctx: int | None = 0   # known ones since the last known 0 (None: an unknown since)
        self._run = 0               # ones, imputed included, before the next position
        self._buf: list[int] = []   # this segment's positions from index self._base on
        self._base = 0
        self._start = [0] * nk      # per k: the segment index its next step starts at
        self._cnt = [0] * nk        # per k: steps completed in the open chunk
        self._in_chunk = 0          # positions in the open chunk
        self.w = 0.0                # decayed chunk count, and per k the sums of steps and products
        self.s = [0.0] * nk
        self.ss = [[0.0] * nk for _ in range(nk)]
        self.chunks = 0
        self.positions = 0

    # ------------------------------------------------------------------ feeding
    def step(self, drafts: int, accepted: int) -> None:
        """One decode step of the one running request: ``drafts`` draft tokens verified,
        ``accepted`` of them accepted (0 drafts: a step without speculation, one unknown)."""
        accepted = max(0, min(accepted, drafts))
        for _ in range(accepted):
            self._push(1)
        self._push(0 if accepted < drafts else None)

    def brk(self) -> None:
        """The end of a stretch of one request's decode steps (a prefill, another batch size, a
        gap): every chain finishes its last step, the next positions start afresh."""
        if not self._buf:
            return
        end = self._base + len(self._buf)
        for k in range(self.max_k + 1):
            self._walk(k, end, final=True)
        self._close_chunk()
        self._buf, self._base = [], 0
        self._start = [0] * (self.max_k + 1)
        self._ctx, self._run = 0, 0

    def _q(self, j: int) -> float:
        """P(m = 1) after j ones: the counted rate at the context, else at the longest counted one below."""
        j = min(j, self.max_k)
        while j > 0 and self.trials[j] < 4:
            j -= 1
        t = self.trials[j]
        return self.ones[j] / t if t >= 4 else 0.5

    def _push(self, x: int | None) -> None:
        ctx = self._ctx
        if x is not None:
            c = min(self._run if ctx is None else ctx, self.max_k)
            self.trials[c] += 1.0
            self.ones[c] += x
        self._ctx = None if x is None else (0 if x == 0 else (None if ctx is None else ctx + 1))
        v = x if x is not None else int(self._rng.random() < self._q(self._run))
        self._run = self._run + 1 if v else 0
        self._buf.append(v)
        self.positions += 1
        self._in_chunk += 1
        end = self._base + len(self._buf)
        for k in range(self.max_k + 1):
            self._walk(k, end, final=False)
        if self._in_chunk >= self.chunk:
            self._close_chunk()
        low = min(self._start)
        if low - self._base > 256:  # drop what every chain has walked past
            del self._buf[:low - self._base]
            self._base = low

    def _walk(self, k: int, end: int, final: bool) -> None:
        s, buf, base = self._start[k], self._buf, self._base
        while s < end:
            j = 0
            while j < k and s + j < end and buf[s + j - base]:
                j += 1
            if j < k and s + j >= end:  # the step's drafts run past what arrived
                if final:
                    self._cnt[k] += 1
                    s = end
                break
            self._cnt[k] += 1
            s += j + 1
        self._start[k] = s

    def _close_chunk(self) -> None:
        if not self._in_chunk:
            return
        d, cnt = self.decay, self._cnt
        self.w = self.w * d + 1.0
        for a in range(self.max_k + 1):
            self.s[a] = self.s[a] * d + cnt[a]
            row = self.ss[a]
            for b in range(self.max_k + 1):
                row[b] = row[b] * d + cnt[a] * cnt[b]
        for j in range(self.max_k + 1):
            self.ones[j] *= d
            self.trials[j] *= d
        self._cnt = [0] * (self.max_k + 1)
        self._in_chunk = 0
        self.chunks += 1

    # ------------------------------------------------------------------ estimates
    def stats(self) -> dict[str, Any]:
        """Positions walked and, per k, the tokens per step it would take over them (None before
        two chunks)."""
        tps = [None if self.chunks < 2 or x <= 0 else round(self.s[0] / x, 4) for x in self.s]
        return {"positions": self.positions, "chunks": self.chunks, "tokens_per_step": tps}

    def steps_per_chunk(self) -> list[float]:
        """Each k's mean steps per (closed) chunk."""
        return [x / self.w if self.w else 0.0 for x in self.s]

    def context_trials(self, j: int) -> float:
        """Positions counted after j or more ones (forgotten as the chunks are)."""
        return sum(self.trials[min(j, self.max_k):])

    def tokens_ratio(self, k: int, base: int) -> tuple[float, float] | None:
        """(tokens per step at k / at ``base``, its standard error) over the same positions:
        the ratio of ``base``'s steps to k's; None before two chunks."""
        if self.chunks < 2 or self.s[k] <= 0 or self.s[base] <= 0:
            return None
        r = self.s[base] / self.s[k]
        # delta method over chunks: var(sum b - r sum k) / (sum k)^2, from the decayed sums
        resid = self.ss[base][base] - 2.0 * r * self.ss[base][k] + r * r * self.ss[k][k]
        n = self.w
        var = max(resid, 0.0) / (self.s[k] ** 2) * (n / max(n - 1.0, 1.0))
        return r, math.sqrt(var)


class OnlineCalibration:
    """Measured decode rates per (batch-size bucket, k) that override a policy's table (module docstring)."""

    def __init__(self, max_k: int, max_num_seqs: int, *, min_seen: int = 24,
                 min_steps: int = 12, max_steps: int = 128, hold: int = 6, explore_every: int = 12,
                 refine_every: int = 60, z: float = 2.0, margin: float = 0.005, resolve: float = 0.04,
                 min_requests: int = 64, cap: int = 256, accept_decay: float = 0.998,
                 stream: bool = True, stream_chunks: int = 8, min_context: int = 32, pair_window: int = 16,
                 min_gain: float = 0.03, speculate_over_off: bool = False):
        if max_k < 1 or max_num_seqs < 1:
            raise ValueError(f"need max_k >= 1 and max_num_seqs >= 1, got {max_k} and {max_num_seqs}")
        if not (1 <= min_steps <= max_steps <= cap) or hold < 2 or explore_every < 1 or min_seen < 1:
            raise ValueError("need 1 <= min_steps <= max_steps <= cap, hold >= 2 (one step of a hold verifies the "
                             "previous k), explore_every >= 1 and min_seen >= 1")
        if refine_every < explore_every:
            raise ValueError(f"refine_every ({refine_every}) must be >= explore_every ({explore_every}): "
                             "a contender within noise is re-run more rarely than an untried neighbour")
        if not 0 < accept_decay <= 1:
            raise ValueError(f"accept_decay must be in (0, 1], got {accept_decay}")
        if not resolve > 0:
            raise ValueError(f"resolve must be > 0 (the gain max_steps must be able to tell apart), got {resolve}")
        if min_requests < 1:
            raise ValueError(f"min_requests must be >= 1 (decoding requests before an acceptance counts), "
                             f"got {min_requests}")
        if not 0 <= min_gain < 1:
            raise ValueError(f"min_gain must be in [0, 1) (the gain speculation must show over off, and a k "
                             f"longer than the policy's over it), "
                             f"got {min_gain}")
        if stream_chunks < 2 or min_context < 1 or pair_window < 1:
            raise ValueError(f"need stream_chunks >= 2, min_context >= 1 and pair_window >= 1 (batch-1 stream), "
                             f"got {stream_chunks}, {min_context} and {pair_window}")
        self.max_k, self.max_num_seqs = max_k, max_num_seqs
        self.min_seen, self.min_steps, self.max_steps, self.hold = min_seen, min_steps, max_steps, hold
        self.explore_every, self.refine_every = explore_every, refine_every
        self.z, self.margin, self.resolve, self.cap, self.decay = z, margin, resolve, cap, accept_decay
        self.min_requests, self.min_gain = min_requests, max(min_gain, margin)
        self.speculate_over_off = speculate_over_off
        nb, nk = max_num_seqs + 1, max_k + 1
        self.bucket = [bucket_of(b) if b else 0 for b in range(nb)]
        self.nbuckets = self.bucket[-1] + 1
        self.members: list[list[int]] = [[] for _ in range(self.nbuckets)]
        for b in range(1, nb):
            self.members[self.bucket[b]].append(b)
        # per bucket and k, the decisions' evidence: clean steps (capped count) and exponentially
        # weighted sums [w, w^2, b, T, b^2, bT, T^2] for a fit T = alpha_k + beta * b within the bucket
        self.cn = [[0] * nk for _ in range(self.nbuckets)]
        self.sums = [[[0.0] * 7 for _ in range(nk)] for _ in range(self.nbuckets)]
        self._wdecay = 1.0 - 1.0 / cap
        self.seen = [0] * self.nbuckets               # steps in the bucket, any k
        self.since = [0] * self.nbuckets              # steps there since the last exploration
        # per k, decayed sums over the steps that ran it: steps, requests (b), b*x and b*x^2 with x
        # the step's accepted tokens per request
        self.acc = [[0.0, 0.0, 0.0, 0.0] for _ in range(nk)]
        # per k and j < k, decayed sums over k's steps of b*d and b*d^2 with d the step's tokens per
        # request accepted at positions j..k-1: what truncating k's steps to j drafts loses
        self.cut = [[[0.0, 0.0] for _ in range(k)] for k in range(nk)]
        # per k, a short memory of its acceptance (decayed sums b, b*x over its last ~_RECENT steps)
        # and the record of its last step; per k and j, decayed (at k's steps, like acc) sums of b
        # and b * (j's recent acceptance) over k's steps where j ran within _ALIGN records: j's
        # acceptance on the traffic of k's minutes (:meth:`aligned_accept`)
        self.recent = [[0.0, 0.0, -(10 ** 9), 0] for _ in range(nk)]  # + its own steps so far
        # xacc[k][j]: + the decayed count of j's steps behind those readings (each counted once,
        # at most _RECENT per reading) and j's step count at the last reading
        self.xacc = [[[0.0, 0.0, 0.0, 0] for _ in range(nk)] for _ in range(nk)]
        self._pending: dict | None = None             # the last record: clean or not, the next one tells
        self._explore: list | None = None             # [bucket, k, verifying steps left, steps left]
        self._override: dict[int, int] = {}           # bucket -> k where measurements overrule the policy
        self._capped: set[int] = set()                # buckets of _override only capped by a smaller one (table())
        self._prior: tuple[int, ...] = ()
        self._dirty = True
        self.urgent = False                           # an exploration hold ended: decide now (a source's cue)
        self._touched: set[int] = set()               # buckets with new clean steps
        self._full_at = 0
        self._steps_at = [0] * nb                     # clean steps per batch size, any k (uncapped)
        self._busiest = [m[0] if m else 0 for m in self.members]  # per bucket: the size with most of them
        self._decided: dict[int, int] = {}            # bucket -> the policy's k its decision was made for
        # batch 1: the acceptance stream (every k's steps over the same tokens); every bucket:
        # clean step times paired with the nearest other k's at the same batch size (per bucket
        # and pair of k's, decayed n, sum d, sum d^2 of d = log T_i - log T_j, and the pairs counted)
        self.stream = Batch1Stream(max_k) if stream else None
        self.stream_chunks, self.min_context, self.pair_window = stream_chunks, min_context, pair_window
        self._unpaired: list[list[list[tuple[int, float]]]] = [[[] for _ in range(nk)] for _ in range(nb)]
        self.tpair = [[[[0.0, 0.0, 0.0, 0] for _ in range(nk)] for _ in range(nk)] for _ in range(self.nbuckets)]
        self.records = self.clean = self.explorations = self.explore_steps = 0

    def resume(self) -> None:
        """Forget the step in flight and any exploration: the steps in between were not this policy's."""
        if self._explore is not None:
            self.since[self._explore[0]] = 0
        self._pending = self._explore = None
        self._dirty = True
        if self.stream is not None:
            self.stream.brk()
        self._unpaired = [[[] for _ in range(self.max_k + 1)] for _ in range(self.max_num_seqs + 1)]

    # ------------------------------------------------------------------ measurements
    def observe(self, rec: dict[str, Any]) -> None:
        """Fold in one finished step's ``spec-trace/1`` fields (in step order)."""
        self.records += 1
        b, k = int(rec["batch_size"]), min(int(rec["k"]), self.max_k)
        prev, self._pending = self._pending, rec
        if prev is not None and min(int(prev["k"]), self.max_k) == k:
            self._add_time(prev)
        g = self.bucket[b] if 0 < b <= self.max_num_seqs else -1
        if g > 0:
            self.seen[g] += 1
            self.since[g] += 1
        per_pos = rec.get("accepted_per_pos") or ()
        self._add_accept(b, k, per_pos)
        if self.stream is not None:
            if b == 1 and not rec.get("prefill_tokens", 0):
                n = int(rec.get("draft_tokens", len(per_pos) if rec.get("drafts", 1) else 0)) if k else 0
                self.stream.step(n, int(sum(per_pos[:n])) if n else 0)
            else:
                self.stream.brk()
        ex = self._explore
        if ex is not None:
            ex[3] -= 1
            if g == ex[0] and k == ex[1]:
                ex[2] -= 1
                self.explore_steps += 1
            if ex[2] <= 0 or ex[3] <= 0:
                self.since[ex[0]] = 0
                self._explore = None
                self.urgent = True  # the held k leaves the table at the next decision, not steps later
        self._dirty = True

    def _add_time(self, rec: dict) -> None:
        b, k, ms = int(rec["batch_size"]), min(int(rec["k"]), self.max_k), float(rec["step_ms"])
        if not 0 < b <= self.max_num_seqs or rec.get("prefill_tokens", 0) or not ms > 0:
            return
        self.clean += 1
        g = self.bucket[b]
        self._touched.add(g)
        self._steps_at[b] += 1
        if self._steps_at[b] > self._steps_at[self._busiest[g]]:
            self._busiest[g] = b
        self.cn[g][k] = min(self.cn[g][k] + 1, self.cap)
        s, dec = self.sums[g][k], self._wdecay
        s[0] = s[0] * dec + 1.0
        s[1] = s[1] * dec * dec + 1.0
        s[2] = s[2] * dec + b
        s[3] = s[3] * dec + ms
        s[4] = s[4] * dec + b * b
        s[5] = s[5] * dec + b * ms
        s[6] = s[6] * dec + ms * ms
        self._pair_time(g, b, k, ms)

    def _pair_time(self, g: int, b: int, k: int, ms: float) -> None:
        """A clean step of k at batch size b paired with the latest (up to ``_PAIR_GROUP``) clean
        steps of each other k at the same batch size within ``pair_window`` records that no step
        has been paired with yet (their mean log time): step time compared step by step, so a
        machine that speeds up or slows down over minutes (30% within a benchmark run here; ~10%
        between the stretches that ran k = 0 and k = 1 at batch 16 in bench/diag_closed_loop.py)
        moves both sides alike.  Each step enters at most one pair per other k, so the pairs'
        spread is an honest standard error (a step reused for a whole hold's pairs would carry its
        own noise into all of them), and the side that runs all the time lends several steps to
        each of the explored k's, so a pair's noise is ~(1 + 1/4) of one step's variance, not 2.
        A step that found no partner waits for one."""
        lt, now, dec, open_b = math.log(ms), self.records, self._wdecay, self._unpaired[b]
        pairs, paired = self.tpair[g], False
        for j, waiting in enumerate(open_b):
            if j == k or not waiting:
                continue
            while waiting and now - waiting[0][0] > self.pair_window:
                waiting.pop(0)
            if not waiting:
                continue
            take = waiting[-_PAIR_GROUP:]
            del waiting[-_PAIR_GROUP:]
            d = lt - sum(x[1] for x in take) / len(take)
            paired = True
            for a, c, x in ((k, j, d), (j, k, -d)):
                p = pairs[a][c]
                p[0] = p[0] * dec + 1.0
                p[1] = p[1] * dec + x
                p[2] = p[2] * dec + x * x
                p[3] = min(p[3] + 1, self.cap)
        if not paired:
            mine = open_b[k]
            mine.append((now, lt))
            if len(mine) > self.pair_window:
                mine.pop(0)

    def time_ratio(self, k: int, base: int, g: int = 1) -> tuple[float, float] | None:
        """(mean log step time of k minus ``base``'s in bucket g, paired step by step at the same
        batch size, and its standard error), or None before ``min_steps`` pairs."""
        n, sd, sdd, count = self.tpair[g][k][base]
        if count < self.min_steps or self.cn[g][k] < self.min_steps or self.cn[g][base] < self.min_steps:
            return None
        m = sd / n
        return m, math.sqrt(max(sdd / n - m * m, 0.0) / max(n - 1.0, 1.0))

    def _context_short(self, k: int, base: int) -> bool:
        """Whether the batch-1 stream lacks ``min_context`` known positions after the run of ones
        that the longer of k and ``base`` reads last (only that k's own steps show them)."""
        return self.stream is not None and self.stream.context_trials(max(k, base) - 1) < self.min_context

    def _stream_gain(self, k: int, base: int) -> tuple[float, float] | None:
        """k's gain in rate over ``base`` at batch 1 from the acceptance stream (tokens per step of
        both on the same tokens, :class:`Batch1Stream`) and the paired step times, with its
        standard error; None until the stream has ``stream_chunks`` chunks and ``min_context``
        known positions at the longest run either k reads, and ``min_steps`` time pairs."""
        st = self.stream
        if st is None or st.chunks < self.stream_chunks:
            return None
        if max(k, base) and self._context_short(k, base):
            return None
        t = self.time_ratio(k, base)
        r = st.tokens_ratio(k, base) if t is not None else None
        if r is None:
            return None
        g = r[0] * math.exp(-t[0])
        return g - 1.0, g * math.hypot(r[1] / r[0], t[1])

    def _add_accept(self, b: int, k: int, per_pos) -> None:
        # forgetting per k, at that k's own steps: a k the engine runs rarely (explored) keeps
        # its evidence, the one it runs follows drift over its last ~1/(1 - decay) steps
        if b <= 0 or k <= 0:
            return
        per_pos = [float(v) for v in per_pos[:k]]
        x = sum(per_pos) / b
        a, dec = self.acc[k], self.decay
        a[0] = a[0] * dec + 1.0
        a[1] = a[1] * dec + b
        a[2] = a[2] * dec + b * x
        a[3] = a[3] * dec + b * x * x
        now, rdec = self.records, 1.0 - 1.0 / _RECENT
        xk = self.xacc[k]
        for j in range(1, self.max_k + 1):
            r = self.recent[j]
            if j != k and now - r[2] <= _ALIGN and r[0] > 0:
                xa = xk[j]
                xa[0] = xa[0] * dec + b
                xa[1] = xa[1] * dec + b * r[1] / r[0]
                xa[2] = xa[2] * dec + min(r[3] - xa[3], _RECENT)
                xa[3] = r[3]
        r = self.recent[k]
        r[0], r[1], r[2], r[3] = r[0] * rdec + b, r[1] * rdec + b * x, now, r[3] + 1
        tail = 0.0
        cut = self.cut[k]
        for j in range(k - 1, 0, -1):  # positions j..k-1, longest cut last
            tail += per_pos[j] if j < len(per_pos) else 0.0
            d = tail / b
            c = cut[j]
            c[0] = c[0] * dec + b * d
            c[1] = c[1] * dec + b * d * d

    def accept(self, k: int) -> float | None:
        """Mean accepted tokens per decoding request and step at k (None: not measured)."""
        if k == 0:
            return 0.0
        a = self.acc[k]
        return a[2] / a[1] if a[1] > 0 else None

    def aligned_accept(self, k: int, base: int) -> tuple[float, float, float, float] | None:
        """Acceptance of k and ``base`` on the same minutes of traffic, with standard errors:
        ``(a_k, a_base, se_k, se_base)``, or None while the rarer one's steps have not seen the
        other run nearby for ``min_requests`` decoding requests.

        The rarer of the two (fewer decayed requests: an explored k) is read off its own steps
        (:meth:`accept`), the other as its recent acceptance (its last ~32 steps) at the times the
        rarer one ran (``xacc``).  Acceptance pooled over each k's own steps compares traffic of
        different times: the k the engine runs follows today's requests, one run in rare holds
        keeps what it saw when it last ran.  Between two load levels of ``bench_engine``
        (concurrency 1, then 4, session 31) k = 1's pooled acceptance moved from 0.30 to 0.59
        tokens per request while k = 2's stayed at 0.47-0.49, below k = 1's (impossible on the
        same tokens); in another run the drift went the other way and the calibration chose k = 2
        at batch 4, 5% slower than k = 1 end to end.  With off on either side there is nothing to
        align (off accepts nothing)."""
        if k == 0 or base == 0:
            a = self.accept(k or base)
            if a is None:
                return None
            se = self.accept_se(k or base)
            return (a, 0.0, se, 0.0) if k else (0.0, a, 0.0, se)
        rare, other = (k, base) if self.acc[k][1] <= self.acc[base][1] else (base, k)
        xa = self.xacc[rare][other]
        ar = self.accept(rare)
        if ar is None or xa[0] < self.min_requests:
            return None
        ao = xa[1] / xa[0]
        # the other's standard error over the steps its readings rest on (xa[2]), not over all its
        # steps: a hold's readings share one recent stretch, and a few dozen holds see a few
        # hundred of its steps (with its pooled standard error, 2% gaps were called 15% of the time)
        sr = self.accept_se(rare)
        so = self.accept_se(other) * math.sqrt(max(self.acc[other][0] / max(xa[2], 1.0), 1.0))
        return (ar, ao, sr, so) if rare == k else (ao, ar, so, sr)

    def accept_se(self, k: int) -> float:
        """Standard error of :meth:`accept` (requests within a step taken as independent)."""
        a = self.acc[k]
        if k == 0 or a[0] < 2:
            return 0.0 if k == 0 else math.inf
        return _mean_se(a[2], a[3], a)[1]

    def cut_loss(self, k: int, j: int) -> tuple[float, float] | None:
        """(mean, standard error) of the tokens per request and step that k's steps accepted at
        positions j..k-1: ``accept(k) - cut_loss(k, j)`` is the acceptance of k's steps cut to j
        drafts, measured on the same steps as ``accept(k)`` (None: k has fewer than 2 steps)."""
        a = self.acc[k]
        if not 0 < j < k or a[0] < 2:
            return None
        c = self.cut[k][j]
        return _mean_se(c[0], c[1], a)

    def _fit(self, g: int) -> tuple[float, float, float]:
        """The bucket's common slope of step ms in b (its variance) and the reference batch size.

        Within a bucket each k's clean steps are fitted as ``T = alpha_k + beta * b`` with one
        ``beta`` (least squares within k): the k's are then compared at the same batch size even
        when they ran at different mixes of the bucket's sizes."""
        sxx = sxy = res = dof = w_all = b_all = 0.0
        for s in self.sums[g]:
            w = s[0]
            if w <= 1.0:
                continue
            sxx += s[4] - s[2] * s[2] / w
            sxy += s[5] - s[2] * s[3] / w
            w_all += w
            b_all += s[2]
        if w_all <= 0:
            return 0.0, 0.0, 0.0
        beta = sxy / sxx if sxx > 1e-9 else 0.0
        for s in self.sums[g]:
            w = s[0]
            if w <= 1.0:
                continue
            syy = s[6] - s[3] * s[3] / w
            res += max(syy - 2 * beta * (s[5] - s[2] * s[3] / w) + beta * beta * (s[4] - s[2] * s[2] / w), 0.0)
            dof += w - 1.0
        var_beta = (res / max(dof - 1.0, 1.0)) / sxx if sxx > 1e-9 else 0.0
        return beta, var_beta, b_all / w_all

    def _time(self, g: int, k: int, fit: tuple[float, float, float]) -> tuple[float, float] | None:
        """(step ms of k in bucket g at the bucket's mean batch size, its relative standard error),
        or None while k has fewer than ``min_steps`` clean steps there."""
        if self.cn[g][k] < self.min_steps:
            return None
        beta, var_beta, bref = fit
        w, w2, sb, sT, sbb, sbT, sTT = self.sums[g][k]
        mb, mT = sb / w, sT / w
        T = mT + beta * (bref - mb)
        if not T > 0:
            return None
        # residual variance of this k's steps about the fit; the mean's from the weights' spread
        rss = max((sTT - sT * mT) - 2 * beta * (sbT - sb * mT) + beta * beta * (sbb - sb * mb), 0.0)
        var_T = rss / max(w - 1.0, 1.0) * (w2 / (w * w)) + (bref - mb) ** 2 * var_beta
        return T, math.sqrt(var_T) / T

    def rate(self, g: int, k: int, fit: tuple[float, float, float] | None = None) -> tuple[float, float] | None:
        """(committed tokens per ms, its relative standard error) of k in bucket g, at the bucket's
        mean batch size, or None while k has fewer than ``min_steps`` clean steps there."""
        a = self.accept(k)
        fit = fit if fit is not None else self._fit(g)
        t = self._time(g, k, fit) if a is not None else None
        if t is None:
            return None
        return fit[2] * (1.0 + a) / t[0], math.hypot(t[1], self.accept_se(k) / (1.0 + a))

    def _ref(self, g: int, base: int, fit) -> tuple:
        """What :meth:`_gains` needs of ``base`` in bucket g (its rate, step time and acceptance),
        computed once for all the contenders compared with it; rate and acceptance None while
        ``base``'s acceptance is not :meth:`_trusted` (then neither estimate can be made)."""
        trusted = self._trusted(base)
        return (self.rate(g, base, fit) if trusted else None, self._time(g, base, fit),
                self.accept(base) if trusted else None)

    def _trusted(self, k: int) -> bool:
        """Whether k's acceptance (held, and cut from its steps) rests on enough decoding requests
        (``min_requests``) for its standard error to mean something.  A few dozen batch-1 steps
        do not: a step accepts 0..k, mostly 0 at the later positions, and the sample's own
        spread understates the error.  In a simulated batch-1 run a lucky dozen steps measured
        k = 2 30% faster than k = 3 at two of its standard errors (5% slower in truth), and 34
        steps of k = 4 cut to 2 drafts measured k = 2 7% faster than k = 4 (2.5% slower)."""
        return k == 0 or self.acc[k][1] >= self.min_requests

    def _gains(self, g: int, k: int, base: int, fit, ref: tuple) -> tuple[tuple[float, float] | None, ...]:
        """Estimates of k's gain in rate over ``base`` in bucket g, (held, cut, stream), each
        (gain, standard error) or None where it cannot be made.

        At batch 1, once the acceptance stream can compare the two (:meth:`_stream_gain`), it is
        the only estimate: both k's counted on the same tokens, with step times paired step by
        step, it decides in hundreds of steps gaps that held acceptance leaves within noise for
        thousands and that the cut one reads with its bias.

        The held one compares each k's own steps, their acceptance taken over the same minutes of
        traffic (:meth:`aligned_accept`).  For a shorter k there is also the *cut* one:
        ``base``'s steps cut to k drafts give k's acceptance on the very same steps, so the
        difference carries none of the acceptance noise between requests and positions (at batch
        1 a step accepts 0..k, and held estimates need thousands of steps to rank k's a few per
        cent apart).  Cut acceptance is biased low (a long k's steps start in hard stretches
        more often; module docstring: 8-10% at k = 1 from k = 4), so it can only understate
        what shortening gains: it may call a shorter k faster, never a longer one."""
        if g == 1 and (st := self._stream_gain(k, base)) is not None:
            return None, None, st
        held = cut = None
        r0, t0, a0 = ref
        # base's step time over k's (ratio, relative standard error): paired step by step where
        # min_steps pairs exist, so that drift between the stretches that ran each k cancels;
        # else from each k's own fitted steps
        tp = self.time_ratio(k, base, g)
        if tp is not None:
            tr = (math.exp(-tp[0]), tp[1])
        elif t0 is not None and (t := self._time(g, k, fit)) is not None:
            tr = (t0[0] / t[0], math.hypot(t[1], t0[1]))
        else:
            return None, None, None
        if r0 is not None and self._trusted(k) and (al := self.aligned_accept(k, base)) is not None:
            a, ab, sk, sb = al
            held = ((1.0 + a) / (1.0 + ab) * tr[0] - 1.0, math.hypot(tr[1], sk / (1.0 + a), sb / (1.0 + ab)))
        if 0 < k < base and a0 is not None and (loss := self.cut_loss(base, k)) is not None:
            a = a0 - loss[0]
            cut = ((1.0 + a) / (1.0 + a0) * tr[0] - 1.0, math.hypot(tr[1], loss[1] / (1.0 + a)))
        return held, cut, None

    # ------------------------------------------------------------------ decisions
    def _beats(self, gain: float, se: float, bar: float | None = None) -> bool:
        """Whether a gain clears the bar (``margin`` unless given) by more than noise: above it,
        and above zero by z standard errors."""
        return gain > (self.margin if bar is None else bar) and gain > self.z * se

    def _could_beat(self, gain: float, se: float, bar: float | None = None) -> bool:
        """Whether a gain may still turn out to clear the bar (its upper bound, z standard errors
        up, does): refining a k that cannot is spending steps on a decision already made."""
        return gain + self.z * se > (self.margin if bar is None else bar)

    def _bar(self, k: int, base: int, g: int, prior_k: int) -> float:
        """The gain k must show over ``base`` to replace it: ``min_gain`` for speculating where
        ``base`` is off, and for a k longer than the policy's (``prior_k``) above batch 1; else
        ``margin``.

        Clean steps measure a longer k's step time and acceptance, not what it costs the batch
        around them: above batch 1 the requests of a batch fall out of step (one drafts while
        another prefills or drains) and a longer k leaves longer drains, which no clean step
        sees.  At concurrency 4 the calibration moved batch 2-5 from the policy's k = 1 to k = 2
        on clean steps a few per cent apart, and static k = 2 ran 5% slower than k = 1 end to end
        (85.1 vs 89.6 tok/s; learned 0.970 [0.960, 0.981] of k = 1, session 31).  So a longer k
        must clear the same bar as speculating over off.  Batch 1 is exempt: one request, nothing
        to fall out of step with, and its stream estimate reads the whole step."""
        if base == 0 and k > 0:
            return self.min_gain
        if g > 1 and k > prior_k:
            return self.min_gain
        return self.margin

    def _holds_over_off(self, g: int, k: int, fit) -> bool | None:
        """Whether k > 0 beats off in bucket g by ``min_gain``: True where some estimate clears
        it, False where it is shown to fall short (a fair estimate's upper bound, z standard
        errors up, below it; the cut estimate understates k, so it cannot show that), None while
        neither is shown: k stands.  Absence of proof is not proof of a shortfall: at batch 1 on a
        noisy VM k = 1 ran ~15% ahead of off with a standard error that kept it from *clearing*
        3% + 2 SE, and giving way to off there cost 5-10% for a thousand steps at a time
        (bench_engine, concurrency 1, session 29)."""
        ref = self._ref(g, 0, fit)
        if ref[1] is None:
            return None
        held, cut, stream = self._gains(g, k, 0, fit, ref)
        if any(self._beats(*e, self.min_gain) for e in (held, cut, stream) if e is not None):
            return True
        fair = [e for e in (held, stream) if e is not None]
        if fair and not any(self._could_beat(*e, self.min_gain) for e in fair):
            return False
        return None

    def _resolvable(self, gain: float, se: float, n: int) -> bool:
        """Whether refining to ``max_steps`` clean steps can decide a gain: its standard error,
        shrunk as 1/sqrt(steps) from ``n`` to ``max_steps``, times z, is within ``resolve`` (or
        within the gain measured so far, when that is larger).  At batch 1 a held estimate cannot:
        a step accepts 0..k tokens, and after 128 steps a rate still has ~5% standard error, so
        k's a few per cent apart stay within noise however long they are refined; each refining
        hold there runs a k that is most likely slower (bench_engine, concurrency 1: holds on k = 2
        and 4 next to k = 3 took 10-20% of the steps, each 1-4% slower).  The policy's k stands."""
        return self.z * se * math.sqrt(n / self.max_steps) <= max(self.resolve, gain)

    def choose(self, g: int, prior_k: int) -> int:
        """The calibrated k in bucket g: from the policy's k, step to the k whose gain over the
        current one is the largest of those that beat it (by any estimate, :meth:`_gains`), and
        again from there while some k beats the new one; the policy's k where none does.

        Each step compares with the k it stands on, not with the policy's: once the policy's k
        has lost, its own steps stop (exploration goes next to the current k), and ranking the
        others by their gains over it would read the order of the two best off its noise
        (batch 4, k = 1 2% faster than k = 2, both far ahead of the policy's k = 3: k = 1 vs 2
        is decided on their own steps, k = 1 vs 3 and 2 vs 3 are within k = 3's noise of each
        other)."""
        if prior_k == 0 and not self.speculate_over_off:
            return 0  # the policy's off stands (module docstring: what clean steps cannot see)
        fit = self._fit(g)
        cur, seen = prior_k, {prior_k}
        for _ in range(self.max_k + 1):
            ref = self._ref(g, cur, fit)
            if ref[1] is None:
                break
            best, best_gain = cur, 0.0
            for k in range(self.max_k + 1):
                if k in seen:
                    continue
                bar = self._bar(k, cur, g, prior_k)
                won = [e[0] for e in self._gains(g, k, cur, fit, ref) if e is not None and self._beats(*e, bar)]
                if won and max(won) > best_gain:
                    best, best_gain = k, max(won)
            if best == cur:
                break
            cur = best
            seen.add(cur)
        # a k > 0 gives way to off once shown short of min_gain, not merely for lack of proof
        # (_holds_over_off); from the policy's off, the climb (speculate_over_off) had to clear it
        if cur > 0 and self.min_gain > self.margin and self._holds_over_off(g, cur, fit) is False:
            return 0
        return cur

    def _to_explore(self, g: int, cur: int, prior_k: int) -> int | None:
        """The k to explore next in bucket g (fewest clean steps first), or None.

        Untried neighbours of the current k, and measured k's within noise of it that measure
        faster so far, are due every ``explore_every`` steps; k's within noise that measure slower
        only every ``refine_every`` (each hold costs little, but deciding a gap of a per cent
        takes many holds, and those would otherwise take a third of the bucket's steps), and
        only while they could still beat it and refining them to ``max_steps`` could tell
        (:meth:`_resolvable`).  ``max_steps`` counts the comparison's step-time pairs once it has
        ``min_steps`` of them (a k may have run long stretches as the choice, far from the current
        k's steps), else k's clean steps.  Next to off, a k > 0 has to clear ``min_gain``, not
        ``margin``, and off is not refined next to a k > 0 once that comparison is decided either way
        (:meth:`_holds_over_off`)."""
        if self.cn[g][cur] < self.min_steps:
            return None  # the choice itself is not measured yet: nothing to compare with
        fit = self._fit(g)
        ref = self._ref(g, cur, fit)
        pick, pick_n = None, None
        for k in range(self.max_k + 1):
            if k == cur:
                continue
            n = self.cn[g][k]
            # the evidence the comparison rests on: its step-time pairs once there are min_steps
            # (k may have run long stretches as the choice, far from cur's steps), else k's steps
            npair = self.tpair[g][k][cur][3]
            m = npair if npair >= self.min_steps else n
            if abs(k - cur) == 1 and n < self.min_steps:
                want = True
            elif abs(k - cur) == 1 and n < self.max_steps and not self._trusted(k):
                want = True  # its acceptance rests on too few requests for any estimate (min_requests)
            elif g == 1 and abs(k - cur) == 1 and n < self.max_steps and self._context_short(k, cur):
                want = True  # the stream needs the longer one's last position seen (its own steps)
            elif (g == 1 and abs(k - cur) == 1 and n < self.max_steps and self.stream is not None
                  and self.tpair[1][k][cur][3] < self.min_steps):
                want = True  # and min_steps step-time pairs (a step enters one pair per other k)
            elif k == 0 and cur > 0 and self.min_gain > self.margin and self._holds_over_off(g, cur, fit) is not None:
                want = False  # k > 0 vs off is decided (shown clear of min_gain or short of it: choose())
            elif n >= self.min_steps and m < self.max_steps:
                held, cut, stream = self._gains(g, k, cur, fit, ref)
                est = [e for e in (held, cut, stream) if e is not None]
                fair = held or stream  # the estimate that may say k loses (cut's bias runs against k)
                bar = self._bar(k, cur, g, prior_k)
                # within noise: no estimate says k wins and the fair one does not say it loses;
                # and some estimate still lets it win; refined at the quick pace while it measures
                # ahead (of off: by the bar)
                want = (bool(est) and not any(self._beats(*e, bar) for e in est)
                        and not (fair is not None and self._beats(-fair[0], fair[1]))
                        and any(self._could_beat(*e, bar) and self._resolvable(*e, m) for e in est)
                        and (max(e[0] for e in est) > (0.0 if bar == self.margin else bar)
                             or self.since[g] >= self.refine_every))
            else:
                want = False
            if want and (pick_n is None or n < pick_n):
                pick, pick_n = k, n
        return pick

    def _prior_of(self, g: int, prior: tuple[int, ...]) -> int:
        """The policy's k for bucket g: its k at the bucket's busiest batch size (by clean steps)."""
        b = self._busiest[g]
        if b >= len(prior):
            b = max(m for m in self.members[g] if m < len(prior))
        return min(prior[b], self.max_k)

    def table(self, prior) -> tuple[int, ...]:
        """The policy's k per batch size (``prior[b]``) with the measured overrides and any exploration.

        Where the calibration shortens the policy's k in a bucket, the policy's k at every larger
        batch size is capped there too until that bucket's own measurements say otherwise: at a
        given acceptance a longer k costs more at a larger batch (more tokens to verify) and gains
        the same per request, so a k too long at batch b is too long above it.  The buckets a
        load level only passes through need it most: at concurrency 4 each run ended with ~4
        steps at batch 2-3 where the policy said k = 2 (high acceptance), too few for that
        bucket's own comparison, while batch 1 had measured k = 1 over the policy's k = 3 and
        batch 4 ran k = 1 (learned 0.984 [0.976, 0.991] of static k = 1, session 31)."""
        prior = tuple(prior)
        self.urgent = False
        if self._dirty or prior != self._prior:
            # decide again the buckets with new clean steps or whose policy k moved, and all of
            # them every 16 records (the pooled acceptance moves): tens of microseconds per step
            # on the refresher, though the policy's table changes at most steps
            full = self.records - self._full_at >= 16
            self._prior, self._dirty = prior, False
            top = self._top(prior)
            if full:
                self._full_at = self.records
            touched, self._touched = self._touched, set()
            ov, decided = self._override, self._decided
            # a k shortened in a bucket (measured there, below the policy's k) caps the policy's k
            # at every larger batch size where nothing was measured against it (docstring)
            cap = self.max_k
            for g in range(1, top):
                p0 = self._prior_of(g, prior)
                p = min(p0, cap)
                if full or g in touched or decided.get(g) != p:
                    decided[g] = p
                    k = p
                    if self.seen[g] >= self.min_seen or any(self.cn[g]):
                        k = self.choose(g, p)
                    if k != p0:
                        ov[g] = k
                    else:
                        ov.pop(g, None)
                    if k == p < p0:
                        self._capped.add(g)
                    else:
                        self._capped.discard(g)
                k = ov.get(g, p0)
                if k < p0:
                    cap = min(cap, k)
            if self._explore is None:
                self._start_exploring(prior, top, None if full else touched)
        if not self._override and self._explore is None:
            return prior
        out = list(prior)
        n = len(out)
        for g, k in self._override.items():
            for b in self.members[g]:
                if b < n:
                    out[b] = k
        if self._explore is not None:
            for b in self.members[self._explore[0]]:
                if b < n:
                    out[b] = self._explore[1]
        return tuple(out)

    def _top(self, prior: tuple[int, ...]) -> int:
        """One past the last bucket with a batch size in ``prior`` (buckets 1..top-1 are decided)."""
        hi = min(len(prior), self.max_num_seqs + 1)
        return self.bucket[hi - 1] + 1 if hi > 1 else 1

    def _start_exploring(self, prior: tuple[int, ...], top: int, only: set[int] | None = None) -> None:
        # the busiest bucket that is due (of ``only``, the buckets whose evidence just moved, when
        # given): exploration goes where the engine spends its steps
        cands = [g for g in (range(1, top) if only is None else only)
                 if g < top and self.seen[g] >= self.min_seen and self.since[g] >= self.explore_every]
        for g in sorted(cands, key=lambda g: -self.seen[g]):
            p0 = self._prior_of(g, prior)
            if not self.speculate_over_off and p0 == 0:
                continue  # the policy's off stands there: nothing to decide
            k = self._to_explore(g, self._override.get(g, p0), p0)
            if k is not None:
                # hold + 1 verifying steps: the first verifies the previous k, the last drafts the next one
                self._explore = [g, k, self.hold, 4 * self.hold]
                self.explorations += 1
                return

    def stats(self) -> dict[str, Any]:
        """Counters, the overrides (by batch size; ``capped``: the policy's k capped by a shorter k
        measured at a smaller batch size, :meth:`table`), acceptance per k and the measured rates per bucket
        (keyed by the bucket's batch-size range, e.g. ``"30-37"``)."""
        measured = {}
        for g in range(1, self.nbuckets):
            fit = self._fit(g)
            row = {k: round(r[0], 4) for k in range(self.max_k + 1) if (r := self.rate(g, k, fit)) is not None}
            if row:
                mem = self.members[g]
                measured[str(mem[0]) if len(mem) == 1 else f"{mem[0]}-{mem[-1]}"] = row
        return {"records": self.records, "clean_steps": self.clean, "explorations": self.explorations,
                "explore_steps": self.explore_steps,
                "overrides": {b: k for g, k in sorted(self._override.items()) if g not in self._capped
                              for b in self.members[g]},
                "capped": {b: k for g, k in sorted(self._override.items()) if g in self._capped
                           for b in self.members[g]},
                "accept": [None if (a := self.accept(k)) is None else round(a, 4) for k in range(self.max_k + 1)],
                "accept_se": [round(se, 4) if math.isfinite(se := self.accept_se(k)) else None
                              for k in range(self.max_k + 1)],
                "rates": measured, **({"batch1_stream": self.stream.stats()} if self.stream is not None else {})}
