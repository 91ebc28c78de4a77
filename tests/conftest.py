import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _synth(tmp_path_factory, name, preset, *, time_scale, duration_s, explore, seed):
    from envs.azure import read_azure_csv
    from envs.profiles import PROFILES
    from envs.synth import synthesise

    path = tmp_path_factory.mktemp("traces") / name
    synthesise(read_azure_csv(time_scale=time_scale, duration_s=duration_s), PROFILES[preset], path,
               explore=explore, seed=seed)
    return path


@pytest.fixture(scope="session")
def small_synthetic_trace(tmp_path_factory):
    """A 60-second synthetic trace (Azure arrivals at x2) under the H100 chain preset."""
    return _synth(tmp_path_factory, "small.jsonl.gz", "h100-llama3-8b-eagle", time_scale=2.0, duration_s=120.0,
                  explore=0.3, seed=1)


@pytest.fixture(scope="session")
def drift_synthetic_trace(tmp_path_factory):
    """A 240-second synthetic trace under the tree + drift preset (phases of 60 s)."""
    return _synth(tmp_path_factory, "drift.jsonl.gz", "h100-llama3-8b-tree-drift", time_scale=1.0,
                  duration_s=240.0, explore=0.4, seed=2)
