"""spec-trace/1 reader, validator and writer: every invariant refused with a clear message."""

import gzip
import json

import pytest

from envs.cli import main as cli_main
from envs.trace import TraceError, TraceWriter, expand_paths, iter_trace, load_trace, validate_files

HEADER = {"type": "header", "schema": "spec-trace/1", "source": "recorded", "max_k": 4, "widths": [1, 2]}
REQUEST = {"type": "request", "id": "r0", "arrival_s": 0.0, "prompt_tokens": 12, "output_tokens": 30,
           "finish_s": 1.5}
STEP = {"type": "step", "t_s": 0.1, "batch_size": 4, "prefill_tokens": 0, "waiting": 0, "kv_usage": 0.2,
        "k": 3, "width": 1, "drafts": 4, "draft_tokens": 12, "accepted_tokens": 6,
        "accepted_per_pos": [3, 2, 1], "step_ms": 18.5}


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def one_error(tmp_path, records):
    p = write_lines(tmp_path / "t.jsonl", records)
    with pytest.raises(TraceError) as exc:
        list(iter_trace(p))
    return exc.value


def test_valid_trace_reads_and_loads(tmp_path):
    p = write_lines(tmp_path / "t.jsonl", [HEADER, REQUEST, STEP, {**STEP, "t_s": 0.2, "k": 0, "drafts": 0,
                                                                   "draft_tokens": 0, "accepted_tokens": 0,
                                                                   "accepted_per_pos": []}])
    recs = list(iter_trace(p))
    assert [r["type"] for _, r in recs] == ["header", "request", "step", "step"]
    t = load_trace(p)
    assert t.n_steps == 2 and t.n_requests == 1
    assert t.accepted_per_pos.tolist() == [[3, 2, 1, 0], [0, 0, 0, 0]]
    assert len(t.sha256) == 64


def test_unknown_fields_are_ignored(tmp_path):
    p = write_lines(tmp_path / "t.jsonl", [{**HEADER, "future": 1}, {**STEP, "new_field": "x"}])
    assert len(list(iter_trace(p))) == 2


# (record mutation, field named in the error, words of the expectation)
BAD_STEPS = [
    ({"k": 5, "accepted_per_pos": [3, 2, 1, 0, 0]}, "k", "max_k=4"),
    ({"width": 4}, "width", "header's widths"),
    ({"drafts": 5}, "drafts", "batch_size=4"),
    ({"accepted_per_pos": [3, 2]}, "accepted_per_pos", "k=3"),
    ({"accepted_per_pos": [1, 2, 3]}, "accepted_per_pos", "non-increasing"),
    ({"accepted_per_pos": [5, 1, 0], "drafts": 4}, "accepted_per_pos", "drafts=4"),
    ({"accepted_tokens": 7}, "accepted_tokens", "sum(accepted_per_pos)=6"),
    ({"draft_tokens": 13}, "draft_tokens", "drafts*k*width=12"),
    ({"draft_tokens": 5, "accepted_per_pos": [3, 2, 1]}, "accepted_tokens", "draft_tokens=5"),
    ({"k": 0, "accepted_per_pos": [], "accepted_tokens": 0, "draft_tokens": 0}, "drafts", "k = 0"),
    ({"k": 0, "accepted_per_pos": [], "accepted_tokens": 0, "drafts": 0}, "draft_tokens", "k = 0"),
    ({"kv_usage": 1.5}, "kv_usage", "[0, 1]"),
    ({"step_ms": 0}, "step_ms", "> 0"),
    ({"batch_size": -1}, "batch_size", ">= 0"),
    ({"batch_size": 4.0}, "batch_size", "int"),
    ({"t_s": "soon"}, "t_s", "number"),
    ({"t_s": float("nan")}, "t_s", "number"),
    ({"accepted_per_pos": [3, 2, True]}, "accepted_per_pos", "ints"),
]


@pytest.mark.parametrize("change,field,words", BAD_STEPS)
def test_each_step_invariant_is_refused(tmp_path, change, field, words):
    err = one_error(tmp_path, [HEADER, {**STEP, **change}])
    assert err.line == 2 and err.field == field
    assert words in str(err)
    assert str(err).startswith(str(tmp_path / "t.jsonl") + ":2: " + field + ": expected ")
    assert "found" in str(err)


@pytest.mark.parametrize("drop", [k for k in STEP if k != "type"])
def test_missing_required_step_field(tmp_path, drop):
    err = one_error(tmp_path, [HEADER, {k: v for k, v in STEP.items() if k != drop}])
    assert err.field == drop and "required field is missing" in str(err)


