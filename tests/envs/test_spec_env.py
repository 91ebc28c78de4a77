"""SpecDecode-v0: both env checkers, seeded reproducibility, masks, rewards, options."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env

import envs
from envs.scenario import Scenario
from envs.spec_env import SpecDecodeEnv


@pytest.fixture(scope="module")
def scenario():
    return Scenario.from_preset("h100-llama3-8b-tree-drift")


def test_registered_and_gymnasium_check_env():
    env = gym.make(envs.ENV_ID, window_s=10.0)
    gym_check_env(env.unwrapped, skip_render_check=True)
    assert env.spec.max_episode_steps == 20_000


def test_sb3_check_env(scenario):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    sb3_check_env(SpecDecodeEnv(scenario, window_s=10.0), warn=True)


def test_env_from_traces_passes_checks(small_synthetic_trace):
    env = SpecDecodeEnv(traces=[str(small_synthetic_trace)], window_s=10.0, load_scales=(1.0, 2.0))
    gym_check_env(env, skip_render_check=True)


def _rollout(env, seed, n=400):
    obs, info = env.reset(seed=seed)
    rng = np.random.default_rng(0)
    out = [obs]
    rewards = []
    for _ in range(n):
        obs, r, term, trunc, info = env.step(int(rng.integers(env.action_space.n)))
        out.append(obs)
        rewards.append(r)
        if term:
            break
    return np.array(out), np.array(rewards), info


def test_episode_reproducible_from_seed(scenario):
    a = _rollout(SpecDecodeEnv(scenario, window_s=20.0), seed=11)
    b = _rollout(SpecDecodeEnv(scenario, window_s=20.0), seed=11)
    c = _rollout(SpecDecodeEnv(scenario, window_s=20.0), seed=12)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1][: len(c[1])], c[1][: len(a[1])])


def test_unsupported_widths_are_masked_and_mapped():
    sc = Scenario.from_preset("h100-llama3-8b-eagle")  # engine supports chain drafts only
    env = SpecDecodeEnv(sc, window_s=10.0, action_widths=[1, 2])
    mask = env.action_masks()
    assert env.action_space.n == 1 + sc.config.max_k * 2
    for i, (k, w) in enumerate(env.actions.actions):
        assert mask[i] == (w == 1 or k == 0)
        assert env.decode_action(i) == (k, 1 if k else 1)


def test_episode_terminates_with_stats_and_latency_return(scenario):
    env = SpecDecodeEnv(scenario, window_s=5.0, load_scales=(1.0,))
    env.reset(seed=0, options={"start_s": 100.0})
    total, term, info = 0.0, False, {}
    while not term:
        _, r, term, _, info = env.step(1)
        assert r <= 0
        total += r
    st = info["episode_stats"]
    assert st["completed"] == st["requests"] == env.episode["requests"]
    # return = -(sum of time in system) ~ -(requests * mean latency) (Little's law, step-discretised)
    assert -total == pytest.approx(st["requests"] * st["mean_latency_s"], rel=0.1)


def test_options_fix_load_and_window(scenario):
    """x4 load over 30 s replays exactly the requests of the first 120 s at x1, four times faster."""
    _, info1 = SpecDecodeEnv(scenario, window_s=120.0).reset(seed=0, options={"load_scale": 1.0, "start_s": 0.0})
    env4 = SpecDecodeEnv(scenario, window_s=30.0)
    _, info4 = env4.reset(seed=0, options={"load_scale": 4.0, "start_s": 0.0})
    assert info4["requests"] == info1["requests"] > 0
    assert env4.sim.requests.arrival_s.max() < 30.0


def test_goodput_reward_positive(scenario):
    env = SpecDecodeEnv(scenario, window_s=5.0, reward="goodput")
    env.reset(seed=0)
    _, r, *_ = env.step(0)
    assert r >= 0


@pytest.mark.parametrize("kwargs,match", [
    ({"reward": "speed"}, "reward="),
    ({"window_s": 0}, "window_s"),
    ({"load_scales": ()}, "load_scales"),
    ({"time_range": (0.5, 0.4)}, "time_range"),
])
def test_bad_arguments(scenario, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpecDecodeEnv(scenario, **kwargs)


def test_acceptance_drift_shows_in_observation(scenario):
    """Under the drift preset, the acceptance feature tracks the chat/code phases."""
    env = SpecDecodeEnv(scenario, window_s=240.0, load_scales=(1.0,))
    obs, _ = env.reset(seed=0, options={"start_s": 0.0})
    alpha = {0: [], 1: []}
    term = False
    while not term:
        obs, _, term, _, _ = env.step(env.actions.index(2, 1))
        t = env.sim.t
        if t % 60 > 20:  # past the EMA's transient
            alpha[int(t // 60) % 2].append(obs[5])
    assert np.mean(alpha[1]) - np.mean(alpha[0]) > 0.2


def test_scenario_from_recorded_traces_replays_every_trace_and_reaches_their_batch_sizes():
    """A light open-loop replay listed first must not hide the heavy sweep after it: the
    scenario replays every trace's requests in turn, so training sees batches up to max_num_seqs."""
    from pathlib import Path

    from envs.trace import load_traces

    paths = sorted(str(p) for p in (Path(__file__).resolve().parents[2] / "traces").glob("cpu-tiny-ngram.*.jsonl.gz"))
    assert len(paths) >= 2 and "azure-x0.05" in paths[0]
    traces = load_traces(paths)
    sc = Scenario.from_traces(traces)
    assert len(sc.requests) == sum(t.n_requests for t in traces)
    assert sc.acceptance.propose_rate(1) < 0.9  # ngram drafts for only part of the batch
    env = SpecDecodeEnv(sc, window_s=60.0, load_scales=[1.0])
    biggest = 0
    for seed in range(6):
        env.reset(seed=seed)
        done = False
        while not done:
            biggest = max(biggest, env._state.batch_size)
            _, _, term, trunc, _ = env.step(4)
            done = term or trunc
    assert biggest >= 24, biggest


def test_accept_thinning_draws_a_weaker_drafter_per_episode(scenario):
    env = SpecDecodeEnv(scenario, window_s=10.0, accept_thinning=0.5)
    p = np.asarray(scenario.acceptance.p)
    _, _ = env.reset(seed=0, options={"thinning": 0.4})
    assert env.episode["thinning"] == 0.4
    assert np.allclose(env.sim.acceptance.p, 0.6 * p)
    drawn = []
    for s in range(12):
        env.reset(seed=s)
        drawn.append(env.episode["thinning"])
        assert np.allclose(env.sim.acceptance.p, (1 - drawn[-1]) * p)
    assert 0 <= min(drawn) and max(drawn) < 0.5 and len(set(drawn)) == 12
    plain = SpecDecodeEnv(scenario, window_s=10.0)
    plain.reset(seed=0)
    assert plain.episode["thinning"] == 0.0 and plain.sim.acceptance is scenario.acceptance
    with pytest.raises(ValueError, match="accept_thinning"):
        SpecDecodeEnv(scenario, window_s=10.0, accept_thinning=1.0)
