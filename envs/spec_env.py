"""``SpecDecode-v0``: choose the speculative length and tree width for every engine step.

The environment replays a window of request arrivals through the continuous-batching
simulator (:mod:`envs.simulator`) with cost and acceptance profiles fitted from traces (or
a documented preset), and asks the agent for one ``(k, width)`` per engine step.

**Action space** -- ``Discrete(1 + max_k * len(widths))``: index 0 is ``k = 0`` (off),
then ``(k, width)`` for ``k = 1..max_k`` and each width (:class:`controller.actions.ActionSet`).
Widths the engine does not support are reported by :meth:`SpecDecodeEnv.action_masks`
(for MaskablePPO) and, if chosen anyway, mapped to the nearest supported action.

**Observation space** -- ``Box(0, 1, (7,), float32)`` from the shared feature function
:func:`controller.features.observe` (batch size twice, queue, KV usage, pending prefill,
two acceptance EMAs; see its module docstring for what is left out and why).

**Reward** -- ``"latency"`` (default): ``-step_seconds * requests_in_system``.  Summed over
an episode this is minus the total time requests spent in the system, so the return is
``-(mean request latency) * (requests)`` (Little's law): the agent is paid for what users
feel.  It also rewards throughput under load (a queue that grows costs more every step)
and, unlike a per-step tokens/s reward, it does not favour a fast step that leaves the
queue longer.  ``"rate"``: ``(committed_tokens - rho * step_ms) / (max_num_seqs / 8)`` with
``rho`` the recent tokens-per-ms (the ``tok_per_ms`` EMA before this step): the
Dinkelbach form of maximising the ratio tokens / time, which, unlike a per-step ratio,
weighs each step by its duration; dense and low-variance, it trains fastest.
``"goodput"``: committed tokens per step millisecond / 100, the per-step signal
Nightjar's bandit uses (arXiv 2512.22420); offered for comparison.

**Starting state** -- :meth:`reset` picks a load scale from ``load_scales`` and a window of
``window_s`` seconds (scaled timeline) whose start lies in the ``time_range`` fraction of
the trace, both from ``self.np_random``; options ``{"load_scale": x, "start_s": s}`` fix them.
With ``accept_thinning = m > 0`` each episode also draws a weaker drafter: every output token
becomes one the drafter cannot predict with a chance ``eps`` drawn uniformly from ``[0, m)``
(:func:`envs.simulator.thin_agree`; option ``{"thinning": eps}`` fixes it).  Training over a
range of acceptance, not only the traces' own level, teaches a policy how the best k moves
with the acceptance it observes (the ``alpha`` and ``accept0`` features): served on traffic its
drafter predicts worse than the recorded traffic, it shortens k instead of keeping the traces'.

**Episode end** -- terminated when every request of the window has finished; truncated
by the ``max_episode_steps`` of the registration (20,000).

**Version history** -- v0: first version.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from controller.actions import ActionSet
from controller.features import N_FEATURES, FeatureSpec, FeatureState, observe
from envs.scenario import Scenario
from envs.simulator import Simulator

# the acceptance features average over about this many drafted tokens (controller.features): at
# batch 1 about 60 steps, at batch 16 with k = 1 about 10 (the per-step EMA's window there)
ACCEPT_TRIALS = 150

REWARDS = ("latency", "rate", "goodput")


class SpecDecodeEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, scenario: Scenario | None = None, *, traces=None, preset: str | None = None,
                 window_s: float = 60.0, load_scales: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
                 time_range: tuple[float, float] = (0.0, 1.0), reward: str = "latency",
                 action_widths: Sequence[int] | None = None, noise: bool = True, accept_thinning: float = 0.0,
                 accept_trials: int = ACCEPT_TRIALS):
        if sum(x is not None for x in (scenario, traces, preset)) > 1:
            raise ValueError("give at most one of scenario=, traces= or preset=")
        if scenario is None:
            scenario = Scenario.from_traces(traces) if traces is not None else Scenario.from_preset(
                preset or "h100-llama3-8b-eagle")
        if reward not in REWARDS:
            raise ValueError(f"reward={reward!r} is not one of {REWARDS}")
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        if not load_scales or any(s <= 0 for s in load_scales):
            raise ValueError(f"load_scales must be a non-empty list of positive numbers, got {load_scales!r}")
        lo, hi = time_range
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"time_range must satisfy 0 <= lo < hi <= 1, got {time_range!r}")
        if not 0.0 <= accept_thinning < 1.0:
            raise ValueError(f"accept_thinning must be in [0, 1), got {accept_thinning}")
        if type(accept_trials) is not int or accept_trials < 0:
            raise ValueError(f"accept_trials must be an int >= 0 (drafted tokens the acceptance features average "
                             f"over; 0 = per step), got {accept_trials!r}")
        if len(scenario.requests) == 0:
            raise ValueError(f"scenario {scenario.name!r} has no requests to replay")
        self.scenario = scenario
        self.window_s = float(window_s)
        self.load_scales = [float(s) for s in load_scales]
        self.time_range = (float(lo), float(hi))
        self.reward_kind = reward
        self.noise = noise
        self.accept_thinning = float(accept_thinning)
        cfg = scenario.config
        self.actions = ActionSet(cfg.max_k, list(action_widths or cfg.widths))
        self._mask = self.actions.mask(supported_widths=list(cfg.widths), max_k=cfg.max_k)
        self._action_table = [self.actions.map_to_supported(i, list(cfg.widths), cfg.max_k)
                              if not self._mask[i] else i for i in range(self.actions.n)]
        self._kw = [self.actions.actions[j] for j in self._action_table]
        self.feature_spec = FeatureSpec(max_num_seqs=cfg.max_num_seqs, max_k=cfg.max_k,
                                        max_width=max(self.actions.widths), token_budget=cfg.max_num_batched_tokens,
                                        accept_prior=float(np.clip(scenario.acceptance.p[0], 0.05, 0.95)),
                                        accept_trials=accept_trials)
        self.action_space = gym.spaces.Discrete(self.actions.n)
        self.observation_space = gym.spaces.Box(0.0, 1.0, (N_FEATURES,), np.float32)
        self.features = FeatureState(self.feature_spec)
        self._rate_scale = float(cfg.max_num_seqs) / 8.0
        self._obs = np.zeros(N_FEATURES, dtype=np.float32)
        self.sim: Simulator | None = None
        self._state = None
        self.episode: dict[str, Any] = {}

    # ------------------------------------------------------------------ gymnasium API
    def action_masks(self) -> np.ndarray:
        """Actions the engine can run (for sb3-contrib's MaskablePPO)."""
        return self._mask.copy()

    def _window(self, scale: float, start: float | None):
        req = self.scenario.requests
        span = req.span_s / scale
        lo, hi = self.time_range[0] * span, self.time_range[1] * span
        latest = max(lo, hi - self.window_s)
        for _ in range(32):
            s = float(self.np_random.uniform(lo, latest)) if start is None else float(start)
            w = req.window(s, self.window_s, scale)
            if len(w) or start is not None:
                return s, w
        raise RuntimeError(f"no request arrives in 32 random windows of {self.window_s}s at load x{scale}; "
                           f"use a longer window_s")

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        scale = float(options.get("load_scale", self.load_scales[int(self.np_random.integers(len(self.load_scales)))]))
        start, window = self._window(scale, options.get("start_s"))
        if len(window) == 0:
            raise ValueError(f"no request arrives in the window start_s={start}, window_s={self.window_s} "
                             f"at load x{scale}")
        sim_seed = int(self.np_random.integers(2**31 - 1))
        eps = float(options.get("thinning", self.np_random.uniform(0.0, self.accept_thinning)
                                if self.accept_thinning > 0 else 0.0))
        acceptance = self.scenario.acceptance
        if eps > 0:
            window = window.thinned(eps, self.np_random)
            acceptance = acceptance.thinned(eps, window.agree)
        self.sim = Simulator(window, self.scenario.cost, acceptance, self.scenario.config,
                             seed=sim_seed, time_offset_s=start, noise=self.noise, record_steps=False)
        self.features.reset()
        self.episode = {"load_scale": scale, "start_s": start, "requests": len(window), "return": 0.0,
                        "thinning": eps}
        self._state = self.sim.prepare()
        return self._observe(), {"load_scale": scale, "start_s": start, "requests": len(window)}

    def _observe(self) -> np.ndarray:
        s = self._state
        return observe(self.features, s.batch_size, s.waiting, s.kv_usage, s.prefill_pending, out=self._obs).copy()

    def step(self, action):
        if self.sim is None or self._state is None:
            raise RuntimeError("call reset() before step(); the episode is over")
        k, w = self._kw[int(action)]
        out = self.sim.execute(k, w)
        rate_before = self.features.tok_per_ms
        self.features.update(out.batch_size, out.k, out.width, out.drafts, out.accepted_per_pos, out.step_ms,
                             out.committed_tokens)
        if self.reward_kind == "latency":
            reward = -(out.step_ms / 1000.0) * out.in_system
        elif self.reward_kind == "rate":
            reward = (out.committed_tokens - rate_before * out.step_ms) / self._rate_scale
        else:
            reward = out.committed_tokens / out.step_ms / 100.0
        self.episode["return"] += reward
        self._state = self.sim.prepare()
        terminated = self._state is None
        info = {"k": out.k, "width": out.width, "batch_size": out.batch_size, "step_ms": out.step_ms,
                "committed_tokens": out.committed_tokens, "accepted_tokens": out.accepted_tokens}
        if terminated:
            info["episode_stats"] = self.sim.stats().summary()
            obs = self._obs.copy()
        else:
            obs = self._observe()
        return obs, float(reward), terminated, False, info

    # ------------------------------------------------------------------ helpers
    def decode_action(self, action: int) -> tuple[int, int]:
        """The ``(k, width)`` the engine runs for ``action`` (after mapping unsupported widths)."""
        return self._kw[int(action)]


def make_env(**kwargs) -> SpecDecodeEnv:
    return SpecDecodeEnv(**kwargs)


__all__ = ["REWARDS", "SpecDecodeEnv", "make_env"]
