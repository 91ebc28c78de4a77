"""Train a speculation policy with stable-baselines3 and export it as a numpy artifact.

Two families, selected by ``algo``:

* ``"hindsight"`` (default): full-information regression into an SB3 ``DQN`` Q-network.
  The simulator's common random numbers let every action's outcome at a step be computed
  (:meth:`envs.simulator.Simulator.peek_held`), so each visited state yields a label for
  *every* action: its decode speed-up over ``k = 0`` (committed tokens per decode
  millisecond, relative).  Where a request carries recorded draft agreement, its accepted
  tokens are those of *holding* the action from this position to the request's end, not
  this step's draw: a policy cannot see where each sequence is in its repetitive stretches,
  and the draw at positions a short k walks through slowly overrates a long k (with ngram,
  k = 4 accepts 2.2 tokens per step at a random position but 1.3 when held).  Regressing
  those labels on the shared features learns ``E[speed-up | features, action]``, whose argmax is the best per-step action a policy
  without hindsight can take -- the per-step oracle's choice minus its clairvoyance.
  States come from rollouts of goodput-greedy, then of the current network (DAgger-style
  rounds), with ``explore`` random actions.  Thousands of times more sample-efficient than
  reward-only RL here, since one step labels all actions.  Its outputs are speed-ups over
  ``k = 0``, so the export pins off at exactly 1 (its label always is) and speculates only
  where the predicted speed-up is at least ``1 + min_gain`` (default 2%): off is the floor the
  controller promises, and a predicted gain of a per cent or two is within the profiles' error
  and ignores what a step-level model cannot see (speculation desynchronises requests that
  would otherwise finish and prefill together; a finite job then drains longer).
* ``"ppo"``, ``"dqn"``, ``"maskable-ppo"`` (sb3-contrib): reward-only RL on the env's reward
  (``reward``, default ``"rate"``), from SB3's classes through :func:`_algos` (a
  name-to-class table, as SB3's ``policy_aliases``).
Training uses one torch thread (ARCHITECTURE.md: ~7x faster on 2 cores than the default),
``n_envs`` vectorised envs over the *training* part of the trace timeline only
(``train_range``), early stopping when the validation return stops improving, and an
optional wall-clock budget.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from controller.artifact import PolicyArtifact
from envs.scenario import Scenario
from envs.spec_env import ACCEPT_TRIALS, SpecDecodeEnv
from policies.baselines import Policy

__all__ = ["ALGOS", "LearnedPolicy", "TrainConfig", "export_artifact", "train"]


def _algos() -> dict[str, Any]:
    from stable_baselines3 import DQN, PPO

    table = {"ppo": PPO, "dqn": DQN}
    try:
        from sb3_contrib import MaskablePPO
        table["maskable-ppo"] = MaskablePPO
    except ImportError:
        pass
    return table


ALGOS = ("hindsight", "ppo", "dqn", "maskable-ppo")
DEFAULT_MIN_GAIN = 0.02


@dataclass
class TrainConfig:
    algo: str = "hindsight"
    timesteps: int = 300_000
    budget_minutes: float | None = None
    seed: int = 0
    n_envs: int = 4
    window_s: float = 30.0
    load_scales: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    train_range: tuple[float, float] = (0.0, 0.8)
    reward: str = "rate"
    net_arch: tuple[int, ...] = (64, 64)
    gamma: float = 0.9
    learning_rate: float = 3e-4
    eval_every: int = 20_000
    patience: int = 4           # evaluations without improvement before stopping
    progress: bool = True
    rounds: int = 3             # hindsight: collection / regression rounds (DAgger-style)
    epochs: int = 8             # hindsight: passes over the collected data per round
    explore: float = 0.2        # hindsight: random actions in the behaviour policy
    min_gain: float | None = None  # hindsight: speculate only if predicted >= 1 + min_gain x off (None: 0.02)
    accept_thinning: float = 0.3   # training episodes draw a drafter weaker by eps in [0, this) (SpecDecodeEnv)
    accept_trials: int = ACCEPT_TRIALS  # the acceptance features average over about this many drafted tokens

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"algo={self.algo!r} is not one of {ALGOS}")
        if self.timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {self.timesteps}")
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise ValueError(f"budget_minutes must be > 0, got {self.budget_minutes}")
        if self.n_envs < 1:
            raise ValueError(f"n_envs must be >= 1, got {self.n_envs}")
        if self.algo != "hindsight" and self.min_gain is not None:
            raise ValueError(f"min_gain applies to algo='hindsight' (its outputs are speed-ups over k = 0), not "
                             f"{self.algo!r}: leave it unset")
        if self.algo == "hindsight" and self.min_gain is None:
            self.min_gain = DEFAULT_MIN_GAIN
        if self.min_gain is not None and not 0 <= self.min_gain < 1:
            raise ValueError(f"min_gain must be in [0, 1), got {self.min_gain}")
        if not 0 <= self.accept_thinning < 1:
            raise ValueError(f"accept_thinning must be in [0, 1), got {self.accept_thinning}")
        if type(self.accept_trials) is not int or self.accept_trials < 0:
            raise ValueError(f"accept_trials must be an int >= 0 (0 = per-step acceptance features), "
                             f"got {self.accept_trials!r}")


@dataclass
class TrainResult:
    model: Any
    curve: list[dict] = field(default_factory=list)   # {"timesteps", "seconds", "val_return"}
    stopped: str = "timesteps"
    seconds: float = 0.0
    timesteps: int = 0


def _make_env(scenario: Scenario, cfg: TrainConfig, time_range, seed: int):
    from stable_baselines3.common.monitor import Monitor

    def thunk():
        env = SpecDecodeEnv(scenario, window_s=cfg.window_s, load_scales=cfg.load_scales, time_range=time_range,
                            reward=cfg.reward, accept_thinning=cfg.accept_thinning, accept_trials=cfg.accept_trials)
        env.reset(seed=seed)
        return Monitor(env)

    return thunk


def train(scenario: Scenario, cfg: TrainConfig) -> TrainResult:
    """Train on ``cfg.train_range`` of the scenario's timeline; validate on its last fifth."""
    import torch
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv

    torch.set_num_threads(1)
    if cfg.algo == "hindsight":
        return train_hindsight(scenario, cfg)
    algos = _algos()
    if cfg.algo not in algos:
        raise ValueError(f"algo {cfg.algo!r} needs sb3-contrib: pip install sb3-contrib")
    lo, hi = cfg.train_range
    val_lo = lo + 0.8 * (hi - lo)  # validation windows: the last fifth of the training range
    venv = DummyVecEnv([_make_env(scenario, cfg, (lo, val_lo), cfg.seed + i) for i in range(cfg.n_envs)])
    val_env = SpecDecodeEnv(scenario, window_s=cfg.window_s, load_scales=cfg.load_scales,
                            time_range=(val_lo, hi), reward=cfg.reward, accept_trials=cfg.accept_trials)
    arch = list(cfg.net_arch)
    if cfg.algo == "dqn":
        model = algos["dqn"]("MlpPolicy", venv, seed=cfg.seed, gamma=cfg.gamma, learning_rate=cfg.learning_rate,
                             policy_kwargs={"net_arch": arch}, buffer_size=100_000, learning_starts=2_000,
                             exploration_fraction=0.3, train_freq=4, target_update_interval=2_000, verbose=0)
    else:
        model = algos[cfg.algo]("MlpPolicy", venv, seed=cfg.seed, gamma=cfg.gamma, learning_rate=cfg.learning_rate,
                                n_steps=512, batch_size=256, ent_coef=0.003,
                                policy_kwargs={"net_arch": {"pi": arch, "vf": arch}}, verbose=0)

    result = TrainResult(model)
    start = time.perf_counter()
    budget_s = cfg.budget_minutes * 60 if cfg.budget_minutes else None
    best = {"value": -np.inf, "params": None, "since": 0}
    scales = list(cfg.load_scales)

    def validate() -> float:
        art = export_artifact(model, val_env)
        pol = LearnedPolicy(art)
        total = 0.0
        for i, scale in enumerate(scales):
            obs, _ = val_env.reset(seed=10_000 + i, options={"load_scale": scale})
            pol.reset(val_env)
            done = False
            ret = 0.0
            while not done:
                obs, r, term, trunc, _ = val_env.step(pol.act(obs, val_env))
                ret += r
                done = term or trunc
            total += ret / max(1, val_env.sim.stats().steps)
        return total / len(scales)

    class Control(BaseCallback):
        def _on_step(self) -> bool:
            n = self.num_timesteps
            if budget_s is not None and time.perf_counter() - start > budget_s:
                result.stopped = "budget"
                return False
            if n - (result.curve[-1]["timesteps"] if result.curve else 0) >= cfg.eval_every:
                v = validate()
                result.curve.append({"timesteps": n, "seconds": round(time.perf_counter() - start, 2),
                                     "val_return": v})
                if v > best["value"] + 1e-4:
                    best.update(value=v, since=0,
                                params={k: t.detach().clone() for k, t in model.policy.state_dict().items()})
                else:
                    best["since"] += 1
                    if best["since"] >= cfg.patience:
                        result.stopped = "early-stop"
                        return False
            return True

    model.learn(total_timesteps=cfg.timesteps, callback=Control(), progress_bar=cfg.progress)
    v = validate()
    result.curve.append({"timesteps": model.num_timesteps, "seconds": round(time.perf_counter() - start, 2),
                         "val_return": v})
    if best["params"] is not None and v < best["value"]:
        model.policy.load_state_dict(best["params"])  # keep the best validated weights
    result.seconds = time.perf_counter() - start
    result.timesteps = int(model.num_timesteps)
    return result


