"""Synthesise full ``spec-trace/1`` traces and check the simulator against traces.

:func:`synthesise` runs request arrivals through the simulator under a profile with an
exploring behaviour policy and writes every step, so the trace covers the actions a
policy may choose (``source: "synthetic"``).  The behaviour is goodput-greedy on the
profile (the action with the most expected tokens per predicted millisecond) and, with
probability ``explore``, a uniformly random action.

:func:`replay_fidelity` replays a trace's own requests and own actions (at each simulated
moment, the action the trace took at that time) through a simulator with profiles
*fitted* to the trace, and compares step-time distribution and throughput.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from datetime import datetime, timezone

import numpy as np

from controller.actions import ActionSet
from envs.azure import AZURE_ATTRIBUTION
from envs.profiles import AcceptanceProfile, CostModel, ProfilePreset
from envs.scenario import Scenario
from envs.simulator import EngineConfig, RequestArrays, Simulator, StepState
from envs.trace import Trace, TraceWriter

__all__ = ["greedy_policy", "replay_fidelity", "synthesise", "trace_action_policy"]


def greedy_policy(cost: CostModel, acceptance: AcceptanceProfile, actions: list[tuple[int, int]],
                  time_offset_s: float = 0.0) -> Callable[[StepState], tuple[int, int]]:
    """Goodput-greedy (SmartSpec-style): argmax over actions of expected tokens / predicted step ms."""

    def policy(s: StepState) -> tuple[int, int]:
        if s.batch_size == 0:
            return (0, 1)
        best, best_rate = (0, 1), -1.0
        for k, w in actions:
            exp_tokens = s.batch_size * (1.0 + acceptance.expected_gain(k, w, s.t_s + time_offset_s))
            rate = exp_tokens / cost.predict_one(s.batch_size, k, w, 0, s.kv_usage)
            if rate > best_rate:
                best, best_rate = (k, w), rate
        return best

    return policy


def synthesise(requests: RequestArrays, preset: ProfilePreset, path: str | os.PathLike, *, explore: float = 0.3,
               seed: int = 0, notes: str | None = None, progress: bool = False) -> dict:
    """Write a synthetic trace of ``requests`` under ``preset``; returns the run's summary."""
    if not 0.0 <= explore <= 1.0:
        raise ValueError(f"explore must be in [0, 1], got {explore}")
    config = EngineConfig(max_k=preset.max_k, widths=preset.widths, max_num_seqs=preset.max_num_seqs,
                          max_num_batched_tokens=preset.max_num_batched_tokens,
                          kv_capacity_tokens=getattr(preset.cost, "kv_capacity_tokens", 300_000))
    sim = Simulator(requests, preset.cost, preset.acceptance, config, seed=seed)
    actions = ActionSet(preset.max_k, list(preset.widths)).actions
    greedy = greedy_policy(preset.cost, preset.acceptance, actions)
    rng = np.random.default_rng(seed + 7919)
    steps: list[dict] = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(requests), desc=f"synth {os.path.basename(str(path))}", unit="req")
    done = 0
    while (state := sim.prepare()) is not None:
        if state.batch_size and rng.random() < explore:
            k, w = actions[int(rng.integers(len(actions)))]
        else:
            k, w = greedy(state)
        steps.append(sim.execute(k, w).record())
        if bar is not None and sim.completed != done:
            bar.update(sim.completed - done)
            done = sim.completed
    if bar is not None:
        bar.close()
    header = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "engine": "spec-sim (envs.simulator)", "hardware": preset.description.split(",")[0],
              "model": preset.cost.name, "draft": f"{preset.method} drafter",
              "method": preset.method, "max_num_seqs": preset.max_num_seqs,
              "max_num_batched_tokens": preset.max_num_batched_tokens,
              "kv_capacity_tokens": config.kv_capacity_tokens, "profile": preset.name,
              "explore": explore, "seed": seed,
              "notes": notes or f"Synthetic speculation data under profile {preset.name}; arrivals and sizes from "
                                f"the {AZURE_ATTRIBUTION}."}
    if requests.closed_loop:  # a closed-loop client's requests arrive when the simulation sent them
        header["client"] = "closed"
    with TraceWriter(path, max_k=preset.max_k, widths=list(preset.widths), source="synthetic", **header) as w:
        for i in np.argsort(sim.arrival_s, kind="stable").tolist():
            rec = {"id": f"r{i}", "arrival_s": float(sim.arrival_s[i]),
                   "prompt_tokens": int(requests.prompt_tokens[i]), "output_tokens": int(requests.output_tokens[i])}
            if math.isfinite(sim.finish_s[i]):
                rec["finish_s"] = float(sim.finish_s[i])
            w.request(**rec)
        for rec in steps:
            w.step(**rec)
    return sim.stats().summary()


