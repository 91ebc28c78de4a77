"""Fixtures for the real-engine tests: the tiny model pair, prompts, engines, the EQSPEC report.

Engines run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so a test reads the live
controller (:func:`serving_patch.controllers`).  Engines are module- or param-scoped and
closed after use; the model pair is built once per machine (~75 s, then cached).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

EQSPEC_ROWS: list[dict] = []


@pytest.fixture(scope="session")
def tiny_models():
    from serving_patch.models import build_tiny_models

    return build_tiny_models()


@pytest.fixture(scope="session")
def prompts(tiny_models):
    """32 corpus windows of 8..96 tokens (token ids), fixed."""
    import numpy as np

    from serving_patch.load import corpus_token_ids, synth_prompts

    ids = corpus_token_ids(str(tiny_models.target / "tokenizer.json"))
    lengths = np.random.default_rng(11).integers(8, 97, size=32)
    return synth_prompts(ids, lengths, seed=5)


class Engines:
    """Builds engines on demand and closes them (controller, recorder, engine) at teardown."""

    def __init__(self, models):
        self.models = models
        self.live = []

    def make(self, method="none", **plugin):
        from serving_patch.engine import EngineSpec, make_llm

        llm = make_llm(self.models.target, self.models.draft, EngineSpec(method=method, max_num_seqs=32), **plugin)
        self.live.append(llm)
        return llm

    def close(self):
        from serving_patch import controllers
        from serving_patch.engine import close_llm

        for ctl in controllers():
            ctl.close()
        for llm in self.live:
            close_llm(llm)
        self.live.clear()


@pytest.fixture(scope="module")
def engines(tiny_models):
    e = Engines(tiny_models)
    yield e
    e.close()


def pytest_terminal_summary(terminalreporter):
    if not EQSPEC_ROWS:
        return
    tr = terminalreporter
    tr.section("EQSPEC: greedy outputs with the controller switching k vs a no-speculation engine (batch 1)")
    tr.write_line(f"{'method':<12} {'k schedule':<22} {'batch':>5} {'exact':>8} {'prefix score':>12}")
    for r in EQSPEC_ROWS:
        tr.write_line(f"{r['method']:<12} {r['schedule']:<22} {r['batch']:>5} {r['exact']:>3}/{r['n']:<4} "
                      f"{r['prefix']:>12.4f}")
