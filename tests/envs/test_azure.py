"""Azure LLM trace 2023 importer (CC-BY 4.0, attribution kept in traces/azure/)."""

import pytest

from envs.azure import AZURE_ATTRIBUTION, DEFAULT_AZURE_CSV, read_azure_csv, write_requests_trace
from envs.cli import main as cli_main
from envs.trace import load_trace


def test_full_trace_and_attribution_shipped():
    reqs = read_azure_csv()
    assert len(reqs) == 19366
    assert 3500 < reqs.span_s < 3600
    assert reqs.prompt_tokens.min() >= 1 and reqs.output_tokens.min() >= 1
    notice = (DEFAULT_AZURE_CSV.parent / "ATTRIBUTION.md").read_text()
    assert "CC-BY 4.0" in notice and "Splitwise" in notice and "Splitwise" in AZURE_ATTRIBUTION


@pytest.mark.parametrize("scale", [0.5, 2.0, 8.0])
def test_time_scale_multiplies_arrival_rate(scale):
    base = read_azure_csv(duration_s=600.0)
    scaled = read_azure_csv(duration_s=600.0, time_scale=scale)
    assert len(scaled) == len(base)
    assert scaled.span_s == pytest.approx(base.span_s / scale)


def test_window_cuts_original_timeline():
    w = read_azure_csv(start_s=600.0, duration_s=60.0)
    assert 0 <= w.arrival_s.min() and w.arrival_s.max() < 60.0
    assert len(w) == sum(1 for t in read_azure_csv().arrival_s if 600.0 <= t < 660.0)


def test_import_writes_valid_request_trace(tmp_path):
    out = tmp_path / "az.jsonl"
    assert cli_main(["import-azure", "--time-scale", "4", "--duration-s", "120", "--out", str(out)]) == 0
    t = load_trace(out)
    assert t.header["source"] == "imported" and "CC-BY 4.0" in t.header["notes"]
    assert t.n_requests == len(read_azure_csv(duration_s=120.0)) and t.n_steps == 0
    write_requests_trace(read_azure_csv(duration_s=10.0), tmp_path / "b.jsonl.gz")
    assert load_trace(tmp_path / "b.jsonl.gz").n_requests > 0


def test_bad_csv_named_with_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\nnot-a-date,1,2\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: expected"):
        read_azure_csv(p)
    p.write_text("a,b,c\n")
    with pytest.raises(ValueError, match=r"bad.csv:1: header"):
        read_azure_csv(p)
    with pytest.raises(ValueError, match="time_scale"):
        read_azure_csv(time_scale=0)
