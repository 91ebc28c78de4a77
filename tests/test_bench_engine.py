"""bench/bench_engine.py's choice of training traces (no engine: the helpers only)."""

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_engine", ROOT / "bench" / "bench_engine.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_engine"] = mod  # its dataclasses look their module up
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("bench_engine", None)


def _trace(path: Path, method: str, hardware: str) -> str:
    head = {"type": "header", "schema": "spec-trace/1", "source": "recorded", "method": method,
            "hardware": hardware, "max_k": 4}
    with gzip.open(path, "wt") as fh:
        fh.write(json.dumps(head) + "\n")
    return str(path)


def test_traces_for_picks_the_method_from_each_header(bench, tmp_path):
    a = _trace(tmp_path / "a.jsonl.gz", "ngram", "x")
    _trace(tmp_path / "b.jsonl.gz", "draft_model", "x")
    c = _trace(tmp_path / "c.jsonl.gz", "ngram", "x")
    assert bench.traces_for("ngram", [str(tmp_path / "*.jsonl.gz")]) == [a, c]
    # the default: the shipped traces of that method
    shipped = bench.traces_for("draft_model", None)
    assert shipped and all("cpu-tiny-draft_model." in s for s in shipped)


def test_traces_for_names_the_patterns_when_nothing_fits(bench, tmp_path):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        bench.traces_for("ngram", [str(tmp_path / "none*.jsonl")])
    _trace(tmp_path / "d.jsonl.gz", "draft_model", "x")
    with pytest.raises(FileNotFoundError, match="record-trace --method ngram"):
        bench.traces_for("ngram", [str(tmp_path / "*.jsonl.gz")])


def test_trace_header_refuses_a_file_without_one(bench, tmp_path):
    p = tmp_path / "steps.jsonl"
    p.write_text(json.dumps({"type": "step"}) + "\n")
    with pytest.raises(ValueError, match="steps.jsonl: line 1 is not a spec-trace header"):
        bench.trace_header(str(p))


def test_hardware_note_only_for_other_hardware(bench, tmp_path):
    from serving_patch.engine_hook import _hardware

    here = _trace(tmp_path / "here.jsonl.gz", "ngram", _hardware())
    assert bench.hardware_note([here]) is None
    there = _trace(tmp_path / "there.jsonl.gz", "ngram", "2-core x86_64 CPU (Some Other CPU)")
    note = bench.hardware_note([here, there])
    assert "Some Other CPU" in note and _hardware() in note and "--traces" in note
