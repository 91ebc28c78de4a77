"""Reader, validator and writer of the ``spec-trace/1`` format.

This is the one module that knows the trace format (``shared/trace-format.md``).
Every producer (recorder, synthesiser, importer) writes through :class:`TraceWriter`
and every consumer reads through :func:`iter_trace` or :func:`load_trace`, so the
format cannot drift between them.

Reading streams line by line (``.jsonl`` or ``.jsonl.gz``): a 100 MB trace is
validated in constant memory.  :func:`load_trace` keeps only compact numpy columns.

A bad line is refused with ``file:line: field: expected ..., found ...``::

    >>> TraceError("t.jsonl", 7, "k", "int in [0, max_k=4]", 9)
    TraceError('t.jsonl:7: k: expected int in [0, max_k=4], found 9')
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

SCHEMA = "spec-trace/1"
SOURCES = ("recorded", "synthetic", "imported")
RECORD_TYPES = ("header", "request", "step")

__all__ = [
    "SCHEMA",
    "ReadState",
    "Trace",
    "TraceError",
    "TraceWriter",
    "expand_paths",
    "iter_trace",
    "load_trace",
    "load_traces",
    "validate_files",
    "validate_record",
]


class TraceError(ValueError):
    """A trace line that breaks ``spec-trace/1``; names file, line, field, expected and found."""

    def __init__(self, path: str | os.PathLike, line: int, field: str, expected: str, found: Any = None):
        self.path = str(path)
        self.line = line
        self.field = field
        self.expected = expected
        self.found = found
        super().__init__(f"{self.path}:{line}: {field}: expected {expected}, found {_show(found)}")

    def __repr__(self) -> str:
        return f"TraceError({str(self)!r})"

    def __reduce__(self):
        return (TraceError, (self.path, self.line, self.field, self.expected, self.found))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- checks
# Each check returns None when the value is fine, else the "expected ..." text.


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int_ge(lo: int):
    def check(v: Any) -> str | None:
        return None if _is_int(v) and v >= lo else f"int >= {lo}"

    return check


def _num_ge(lo: float):
    def check(v: Any) -> str | None:
        return None if _is_num(v) and v >= lo else f"number >= {lo:g}"

    return check


def _num_gt(lo: float):
    def check(v: Any) -> str | None:
        return None if _is_num(v) and v > lo else f"number > {lo:g}"

    return check


def _num_in(lo: float, hi: float):
    def check(v: Any) -> str | None:
        return None if _is_num(v) and lo <= v <= hi else f"number in [{lo:g}, {hi:g}]"

    return check


def _string(v: Any) -> str | None:
    return None if isinstance(v, str) else "string"


def _nonempty_string(v: Any) -> str | None:
    return None if isinstance(v, str) and v else "non-empty string"


def _one_of(*allowed: str):
    def check(v: Any) -> str | None:
        return None if v in allowed else "one of " + ", ".join(repr(a) for a in allowed)

    return check


def _widths(v: Any) -> str | None:
    ok = isinstance(v, list) and v and all(_is_int(w) and w >= 1 for w in v) and len(set(v)) == len(v)
    return None if ok else "non-empty list of distinct ints >= 1"


# field -> (required, check)
HEADER_FIELDS: dict[str, tuple[bool, Any]] = {
    "schema": (True, _one_of(SCHEMA)),
    "source": (True, _one_of(*SOURCES)),
    "max_k": (True, _int_ge(1)),
    "widths": (True, _widths),
    "created": (False, _string),
    "engine": (False, _string),
    "hardware": (False, _string),
    "model": (False, _string),
    "draft": (False, _string),
    "method": (False, _string),
    "max_num_seqs": (False, _int_ge(1)),
    "notes": (False, _string),
    "client": (False, _one_of("open", "closed")),  # extension: how the load was sent (closed: N in flight)
}

REQUEST_FIELDS: dict[str, tuple[bool, Any]] = {
    "id": (True, _nonempty_string),
    "arrival_s": (True, _num_ge(0)),
    "prompt_tokens": (True, _int_ge(1)),
    "output_tokens": (True, _int_ge(1)),
    "finish_s": (False, _num_ge(0)),
}

STEP_FIELDS: dict[str, tuple[bool, Any]] = {
    "t_s": (True, _num_ge(0)),
    "batch_size": (True, _int_ge(0)),
    "prefill_tokens": (True, _int_ge(0)),
    "waiting": (True, _int_ge(0)),
    "kv_usage": (True, _num_in(0.0, 1.0)),
    "k": (True, _int_ge(0)),
    "width": (True, _int_ge(1)),
    "drafts": (True, _int_ge(0)),
    "draft_tokens": (True, _int_ge(0)),
    "accepted_tokens": (True, _int_ge(0)),
    "accepted_per_pos": (True, lambda v: None if isinstance(v, list) else "list of ints"),
    "step_ms": (True, _num_gt(0)),
    "draft_ms": (False, _num_ge(0)),
    "verify_ms": (False, _num_ge(0)),
}


@dataclass
class ReadState:
    """What a reader must remember across lines (time order, unique ids).

    Public so that a service validating records one at a time (the sidecar) keeps one per stream
    and calls :func:`validate_record` with it, the header record first."""

    header: dict | None = None
    last_step_t: float = -math.inf
    last_arrival: float = -math.inf
    request_ids: set = field(default_factory=set)


def _check_fields(rec: dict, spec: dict, path: str, line: int) -> None:
    for name, (required, check) in spec.items():
        if name not in rec:
            if required:
                raise TraceError(path, line, name, "a value (required field is missing)", None)
            continue
        expected = check(rec[name])
        if expected is not None:
            raise TraceError(path, line, name, expected, rec[name])


def validate_record(rec: Any, state: ReadState, path: str = "<trace>", line: int = 0) -> None:
    """Validate one decoded record against the schema and the trace so far; raise TraceError."""
    if not isinstance(rec, dict):
        raise TraceError(path, line, "<line>", "a JSON object", rec)
    kind = rec.get("type")
    if line == 1 or state.header is None:
        if kind != "header":
            raise TraceError(path, line, "type", "'header' on the first line", kind)
        _check_fields(rec, HEADER_FIELDS, path, line)
        state.header = rec
        return
    if kind == "header":
        raise TraceError(path, line, "type", "one header only, on line 1", kind)
    if kind == "request":
        _check_fields(rec, REQUEST_FIELDS, path, line)
        if rec["id"] in state.request_ids:
            raise TraceError(path, line, "id", "an id unique within the trace", rec["id"])
        if rec["arrival_s"] < state.last_arrival:
            raise TraceError(
                path, line, "arrival_s", f"non-decreasing arrival times (previous {state.last_arrival:g})",
                rec["arrival_s"])
        if "finish_s" in rec and rec["finish_s"] < rec["arrival_s"]:
            raise TraceError(path, line, "finish_s", f"finish_s >= arrival_s={rec['arrival_s']:g}", rec["finish_s"])
        if "agree" in rec:
            _check_agree(rec, state.header, path, line)
        state.request_ids.add(rec["id"])
        state.last_arrival = rec["arrival_s"]
        return
    if kind == "step":
        _check_fields(rec, STEP_FIELDS, path, line)
        _check_step_invariants(rec, state.header, path, line)
        if rec["t_s"] < state.last_step_t:
            raise TraceError(path, line, "t_s", f"non-decreasing step times (previous {state.last_step_t:g})",
                             rec["t_s"])
        state.last_step_t = rec["t_s"]
        return
    raise TraceError(path, line, "type", "one of 'header', 'request', 'step'", kind)


def _check_agree(rec: dict, header: dict, path: str, line: int) -> None:
    """The optional ``agree`` list of a request (serving_patch.agree): one int in [-1, max_k] per output token."""
    a, n, max_k = rec["agree"], rec["output_tokens"], header["max_k"]
    if not isinstance(a, list) or len(a) != n:
        raise TraceError(path, line, "agree", f"a list of output_tokens={n} ints", a if not isinstance(a, list)
                         else f"a list of {len(a)}")
    bad = next((x for x in a if not (_is_int(x) and -1 <= x <= max_k)), None)
    if bad is not None:
        raise TraceError(path, line, "agree", f"ints in [-1, max_k={max_k}] (-1: no draft proposed)", bad)


def _check_step_invariants(rec: dict, header: dict, path: str, line: int) -> None:
    max_k = header["max_k"]
    k = rec["k"]
    if k > max_k:
        raise TraceError(path, line, "k", f"int in [0, max_k={max_k}] (header max_k)", k)
    if rec["width"] not in header["widths"]:
        raise TraceError(path, line, "width", f"one of the header's widths {header['widths']}", rec["width"])
    batch, drafts = rec["batch_size"], rec["drafts"]
    if drafts > batch:
        raise TraceError(path, line, "drafts", f"drafts <= batch_size={batch}", drafts)
    app = rec["accepted_per_pos"]
    if len(app) != k or not all(_is_int(a) and a >= 0 for a in app):
        raise TraceError(path, line, "accepted_per_pos", f"list of k={k} ints >= 0", app)
    if k == 0 and (drafts != 0 or rec["draft_tokens"] != 0):
        raise TraceError(path, line, "drafts" if drafts else "draft_tokens",
                         "0 when k = 0 (speculation off)", drafts or rec["draft_tokens"])
    if any(app[i + 1] > app[i] for i in range(k - 1)):
        raise TraceError(path, line, "accepted_per_pos", "a non-increasing list", app)
    if k and app[0] > drafts:
        raise TraceError(path, line, "accepted_per_pos", f"accepted_per_pos[0] <= drafts={drafts}", app)
    accepted = rec["accepted_tokens"]
    if accepted != sum(app):
        raise TraceError(path, line, "accepted_tokens", f"sum(accepted_per_pos)={sum(app)}", accepted)
    cap = drafts * k * rec["width"]
    if rec["draft_tokens"] > cap:
        raise TraceError(path, line, "draft_tokens", f"draft_tokens <= drafts*k*width={cap}", rec["draft_tokens"])
    if accepted > rec["draft_tokens"]:
        raise TraceError(path, line, "accepted_tokens", f"accepted_tokens <= draft_tokens={rec['draft_tokens']}",
                         accepted)


# --------------------------------------------------------------------------- reading


def expand_paths(patterns: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Expand globs and directories into trace files, sorted, without duplicates.

    A pattern that matches nothing is an error that names it, so a typo is never read as
    an empty training set.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    out: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            matches = sorted(list(p.glob("*.jsonl")) + list(p.glob("*.jsonl.gz")))
        elif p.exists():
            matches = [p]
        else:
            matches = [Path(m) for m in sorted(glob.glob(str(pattern)))]
        if not matches:
            raise FileNotFoundError(
                f"no trace file matches {str(pattern)!r}: give a .jsonl/.jsonl.gz file, a directory or a glob "
                f"such as 'traces/*.jsonl*'")
        for m in matches:
            if m not in out:
                out.append(m)
    return out


def _open_text(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_trace(path: str | os.PathLike, *, errors: list[TraceError] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for every valid line of one trace, header first.

    With ``errors=None`` the first bad line raises :class:`TraceError`.  With a list, bad
    lines are appended to it and skipped, so a checker can report all of them; a bad
    header still stops the file (nothing after it can be checked).
    """
    path = Path(path)
    state = ReadState()
    with _open_text(path) as fh:
        for lineno, text in enumerate(fh, start=1):
            if not text.strip():
                err = TraceError(path, lineno, "<line>", "one JSON object per line", "an empty line")
            else:
                try:
                    rec = json.loads(text)
                    validate_record(rec, state, str(path), lineno)
                    yield lineno, rec
                    continue
                except json.JSONDecodeError as exc:
                    err = TraceError(path, lineno, "<line>", f"valid JSON ({exc.msg} at column {exc.colno})",
                                     text.strip())
                except TraceError as exc:
                    err = exc
            if errors is None or state.header is None:
                if errors is not None:
                    errors.append(err)
                    return
                raise err
            errors.append(err)
    if state.header is None:
        err = TraceError(path, 1, "type", "a header line (the file is empty)", None)
        if errors is None:
            raise err
        errors.append(err)


