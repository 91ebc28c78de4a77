"""Training: tiny budgets run in seconds, the export matches SB3's own greedy action, and it learns."""

import numpy as np
import pytest
import torch

from envs.scenario import Scenario
from envs.spec_env import SpecDecodeEnv
from policies.baselines import StaticK
from policies.evaluate import evaluate
from policies.train import LearnedPolicy, TrainConfig, export_artifact, train


@pytest.fixture(scope="module")
def drift():
    return Scenario.from_preset("h100-llama3-8b-tree-drift")


def _agree(model, art, env, n=200):
    rng = np.random.default_rng(0)
    obs = rng.random((n, env.observation_space.shape[0])).astype(np.float32)
    sb3, _ = model.predict(obs, deterministic=True)
    mask = env.action_masks()
    ours = np.array([art.act(o) for o in obs])
    ok = mask[sb3]  # SB3 does not know the mask: compare where it picked a valid action
    return np.mean(ours[ok] == sb3[ok])


@pytest.mark.parametrize("algo", ["hindsight", "ppo", "dqn", "maskable-ppo"])
def test_tiny_budget_trains_and_exports(drift, algo):
    cfg = TrainConfig(algo=algo, timesteps=600, n_envs=1, window_s=5.0, progress=False, eval_every=10_000,
                      rounds=1, epochs=1)
    res = train(drift, cfg)
    assert res.timesteps >= 512 and res.curve
    env = SpecDecodeEnv(drift, window_s=5.0)
    art = export_artifact(res.model, env)
    assert _agree(res.model, art, env) == 1.0
    assert torch.get_num_threads() == 1


def test_budget_stops_training(drift):
    cfg = TrainConfig(algo="ppo", timesteps=10**7, budget_minutes=0.05, n_envs=1, window_s=5.0, progress=False)
    res = train(drift, cfg)
    assert res.stopped == "budget" and res.seconds < 30


def test_bad_config():
    with pytest.raises(ValueError, match="algo="):
        TrainConfig(algo="a2c")
    with pytest.raises(ValueError, match="budget_minutes"):
        TrainConfig(budget_minutes=0)
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="accept_trials must be an int >= 0"):
            TrainConfig(accept_trials=bad)


def test_accept_trials_defaults_and_errors(drift):
    """Config and env agree on the default window; the env refuses a bad one (train-controller's
    --accept-trials reaching the artifact: tests/policies/test_cli.py)."""
    from envs.spec_env import ACCEPT_TRIALS

    assert TrainConfig().accept_trials == ACCEPT_TRIALS == SpecDecodeEnv(drift).feature_spec.accept_trials
    assert SpecDecodeEnv(drift, accept_trials=0).feature_spec.accept_trials == 0
    with pytest.raises(ValueError, match="accept_trials must be an int >= 0"):
        SpecDecodeEnv(drift, accept_trials=-3)

    class Seen(StaticK):  # records the window of the env it is evaluated in
        def reset(self, env):
            super().reset(env)
            self.seen = env.feature_spec.accept_trials

    short, default = Seen(1), Seen(1)
    short.accept_trials = 0
    evaluate([short, default], drift, [(1.0, 0.0)], window_s=5.0)
    assert (short.seen, default.seen) == (0, ACCEPT_TRIALS)  # each policy observes as it was trained
    art = export_artifact(train(drift, TrainConfig(timesteps=300, rounds=1, epochs=1, window_s=5.0,
                                                   load_scales=(1.0,), progress=False, accept_trials=0)).model,
                          SpecDecodeEnv(drift, window_s=5.0, accept_trials=0))
    assert LearnedPolicy(art).accept_trials == 0


def test_it_learns_to_beat_every_static_k_under_drift(drift):
    """Does it learn: 20k samples; on held-out windows at light load the learned policy must beat the best
    static k by >= 5% goodput (it can switch width and k with the acceptance phase; statics cannot)."""
    cfg = TrainConfig(timesteps=20_000, rounds=2, epochs=6, window_s=30.0, load_scales=(0.5, 1.0),
                      train_range=(0.0, 0.8), progress=False)
    res = train(drift, cfg)
    env = SpecDecodeEnv(drift, window_s=30.0)
    learned = LearnedPolicy(export_artifact(res.model, env))
    span = drift.requests.span_s
    wins = [(0.5, 0.85 * span / 0.5), (1.0, 0.9 * span)]
    res = evaluate([learned] + [StaticK(k) for k in range(0, 5)], drift, wins, window_s=30.0)
    g = {}
    for r in res:
        g.setdefault(r.policy, []).append(r.goodput_tps)
    best_static = max(np.mean(v) for p, v in g.items() if p != "learned")
    assert np.mean(g["learned"]) >= 1.05 * best_static, g


def test_min_gain_pins_off_at_one_and_demands_the_margin(drift):
    """The hindsight export: off's output is exactly 1 (its label always is), every speculative action's
    output drops by min_gain, so the artifact speculates only where >= 1 + min_gain is predicted."""
    cfg = TrainConfig(timesteps=600, window_s=5.0, progress=False, rounds=1, epochs=1)
    assert cfg.min_gain == 0.02  # the hindsight default
    res = train(drift, cfg)
    env = SpecDecodeEnv(drift, window_s=5.0)
    raw, margin = export_artifact(res.model, env), export_artifact(res.model, env, min_gain=0.05)
    obs = np.random.default_rng(1).random((300, env.observation_space.shape[0]))
    q, qm = raw.logits(obs), margin.logits(obs)
    off = np.array([k == 0 for k, _w in env.actions.actions])
    valid = env.action_masks() & ~off
    assert np.all(qm[:, off] == 1.0)
    np.testing.assert_allclose(qm[:, valid], q[:, valid] - 0.05, atol=1e-12)
    best_spec = q[:, valid].max(axis=1)
    chosen_off = np.array([margin.actions[margin.act(o)][0] == 0 for o in obs])
    np.testing.assert_array_equal(chosen_off, best_spec < 1.05)


def test_min_gain_config_errors():
    with pytest.raises(ValueError, match="min_gain applies to algo='hindsight'"):
        TrainConfig(algo="ppo", min_gain=0.02)
    with pytest.raises(ValueError, match=r"min_gain must be in \[0, 1\)"):
        TrainConfig(min_gain=-0.1)
    assert TrainConfig(algo="ppo").min_gain is None
    assert TrainConfig(min_gain=0).min_gain == 0
    with pytest.raises(ValueError, match=r"accept_thinning must be in \[0, 1\)"):
        TrainConfig(accept_thinning=1.0)


def test_min_gain_refuses_a_ppo_export(drift):
    res = train(drift, TrainConfig(algo="ppo", timesteps=600, n_envs=1, window_s=5.0, progress=False,
                                   eval_every=10_000))
    with pytest.raises(ValueError, match="min_gain needs a Q-network"):
        export_artifact(res.model, SpecDecodeEnv(drift, window_s=5.0), min_gain=0.02)
