"""A scenario: the load, the engine settings and the profiles a simulator needs.

Built either from traces (``Scenario.from_traces``: requests from their ``request``
records, cost and acceptance profiles fitted from their ``step`` records, engine settings
from the header) or from a documented preset and request arrivals
(``Scenario.from_preset``: e.g. the Azure trace under the H100 roofline).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from envs.azure import read_azure_csv
from envs.profiles import PROFILES, AcceptanceProfile, CostModel, agree_walk_gain, fit_acceptance, fit_cost
from envs.simulator import EngineConfig, RequestArrays
from envs.trace import Trace, load_traces

__all__ = ["Scenario"]


@dataclass
class Scenario:
    name: str
    requests: RequestArrays
    cost: CostModel
    acceptance: AcceptanceProfile
    config: EngineConfig
    provenance: dict = field(default_factory=dict)

    @classmethod
    def from_traces(cls, traces: str | os.PathLike | Iterable | list[Trace], *, seed: int = 0,
                    acceptance_bin_s: float = 30.0, closed_loop: bool = False, **config_overrides) -> Scenario:
        """Fit a scenario to traces.  The requests to replay are every trace's request records,
        one trace after another in the given order (:meth:`RequestArrays.concat`, 10 s apart), so
        a training set of a light replay and a heavy sweep trains at both loads.  ``closed_loop``:
        replay a trace whose header says ``"client": "closed"`` as its client sent it (each request
        when the one it waited for finishes in the simulation, :func:`envs.simulator.closed_loop_links`)
        instead of at its recorded times."""
        if isinstance(traces, (str, os.PathLike)) or not all(isinstance(t, Trace) for t in traces):
            traces = load_traces(traces)
        traces = list(traces)
        with_steps = [t for t in traces if t.n_steps]
        if not with_steps:
            raise ValueError("none of the traces has step records; cost and acceptance profiles need them. Use "
                             "`spec-trace synth` to complete an imported trace with a profile.")
        with_reqs = [t for t in traces if t.n_requests]
        if not with_reqs:
            raise ValueError("none of the traces has request records; the simulator needs arrivals to replay")
        max_k = max(t.max_k for t in with_steps)
        widths = sorted({w for t in with_steps for w in t.widths})
        head = dict(with_reqs[0].header)
        head.update(max_k=max_k, widths=widths)
        config = EngineConfig.from_header(head, **config_overrides)
        cost = fit_cost(with_steps, seed=seed)
        acc = fit_acceptance(with_steps, bin_s=acceptance_bin_s)
        requests = RequestArrays.concat([RequestArrays.from_trace(t, None if closed_loop else False)
                                         for t in with_reqs])
        if requests.agree is not None:  # recorded agreement: the expectations come from walking it
            acc.walk_gain = agree_walk_gain(requests.agree, acc.depth)
            acc.report["walk_gain"] = acc.walk_gain
            acc.report["agree_requests"] = sum(a is not None for a in requests.agree)
        prov = {"traces": [{"path": str(t.path), "sha256": t.sha256, "source": t.header["source"]}
                           for t in traces],
                "cost_fit": cost.report, "acceptance_fit": acc.report, "closed_loop_requests": requests.closed_loop}
        return cls(name="+".join(t.path.name for t in traces), requests=requests,
                   cost=cost, acceptance=acc, config=config, provenance=prov)

    @classmethod
    def from_preset(cls, preset: str = "h100-llama3-8b-eagle", requests: RequestArrays | None = None,
                    **config_overrides) -> Scenario:
        """A documented preset (:data:`envs.profiles.PROFILES`) over ``requests`` (default: the
        Azure conversation trace shipped in ``traces/azure``)."""
        if preset not in PROFILES:
            raise ValueError(f"unknown profile preset {preset!r}; choose one of {sorted(PROFILES)}")
        p = PROFILES[preset]
        if requests is None:
            requests = read_azure_csv()
        kw = {"max_k": p.max_k, "widths": p.widths, "max_num_seqs": p.max_num_seqs,
              "max_num_batched_tokens": p.max_num_batched_tokens,
              "kv_capacity_tokens": getattr(p.cost, "kv_capacity_tokens", 300_000)}
        kw.update({k: v for k, v in config_overrides.items() if v is not None})
        return cls(name=preset, requests=requests, cost=p.cost, acceptance=p.acceptance, config=EngineConfig(**kw),
                   provenance={"preset": preset})