def _speedup_labels(env: SpecDecodeEnv, valid: list[int], cost) -> tuple[np.ndarray, float] | None:
    """Every valid action's decode speed-up over k=0 at the prepared step (None when idle): its accepted
    tokens as holding it would give (:meth:`Simulator.peek_held`) over the fitted step cost."""
    s = env._state
    if s.batch_size == 0:
        return None
    out = np.zeros(env.action_space.n, dtype=np.float32)
    base_ms = cost.predict_one(s.batch_size, 0, 1, 0, s.kv_usage)
    base = s.batch_size / base_ms
    for i in valid:
        k, w = env.actions.actions[i]
        acc = env.sim.peek_held(k, w)
        out[i] = (s.batch_size + acc) / cost.predict_one(s.batch_size, k, w, 0, s.kv_usage) / base
    return out, base_ms


def _collect(scenario: Scenario, cfg: TrainConfig, n_steps: int, behaviour, rng: np.random.Generator,
             time_range, desc: str):
    from tqdm import tqdm

    from policies.baselines import GoodputGreedy

    env = SpecDecodeEnv(scenario, window_s=cfg.window_s, load_scales=cfg.load_scales, time_range=time_range,
                        reward=cfg.reward, accept_thinning=cfg.accept_thinning, accept_trials=cfg.accept_trials)
    valid = [i for i, ok in enumerate(env.action_masks()) if ok]
    pol = behaviour if behaviour is not None else GoodputGreedy()
    X, Y, W = [], [], []
    bar = tqdm(total=n_steps, desc=desc, unit="step", disable=not cfg.progress, leave=False)
    obs, _ = env.reset(seed=int(rng.integers(2**31 - 1)))
    pol.reset(env)
    n = 0
    while n < n_steps:
        lab = _speedup_labels(env, valid, scenario.cost)
        if lab is not None:
            X.append(obs.copy())
            Y.append(lab[0])
            W.append(lab[1])
            n += 1
            bar.update(1)
        a = int(valid[rng.integers(len(valid))]) if rng.random() < cfg.explore else pol.act(obs, env)
        obs, _, term, trunc, info = env.step(a)
        pol.update(info)
        if term or trunc:
            obs, _ = env.reset(seed=int(rng.integers(2**31 - 1)))
            pol.reset(env)
    bar.close()
    return np.asarray(X, np.float32), np.asarray(Y, np.float32), np.asarray(W, np.float32)


