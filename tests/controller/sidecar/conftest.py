"""Fixtures: a policy artifact, a real sidecar (uvicorn on 127.0.0.1, a free port), step records."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from controller.artifact import PolicyArtifact
from controller.features import FeatureSpec
from controller.sidecar.app import create_app
from controller.sidecar.harness import ServerThread, http_json
from controller.sidecar.settings import SidecarSettings

ACTIONS = [(0, 1), (1, 1), (2, 1), (2, 2), (3, 1), (4, 1)]
SPEC = FeatureSpec(max_num_seqs=64, max_k=4, max_width=2)
TOKEN = "test-token-0123456789abcdef"


def make_policy(version: str = "v1", seed: int = 0, scale: float = 4.0) -> PolicyArtifact:
    """A random MLP with large weights, so the table changes with batch size and state."""
    art = PolicyArtifact.random(SPEC, ACTIONS, hidden=(16,), seed=seed)
    art.weights = [w * scale for w in art.weights]
    art.version = version
    art.provenance = {"seed": seed, "note": "test policy"}
    art.evaluation = {"goodput_vs_off": 1.0}
    return art


def step(t_s: float = 0.0, batch_size: int = 8, k: int = 2, width: int = 1, accept: float = 0.6,
         waiting: int = 0, kv_usage: float = 0.2, step_ms: float = 12.0, prefill_tokens: int = 0) -> dict:
    """A valid spec-trace/1 step record: each drafted sequence accepts a prefix of ~accept^i."""
    drafts = batch_size if k else 0
    app = [int(round(drafts * accept ** (i + 1))) for i in range(k)]
    return {"t_s": t_s, "batch_size": batch_size, "prefill_tokens": prefill_tokens, "waiting": waiting,
            "kv_usage": kv_usage, "k": k, "width": width, "drafts": drafts, "draft_tokens": drafts * k * width,
            "accepted_tokens": sum(app), "accepted_per_pos": app, "step_ms": step_ms}


def random_steps(n: int, seed: int = 0, t0: float = 0.0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [step(t_s=t0 + 0.01 * i, batch_size=int(rng.integers(1, 80)), k=int(rng.integers(0, 5)),
                 accept=float(rng.uniform(0.2, 0.9)), waiting=int(rng.integers(0, 30)),
                 kv_usage=float(rng.uniform(0, 1)), step_ms=float(rng.uniform(5, 40))) for i in range(n)]


@dataclass
class Sidecar:
    server: ServerThread
    settings: SidecarSettings
    registry: CollectorRegistry

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def service(self):
        return self.server.config.app.state.service

    def value(self, name: str, **labels) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def call(self, method: str, path: str, body=None, **kw):
        return http_json(method, self.port, path, body, **kw)

    def decide(self, engine_id: str, steps: list[dict], **extra):
        return self.call("POST", "/v1/decide", {"engine_id": engine_id, "steps": steps, **extra})


@pytest.fixture
def policy_path(tmp_path) -> Path:
    return make_policy().save(tmp_path / "policy" / "policy.json")


@pytest.fixture
def start_sidecar(tmp_path):
    """Factory: start a real sidecar with settings overrides; all are stopped after the test."""
    started: list[ServerThread] = []

    def start(policy: Path | None = None, port: int = 0, **overrides) -> Sidecar:
        if policy is None:
            policy = make_policy().save(tmp_path / f"policy{len(started)}" / "policy.json")
        settings = SidecarSettings(policy=policy, **{"watch_interval_s": 0.1, **overrides})
        registry = CollectorRegistry()
        server = ServerThread(create_app(settings, registry=registry), port=port).start()
        started.append(server)
        return Sidecar(server, settings, registry)

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def sidecar(start_sidecar, policy_path) -> Sidecar:
    return start_sidecar(policy_path)


def dump(obj) -> str:
    return json.dumps(obj, sort_keys=True)