@pytest.mark.parametrize("records,line,field,words", [
    ([REQUEST], 1, "type", "'header' on the first line"),
    ([{**HEADER, "schema": "spec-trace/2"}], 1, "schema", "spec-trace/1"),
    ([{**HEADER, "source": "made-up"}], 1, "source", "'recorded'"),
    ([{**HEADER, "max_k": 0}], 1, "max_k", ">= 1"),
    ([{**HEADER, "widths": []}], 1, "widths", "non-empty"),
    ([{**HEADER, "client": "closed-loop"}], 1, "client", "one of 'open', 'closed'"),
    ([HEADER, HEADER], 2, "type", "one header only"),
    ([HEADER, {**STEP, "type": "stepp"}], 2, "type", "one of 'header', 'request', 'step'"),
    ([HEADER, REQUEST, REQUEST], 3, "id", "unique"),
    ([HEADER, {**REQUEST, "arrival_s": 2.0, "finish_s": 3.0}, {**REQUEST, "id": "r1", "arrival_s": 1.0}], 3,
     "arrival_s", "non-decreasing"),
    ([HEADER, {**REQUEST, "finish_s": -1.0}], 2, "finish_s", ">= 0"),
    ([HEADER, {**REQUEST, "arrival_s": 2.0, "finish_s": 1.0}], 2, "finish_s", "finish_s >= arrival_s"),
    ([HEADER, {**REQUEST, "prompt_tokens": 0}], 2, "prompt_tokens", ">= 1"),
    ([HEADER, {**REQUEST, "output_tokens": 3, "agree": [-1, 2]}], 2, "agree", "a list of output_tokens=3 ints"),
    ([HEADER, {**REQUEST, "output_tokens": 3, "agree": [-1, 5, 0]}], 2, "agree", "ints in [-1, max_k=4]"),
    ([HEADER, {**REQUEST, "output_tokens": 3, "agree": [-2, 1, 0]}], 2, "agree", "-1: no draft proposed"),
    ([HEADER, {**REQUEST, "output_tokens": 2, "agree": "[-1, 0]"}], 2, "agree", "a list of output_tokens=2"),
    ([HEADER, {**STEP, "t_s": 2.0}, {**STEP, "t_s": 1.0}], 3, "t_s", "non-decreasing"),
    ([HEADER, "{not json"], 2, "<line>", "valid JSON"),
    ([HEADER, "[1, 2]"], 2, "<line>", "a JSON object"),
    ([HEADER, ""], 2, "<line>", "one JSON object per line"),
])
def test_header_request_and_order_errors(tmp_path, records, line, field, words):
    err = one_error(tmp_path, records)
    assert (err.line, err.field) == (line, field)
    assert words in str(err)


def test_agree_is_read_per_request(tmp_path):
    p = write_lines(tmp_path / "t.jsonl", [HEADER, {**REQUEST, "output_tokens": 3, "agree": [-1, 4, 0]},
                                           {**REQUEST, "id": "r1", "arrival_s": 0.5}])
    t = load_trace(p)
    assert t.agree[0].tolist() == [-1, 4, 0] and t.agree[1] is None
    assert load_trace(write_lines(tmp_path / "u.jsonl", [HEADER, REQUEST])).agree is None


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    with pytest.raises(TraceError, match="empty"):
        list(iter_trace(p))


def test_validate_reports_every_bad_line(tmp_path, capsys):
    p = write_lines(tmp_path / "bad.jsonl", [HEADER, STEP, {**STEP, "k": 9}, {**STEP, "drafts": 99}, STEP,
                                             "oops"])
    good = write_lines(tmp_path / "good.jsonl", [HEADER, STEP])
    res = validate_files([str(tmp_path / "*.jsonl")])
    assert [e.line for e in res[p]] == [3, 4, 6]
    assert res[good] == []
    assert cli_main(["validate", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "bad.jsonl:3: k:" in out and "bad.jsonl:4: drafts:" in out and "bad.jsonl:6: <line>:" in out
    assert "2 file(s) checked, 1 with errors, 3 bad line(s)" in out
    assert cli_main(["validate", str(good)]) == 0


def test_glob_matching_nothing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trace file matches"):
        expand_paths([str(tmp_path / "nope*.jsonl")])


def test_writer_roundtrip_gz_and_refuses_bad_records(tmp_path):
    path = tmp_path / "w.jsonl.gz"
    with TraceWriter(path, max_k=4, widths=[1, 2], source="synthetic", engine="test") as w:
        w.request(id="a", arrival_s=0.0, prompt_tokens=3, output_tokens=4)
        w.step(**{k: v for k, v in STEP.items() if k != "type"})
        with pytest.raises(TraceError, match=r"w.jsonl.gz:4: accepted_tokens"):
            w.step(**{**{k: v for k, v in STEP.items() if k != "type"}, "accepted_tokens": 1})
        w.step(**{**{k: v for k, v in STEP.items() if k != "type"}, "t_s": 0.3})
    with gzip.open(path, "rt") as fh:
        assert len(fh.readlines()) == 4  # the refused record was not written
    t = load_trace(path)
    assert t.header["engine"] == "test" and t.n_steps == 2 and t.request_ids == ["a"]


def test_writer_refuses_bad_header(tmp_path):
    with pytest.raises(TraceError, match="max_k"):
        TraceWriter(tmp_path / "h.jsonl", max_k=0, widths=[1], source="synthetic")
