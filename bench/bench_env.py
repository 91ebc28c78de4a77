"""Benchmark: single-process step throughput of ``SpecDecode-v0`` and its simulator (no torch).

What is measured
    For each preset (``h100-llama3-8b-eagle`` and ``h100-llama3-8b-tree-drift``), ``--steps``
    steps (default 50,000) of:

    a. ``raw env``: ``SpecDecodeEnv(preset=...)`` driven with random actions (drawn up front
       from a seeded numpy rng, so sampling is not timed), calling ``reset`` whenever an
       episode terminates or truncates;
    b. ``gym.make``: ``gymnasium.make("SpecDecode-v0", preset=...)``, the same with the
       registration's wrappers (order enforcing, passive env checker, time limit);
    c. ``bare sim``: the simulator loop alone, ``Simulator(scenario.requests.window(0, 60, 1.0),
       scenario.cost, scenario.acceptance, scenario.config, seed=0)`` then
       ``while (s := sim.prepare()) is not None: sim.execute(k, w)`` with a fixed action
       (``--k``/``--width``, default k=2, width=1), recreating the simulator when it ends.

    Construction of the env / scenario (reading the Azure arrivals) is not timed; resets
    and simulator re-creation are.  Each row prints steps/s, the number of episodes run
    and the ratio to a 20,000 steps/s target.

How to run
    python bench/bench_env.py
    python bench/bench_env.py --steps 10000
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import gymnasium as gym
import numpy as np

import envs  # noqa: F401  (registers SpecDecode-v0)
from envs.scenario import Scenario
from envs.simulator import Simulator
from envs.spec_env import SpecDecodeEnv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_line  # noqa: E402

PRESETS = ("h100-llama3-8b-eagle", "h100-llama3-8b-tree-drift")
TARGET_STEPS_PER_S = 20_000


def bench_env(env: gym.Env, n_steps: int, seed: int) -> tuple[float, int]:
    """Step ``env`` ``n_steps`` times with random actions; return (seconds, episodes started)."""
    actions = np.random.default_rng(seed).integers(env.action_space.n, size=n_steps).tolist()
    t0 = time.perf_counter()
    env.reset(seed=seed)
    episodes = 1
    step = env.step
    for a in actions:
        _, _, terminated, truncated, _ = step(a)
        if terminated or truncated:
            env.reset()
            episodes += 1
    return time.perf_counter() - t0, episodes


def bench_sim(scenario: Scenario, n_steps: int, k: int, width: int, seed: int) -> tuple[float, int]:
    """Run the bare prepare/execute loop for ``n_steps`` steps; return (seconds, simulators created)."""
    window = scenario.requests.window(0, 60, 1.0)
    if len(window) == 0:
        raise SystemExit(f"no request arrives in the first 60 s of {scenario.name}")
    done = 0
    sims = 0
    t0 = time.perf_counter()
    while done < n_steps:
        sim = Simulator(window, scenario.cost, scenario.acceptance, scenario.config, seed=seed)
        sims += 1
        prepare, execute = sim.prepare, sim.execute
        while done < n_steps and prepare() is not None:
            execute(k, width)
            done += 1
    return time.perf_counter() - t0, sims


def row(preset: str, what: str, n_steps: int, seconds: float, episodes: int) -> str:
    sps = n_steps / seconds
    return (f"{preset:<27} {what:<9} {n_steps:>8,} {seconds:>8.2f} {sps:>10,.0f} {episodes:>8} "
            f"{sps / TARGET_STEPS_PER_S:>9.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50_000, help="steps per measurement (default 50,000)")
    ap.add_argument("--seed", type=int, default=0, help="seed for resets, actions and simulators (default 0)")
    ap.add_argument("--k", type=int, default=2, help="fixed speculative length for the bare simulator (default 2)")
    ap.add_argument("--width", type=int, default=1, help="fixed tree width for the bare simulator (default 1)")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), help=f"presets to run (default {PRESETS})")
    args = ap.parse_args(argv)

    print(machine_line(f"numpy {np.__version__}", f"gymnasium {gym.__version__}"))
    print(f"steps per row: {args.steps:,}; target {TARGET_STEPS_PER_S:,} steps/s; "
          f"bare sim action k={args.k}, width={args.width}")
    print()
    header = (f"{'preset':<27} {'variant':<9} {'steps':>8} {'seconds':>8} {'steps/s':>10} {'episodes':>8} "
              f"{'x target':>9}")
    print(header)
    print("-" * len(header))
    for preset in args.presets:
        raw = SpecDecodeEnv(preset=preset)
        print(row(preset, "raw env", args.steps, *bench_env(raw, args.steps, args.seed)), flush=True)
        raw.close()

        wrapped = gym.make("SpecDecode-v0", preset=preset)
        print(row(preset, "gym.make", args.steps, *bench_env(wrapped, args.steps, args.seed)), flush=True)
        wrapped.close()

        scenario = Scenario.from_preset(preset)
        print(row(preset, "bare sim", args.steps, *bench_sim(scenario, args.steps, args.k, args.width, args.seed)),
              flush=True)
    print()
    print("episodes: resets (env rows) or simulators created (bare sim rows); x target = steps/s / 20,000.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