def validate_files(paths: Iterable[str | os.PathLike]) -> dict[Path, list[TraceError]]:
    """Check every line of every file; return ``{path: [errors]}`` (empty lists when valid)."""
    result: dict[Path, list[TraceError]] = {}
    for path in expand_paths(list(paths)):
        errs: list[TraceError] = []
        for _ in iter_trace(path, errors=errs):
            pass
        result[path] = errs
    return result


# --------------------------------------------------------------------------- columns

STEP_COLUMNS = {
    "t_s": np.float64,
    "batch_size": np.int32,
    "prefill_tokens": np.int32,
    "waiting": np.int32,
    "kv_usage": np.float32,
    "k": np.int16,
    "width": np.int16,
    "drafts": np.int32,
    "draft_tokens": np.int32,
    "accepted_tokens": np.int32,
    "step_ms": np.float64,
}


@dataclass
class Trace:
    """One loaded trace: its header, request columns and step columns (numpy arrays).

    ``accepted_per_pos`` is an ``(n_steps, max_k)`` array, zero-padded past each step's k.
    ``sha256`` is the hash of the file's bytes, recorded as provenance in artifacts.
    ``agree`` holds each request's optional ``agree`` array (:mod:`serving_patch.agree`), in
    request order, or is None when no request record has one.
    """

    path: Path
    header: dict
    sha256: str
    request_ids: list[str]
    requests: dict[str, np.ndarray]
    steps: dict[str, np.ndarray]
    accepted_per_pos: np.ndarray
    agree: list[np.ndarray | None] | None = None  # per request, its ``agree`` field (None: no request has one)

    @property
    def max_k(self) -> int:
        return int(self.header["max_k"])

    @property
    def widths(self) -> list[int]:
        return list(self.header["widths"])

    @property
    def n_steps(self) -> int:
        return len(self.steps["t_s"])

    @property
    def n_requests(self) -> int:
        return len(self.request_ids)

    @property
    def duration_s(self) -> float:
        ends = [0.0]
        if self.n_steps:
            ends.append(float(self.steps["t_s"][-1] + self.steps["step_ms"][-1] / 1000.0))
        if self.n_requests:
            ends.append(float(np.nanmax(self.requests["finish_s"])) if np.isfinite(
                self.requests["finish_s"]).any() else float(self.requests["arrival_s"][-1]))
        return max(ends)

    def summary(self) -> dict:
        s = self.steps
        out = {"path": str(self.path), "source": self.header["source"], "max_k": self.max_k,
               "widths": self.widths, "requests": self.n_requests, "steps": self.n_steps,
               "duration_s": round(self.duration_s, 3)}
        if self.n_steps:
            drafted = s["draft_tokens"].sum()
            out.update(
                mean_batch=round(float(s["batch_size"].mean()), 2),
                max_batch=int(s["batch_size"].max()),
                mean_step_ms=round(float(s["step_ms"].mean()), 3),
                spec_fraction=round(float((s["k"] > 0).mean()), 3),
                accept_rate=round(float(s["accepted_tokens"].sum() / drafted), 4) if drafted else None,
            )
        return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_trace(path: str | os.PathLike) -> Trace:
    """Read and validate one trace into numpy columns; the first bad line raises TraceError."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trace file {str(path)!r} does not exist")
    header: dict = {}
    req_ids: list[str] = []
    agree: list[np.ndarray | None] = []
    req_cols: dict[str, list] = {"arrival_s": [], "prompt_tokens": [], "output_tokens": [], "finish_s": []}
    step_cols: dict[str, list] = {name: [] for name in STEP_COLUMNS}
    app_rows: list[list[int]] = []
    for _, rec in iter_trace(path):
        kind = rec["type"]
        if kind == "step":
            for name, col in step_cols.items():
                col.append(rec[name])
            app_rows.append(rec["accepted_per_pos"])
        elif kind == "request":
            req_ids.append(rec["id"])
            req_cols["arrival_s"].append(rec["arrival_s"])
            req_cols["prompt_tokens"].append(rec["prompt_tokens"])
            req_cols["output_tokens"].append(rec["output_tokens"])
            req_cols["finish_s"].append(rec.get("finish_s", math.nan))
            agree.append(np.asarray(rec["agree"], dtype=np.int8) if "agree" in rec else None)
        else:
            header = rec
    steps = {name: np.asarray(step_cols[name], dtype=dt) for name, dt in STEP_COLUMNS.items()}
    max_k = int(header["max_k"])
    app = np.zeros((len(app_rows), max_k), dtype=np.int32)
    for i, row in enumerate(app_rows):
        if row:
            app[i, : len(row)] = row
    requests = {
        "arrival_s": np.asarray(req_cols["arrival_s"], dtype=np.float64),
        "prompt_tokens": np.asarray(req_cols["prompt_tokens"], dtype=np.int64),
        "output_tokens": np.asarray(req_cols["output_tokens"], dtype=np.int64),
        "finish_s": np.asarray(req_cols["finish_s"], dtype=np.float64),
    }
    return Trace(path, header, _sha256(path), req_ids, requests, steps, app,
                 agree if any(a is not None for a in agree) else None)


def load_traces(patterns: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Trace]:
    """Load every trace matched by the globs / paths / directories in ``patterns``."""
    return [load_trace(p) for p in expand_paths(patterns)]


# --------------------------------------------------------------------------- writing

_FLOAT_DIGITS = {"t_s": 6, "arrival_s": 6, "finish_s": 6, "kv_usage": 5, "step_ms": 4, "draft_ms": 4,
                 "verify_ms": 4}


class TraceWriter:
    """Write a ``spec-trace/1`` file (``.gz`` suffix compresses), validating every record.

    Use as a context manager::

        with TraceWriter("out.jsonl", max_k=4, widths=[1], source="synthetic") as w:
            w.request(id="r0", arrival_s=0.0, prompt_tokens=12, output_tokens=30)
            w.step(t_s=0.0, batch_size=1, ...)

    A record that would make the trace invalid raises :class:`TraceError` (naming the
    output file and the line it would have had) and is not written.
    """

    def __init__(self, path: str | os.PathLike, *, max_k: int, widths: list[int], source: str, **header: Any):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._state = ReadState()
        self._line = 0
        self._fh: TextIO = (io.TextIOWrapper(gzip.open(self.path, "wb", compresslevel=6), encoding="utf-8")
                            if self.path.suffix == ".gz" else open(self.path, "w", encoding="utf-8"))
        rec = {"type": "header", "schema": SCHEMA, "source": source, "max_k": max_k, "widths": list(widths)}
        rec.update({k: v for k, v in header.items() if v is not None})
        try:
            self._write(rec)
        except Exception:
            self._fh.close()
            raise

    @property
    def header(self) -> dict:
        return dict(self._state.header or {})

    def _write(self, rec: dict) -> None:
        for name, digits in _FLOAT_DIGITS.items():
            if name in rec and isinstance(rec[name], float):
                rec[name] = round(rec[name], digits)
        validate_record(rec, self._state, str(self.path), self._line + 1)
        self._fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self._line += 1

    def request(self, **fields: Any) -> None:
        self._write({"type": "request", **fields})

    def step(self, **fields: Any) -> None:
        self._write({"type": "step", **fields})

    def flush(self) -> None:
        """Push buffered lines to the file (a gzip member is completed only by :meth:`close`)."""
        if not self._fh.closed:
            self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