def train_hindsight(scenario: Scenario, cfg: TrainConfig) -> TrainResult:
    """Full-information regression into an SB3 DQN Q-network (see the module docstring)."""
    import torch
    from stable_baselines3 import DQN

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    lo, hi = cfg.train_range
    val_lo = lo + 0.8 * (hi - lo)
    env = SpecDecodeEnv(scenario, window_s=cfg.window_s, load_scales=cfg.load_scales, time_range=(lo, val_lo),
                        reward=cfg.reward, accept_trials=cfg.accept_trials)
    model = DQN("MlpPolicy", env, seed=cfg.seed, learning_rate=1e-3, policy_kwargs={"net_arch": list(cfg.net_arch)},
                verbose=0)
    qnet = model.policy.q_net
    opt = torch.optim.Adam(qnet.parameters(), lr=1e-3)
    mask = torch.as_tensor(env.action_masks(), dtype=torch.float32)
    result = TrainResult(model)
    start = time.perf_counter()
    budget_s = cfg.budget_minutes * 60 if cfg.budget_minutes else None
    per_round = max(1, cfg.timesteps // cfg.rounds)
    X = Y = W = None
    best = (-np.inf, None)
    behaviour = None
    for rnd in range(cfg.rounds):
        x, y, w = _collect(scenario, cfg, per_round, behaviour, rng, (lo, val_lo), f"collect {rnd + 1}/{cfg.rounds}")
        X = x if X is None else np.concatenate([X, x])
        Y = y if Y is None else np.concatenate([Y, y])
        W = w if W is None else np.concatenate([W, w])
        xt, yt = torch.as_tensor(X), torch.as_tensor(Y)
        wt = torch.as_tensor(W / W.mean())
        n = len(xt)
        for _ in range(cfg.epochs):
            perm = torch.randperm(n)
            for b in range(0, n, 512):
                idx = perm[b:b + 512]
                err = (qnet(xt[idx]) - yt[idx]) ** 2 * mask
                loss = (err.sum(dim=1) * wt[idx]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            if budget_s is not None and time.perf_counter() - start > budget_s:
                break
        art = export_artifact(model, env, min_gain=cfg.min_gain)
        behaviour = LearnedPolicy(art)
        v = _validate_goodput(scenario, cfg, art, (val_lo, hi))
        result.curve.append({"timesteps": int(n), "seconds": round(time.perf_counter() - start, 2),
                             "val_return": v, "train_loss": float(loss.detach())})
        if v > best[0]:
            best = (v, {k: t.detach().clone() for k, t in model.policy.state_dict().items()})
        if budget_s is not None and time.perf_counter() - start > budget_s:
            result.stopped = "budget"
            break
    if best[1] is not None:
        model.policy.load_state_dict(best[1])
    result.seconds = time.perf_counter() - start
    result.timesteps = int(len(X))
    return result


def _validate_goodput(scenario: Scenario, cfg: TrainConfig, art: PolicyArtifact, time_range) -> float:
    """Mean goodput (tokens per busy second) over one validation window per load scale."""
    pol = LearnedPolicy(art)
    env = SpecDecodeEnv(scenario, window_s=cfg.window_s, load_scales=cfg.load_scales, time_range=time_range,
                        accept_trials=pol.accept_trials)
    vals = []
    for i, scale in enumerate(cfg.load_scales):
        obs, _ = env.reset(seed=10_000 + i, options={"load_scale": scale})
        pol.reset(env)
        done = False
        while not done:
            obs, _, term, trunc, _ = env.step(pol.act(obs, env))
            done = term or trunc
        vals.append(env.sim.stats().goodput_tps)
    return float(np.mean(vals))


def _linear_layers(module) -> list:
    import torch.nn as nn
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def export_artifact(model, env: SpecDecodeEnv, *, version: str = "0", provenance: dict | None = None,
                    evaluation: dict | None = None, min_gain: float | None = None) -> PolicyArtifact:
    """Copy an SB3 policy's greedy path into a numpy :class:`PolicyArtifact`.

    PPO / MaskablePPO: ``mlp_extractor.policy_net`` (tanh) then ``action_net``; the argmax of
    the action logits is the deterministic action.  DQN: ``q_net`` (ReLU); argmax Q.
    Masked actions get a -1e9 bias so the artifact never picks them.

    ``min_gain`` (the hindsight trainer's Q-network, whose outputs are speed-ups over ``k = 0``):
    the off action's output is pinned at exactly 1 (zero weights, bias 1: its label is always 1,
    so this only removes regression error) and every speculative action's bias is lowered by
    ``min_gain``, so the artifact speculates only where a speed-up of at least ``1 + min_gain``
    is predicted.
    """
    pol = model.policy
    if hasattr(pol, "q_net"):
        layers = _linear_layers(pol.q_net)
        activation = "relu"
    else:
        layers = _linear_layers(pol.mlp_extractor.policy_net) + [pol.action_net]
        activation = "tanh"
    ws = [layer.weight.detach().cpu().numpy().T.astype(np.float64) for layer in layers]
    bs = [layer.bias.detach().cpu().numpy().astype(np.float64) for layer in layers]
    mask = env.action_masks()
    if min_gain is not None:
        if activation != "relu":
            raise ValueError("min_gain needs a Q-network of speed-ups (the hindsight trainer), not a PPO policy")
        off = np.array([k == 0 for k, _w in env.actions.actions])
        ws[-1][:, off] = 0.0
        bs[-1] = np.where(off, 1.0, bs[-1] - float(min_gain))
    bs[-1] = np.where(mask, bs[-1], -1e9)
    return PolicyArtifact(env.feature_spec, env.actions.actions, ws, bs, activation=activation, version=version,
                          provenance=provenance or {}, evaluation=evaluation or {})


class LearnedPolicy(Policy):
    """A policy artifact behind the baseline interface (numpy forward pass, like serving)."""

    def __init__(self, artifact: PolicyArtifact, name: str = "learned"):
        self.artifact = artifact
        self.name = name
        self.accept_trials = artifact.feature_spec.accept_trials  # observed as it was trained

    def act(self, obs, env):
        return self.artifact.act(obs)


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