def trace_action_policy(trace: Trace) -> Callable[[StepState], tuple[int, int]]:
    """The trace's own action at each moment: the ``(k, width)`` of its latest step at or before ``t``."""
    t = trace.steps["t_s"]
    k = trace.steps["k"].astype(int)
    w = trace.steps["width"].astype(int)
    if len(t) == 0:
        raise ValueError(f"{trace.path}: the trace has no step records to take actions from")

    def policy(s: StepState) -> tuple[int, int]:
        i = max(0, int(np.searchsorted(t, s.t_s, side="right")) - 1)
        return (int(k[i]), int(w[i]) if k[i] else 1)

    return policy


def _decode_rate(batch, accepted, step_ms) -> float:
    return float((np.sum(batch) + np.sum(accepted)) / (np.sum(step_ms) / 1000.0))


def replay_fidelity(trace: Trace, *, seed: int = 0, scenario: Scenario | None = None,
                    closed_loop: bool = True) -> dict:
    """Replay ``trace``'s requests with its own actions in a simulator fitted to it; compare.

    Returns the trace's and the replay's step-time mean / p50 / p90 / p99, mean decode batch,
    decode throughput (``(batch + accepted) / busy second``, the trace format's committed tokens),
    and the relative error of each.  ``closed_loop``: a trace recorded from a closed-loop client
    (header ``"client": "closed"``) is replayed as that client (``Scenario.from_traces``); False
    replays its recorded arrival times.
    """
    scenario = scenario or Scenario.from_traces([trace], seed=seed, closed_loop=closed_loop)
    sim = Simulator(scenario.requests, scenario.cost, scenario.acceptance, scenario.config, seed=seed)
    policy = trace_action_policy(trace)
    batch, acc, ms = [], [], []
    while (state := sim.prepare()) is not None:
        out = sim.execute(*policy(state))
        batch.append(out.batch_size)
        acc.append(out.accepted_tokens)
        ms.append(out.step_ms)
    real_ms = trace.steps["step_ms"]
    sim_ms = np.asarray(ms)
    out: dict = {"trace": str(trace.path), "steps_trace": int(len(real_ms)), "steps_replay": int(len(sim_ms)),
                 "closed_loop_requests": scenario.requests.closed_loop}
    pairs = {
        "step_ms_mean": (float(np.mean(real_ms)), float(np.mean(sim_ms))),
        "step_ms_p50": (float(np.percentile(real_ms, 50)), float(np.percentile(sim_ms, 50))),
        "step_ms_p90": (float(np.percentile(real_ms, 90)), float(np.percentile(sim_ms, 90))),
        "step_ms_p99": (float(np.percentile(real_ms, 99)), float(np.percentile(sim_ms, 99))),
        "batch_mean": (float(np.mean(trace.steps["batch_size"])), float(np.mean(batch))),
        "decode_tps": (_decode_rate(trace.steps["batch_size"], trace.steps["accepted_tokens"], real_ms),
                       _decode_rate(batch, acc, sim_ms)),
        "busy_s": (float(real_ms.sum() / 1000.0), float(sim_ms.sum() / 1000.0)),
    }
    for name, (real, sim_v) in pairs.items():
        out[name] = {"trace": round(real, 4), "replay": round(sim_v, 4),
                     "rel_error": round(abs(sim_v - real) / real, 4)}
    out["max_rel_error"] = max(v["rel_error"] for k, v in out.items() if isinstance(v, dict))
    return out
