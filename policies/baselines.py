"""Baselines and the hindsight oracle, all behind one interface and run in the same simulator.

Every policy sees the same thing per step: the observation from the shared feature
function and the env (for the scheduler state and, for the oracle only, the simulator's
realised acceptance).  ``act`` returns an action index of the env's action set;
``update`` is called with the step's info dict after every step (online learners learn
inside the evaluation, as they would in production).

==================  ========================================================================
``off``             ``k = 0`` always
``static-k``        the same ``k`` (chain) every step, for each ``k`` up to ``max_k``
``table``           vLLM's ``num_speculative_tokens_per_batch_size``: a hand-set or fitted
                    ``[[lo, hi, k], ...]`` batch-size -> k table
``nightjar``        Nightjar (arXiv 2512.22420): context = batch size in log2 bins, arms =
                    k in 0..L, reward = committed tokens / step ms, epsilon-greedy per bin
                    after a round-robin warm-up
``ema``             SGLang-style adaptive steps: EMA of acceptance length per batch-size
                    range, k = accepted length + 1, changed only after ``hysteresis`` steps
                    agree
``goodput-greedy``  SmartSpec-style: argmax over actions of expected committed tokens /
                    predicted step ms, from the fitted cost profile and an online estimate
                    of the per-position acceptance (the ``alpha`` feature)
``oracle``          per-step hindsight: the action with the most committed tokens per
                    millisecond of decode time given the step's realised acceptance (the
                    ceiling of any per-step rule; a policy that plans across steps can beat
                    it under overload, where prefill competes for the token budget)
==================  ========================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from controller.features import FEATURE_NAMES
from envs.spec_env import ACCEPT_TRIALS, SpecDecodeEnv
from envs.trace import Trace

ALPHA = FEATURE_NAMES.index("alpha")


class Policy:
    """Base class: ``reset`` once per episode, ``act`` every step, ``update`` after it."""

    name = "policy"
    accept_trials = ACCEPT_TRIALS  # the acceptance window of the observations it reads (FeatureSpec)

    def reset(self, env: SpecDecodeEnv) -> None:
        self.env = env

    def act(self, obs: np.ndarray, env: SpecDecodeEnv) -> int:
        raise NotImplementedError

    def update(self, info: dict) -> None:
        pass


class Off(Policy):
    name = "off"

    def act(self, obs, env):
        return 0


@dataclass
class StaticK(Policy):
    k: int
    width: int = 1

    @property
    def name(self) -> str:
        return f"static-k{self.k}" + (f"w{self.width}" if self.width != 1 else "")

    def act(self, obs, env):
        return env.actions.index(self.k, self.width)


def _bucket(batch: int) -> int:
    return 0 if batch <= 0 else int(batch).bit_length()


@dataclass
class BatchTable(Policy):
    """vLLM dynamic SD: ``[[lo, hi, k], ...]``, batch sizes outside every range get ``default_k``."""

    ranges: list[list[int]]
    default_k: int = 0
    label: str = "table"

    def __post_init__(self):
        for r in self.ranges:
            if len(r) != 3 or r[0] > r[1] or r[2] < 0:
                raise ValueError(f"batch-size table entry {r!r} must be [lo, hi, k] with lo <= hi and k >= 0")

    @property
    def name(self) -> str:
        return self.label

    def k_for(self, batch: int) -> int:
        for lo, hi, k in self.ranges:
            if lo <= batch <= hi:
                return k
        return self.default_k

    def act(self, obs, env):
        k = min(self.k_for(env._state.batch_size), env.actions.max_k)
        return env.actions.index(k, 1)

    @classmethod
    def fit(cls, traces: list[Trace], max_k: int, label: str = "table-fitted") -> BatchTable:
        """Per log2 batch bucket, the chain k with the best recorded committed tokens per ms
        (``(batch + accepted) / step_ms`` averaged over the bucket's steps): the table an
        operator would tune offline from the same traces."""
        b = np.concatenate([t.steps["batch_size"] for t in traces]).astype(np.int64)
        k = np.concatenate([t.steps["k"] for t in traces]).astype(np.int64)
        w = np.concatenate([t.steps["width"] for t in traces]).astype(np.int64)
        rate = (b + np.concatenate([t.steps["accepted_tokens"] for t in traces])) / np.concatenate(
            [t.steps["step_ms"] for t in traces])
        bucket = np.where(b <= 0, 0, np.floor(np.log2(np.maximum(b, 1))).astype(np.int64) + 1)
        ranges = []
        for bk in range(1, int(bucket.max()) + 1 if len(bucket) else 1):
            best_k, best = 0, -1.0
            for kk in range(max_k + 1):
                m = (bucket == bk) & (k == kk) & ((w == 1) | (kk == 0))
                if m.sum() >= 5 and rate[m].mean() > best:
                    best_k, best = kk, float(rate[m].mean())
            if best >= 0:
                ranges.append([1 << (bk - 1), (1 << bk) - 1, best_k])
        return cls(ranges, default_k=ranges[-1][2] if ranges else 0, label=label)


@dataclass
class NightjarBandit(Policy):
    """Epsilon-greedy contextual bandit (arXiv 2512.22420), learning online."""

    epsilon: float = 0.1
    warmup_per_arm: int = 3
    seed: int = 0
    name: str = "nightjar"
    _sums: dict = field(default_factory=dict, repr=False)

    def reset(self, env):
        super().reset(env)
        self.rng = np.random.default_rng(self.seed)
        self.arms = list(range(env.actions.max_k + 1))
        n_bins = _bucket(env.scenario.config.max_num_seqs) + 1
        self.count = np.zeros((n_bins, len(self.arms)))
        self.mean = np.zeros((n_bins, len(self.arms)))
        self._last = None

    def act(self, obs, env):
        b = _bucket(env._state.batch_size)
        c = self.count[b]
        if c.min() < self.warmup_per_arm:
            arm = int(np.argmin(c))                     # round-robin warm-up
        elif self.rng.random() < self.epsilon:
            arm = int(self.rng.integers(len(self.arms)))
        else:
            arm = int(np.argmax(self.mean[b]))
        self._last = (b, arm)
        return env.actions.index(self.arms[arm], 1)

    def update(self, info):
        if self._last is None or info["batch_size"] == 0:
            return
        b, arm = self._last
        reward = info["committed_tokens"] / info["step_ms"]
        self.count[b, arm] += 1
        self.mean[b, arm] += (reward - self.mean[b, arm]) / self.count[b, arm]


@dataclass
class EmaAdaptive(Policy):
    """SGLang-style: EMA of accepted length per batch-size range with hysteresis."""

    ema: float = 0.1
    hysteresis: int = 8
    ranges: tuple[int, ...] = (1, 8, 32, 128)   # range starts
    name: str = "ema"

    def reset(self, env):
        super().reset(env)
        self.acc_len = np.full(len(self.ranges), 1.0)
        self.current = np.full(len(self.ranges), min(2, env.actions.max_k), dtype=int)
        self.pending = np.zeros(len(self.ranges), dtype=int)
        self._r = 0

    def _range(self, batch: int) -> int:
        return max(0, int(np.searchsorted(self.ranges, batch, side="right")) - 1)

    def act(self, obs, env):
        r = self._range(env._state.batch_size)
        self._r = r
        target = int(np.clip(math.floor(self.acc_len[r]) + 1, 1, env.actions.max_k))
        if target != self.current[r]:
            self.pending[r] += 1
            if self.pending[r] >= self.hysteresis:
                self.current[r] = target
                self.pending[r] = 0
        else:
            self.pending[r] = 0
        return env.actions.index(int(self.current[r]), 1)

    def update(self, info):
        if info["k"] > 0 and info["batch_size"] > 0:
            length = info["accepted_tokens"] / info["batch_size"]
            self.acc_len[self._r] += self.ema * (length - self.acc_len[self._r])


class _BestRate(Policy):
    """Per step, the valid action with the most committed tokens per ms of decode time.

    Subclasses say what they know of the tokens: :meth:`tokens` returns, for this step, a
    function ``(k, width) -> committed tokens``.  Decode time only: prefill work is the same
    whatever k, it only moves between steps.
    """

    def reset(self, env):
        super().reset(env)
        self.cost = env.scenario.cost
        self.valid = [i for i, ok in enumerate(env.action_masks()) if ok]

    def tokens(self, obs, env, batch_size: int):
        raise NotImplementedError

    def act(self, obs, env):
        s = env._state
        if s.batch_size == 0:
            return 0
        tokens = self.tokens(obs, env, s.batch_size)
        best, best_rate = 0, -1.0
        for i in self.valid:
            k, w = env.actions.actions[i]
            rate = tokens(k, w) / self.cost.predict_one(s.batch_size, k, w, 0, s.kv_usage)
            if rate > best_rate:
                best, best_rate = i, rate
        return best


@dataclass
class GoodputGreedy(_BestRate):
    """SmartSpec-style goodput maximiser with the fitted cost model, the fitted share of sequences that
    get a draft (``propose``) and the online acceptance."""

    name: str = "goodput-greedy"

    def reset(self, env):
        super().reset(env)
        self.rho = env.scenario.acceptance.width_rho
        self.propose = [env.scenario.acceptance.propose_rate(k) for k in range(env.actions.max_k + 1)]

    def tokens(self, obs, env, batch_size):
        alpha = float(obs[ALPHA])

        def committed(k, w):
            q = 1.0 - (1.0 - alpha) ** (w ** self.rho) if w > 1 else alpha
            return batch_size * (1 + self.propose[k] * sum(q ** j for j in range(1, k + 1)))

        return committed


@dataclass
class HindsightOracle(_BestRate):
    """Per step, the action with the most committed tokens per ms given the realised acceptance."""

    name: str = "oracle"

    def tokens(self, obs, env, batch_size):
        return lambda k, w: batch_size + env.sim.peek(k, w)[0]


@dataclass
class ExpectedOracle(_BestRate):
    """Per step, the action with the most *expected* committed tokens per ms under the true profiles.

    It knows what no causal policy can know exactly -- the scenario's true cost model and the
    true acceptance rates at this moment (drift included) -- but not this step's realised draws,
    so it is the ceiling of a causal policy; :class:`HindsightOracle` also knows the draws (at
    batch 1 it skips drafting exactly on the steps whose drafts would be rejected).
    """

    name: str = "oracle-ev"

    def tokens(self, obs, env, batch_size):
        sim = env.sim
        t = sim.t + sim.time_offset_s
        return lambda k, w: batch_size * (1 + sim.acceptance.expected_gain(k, w, t))


def baseline_suite(env: SpecDecodeEnv, traces: list[Trace] | None = None, user_table: list[list[int]] | None = None,
                   seed: int = 0) -> list[Policy]:
    """Every baseline for ``env``'s action set: off, static k for each k, tables, bandit, EMA, greedy, oracle."""
    pols: list[Policy] = [Off()] + [StaticK(k) for k in range(1, env.actions.max_k + 1)]
    if user_table:
        pols.append(BatchTable(user_table, label="table-user"))
    if traces:
        pols.append(BatchTable.fit(traces, env.actions.max_k))
    pols += [NightjarBandit(seed=seed), EmaAdaptive(), GoodputGreedy(), ExpectedOracle(), HindsightOracle()]
    return pols
