"""Recording of received step records to rotating ``spec-trace/1`` files.

Production traffic becomes the next training set: every step an engine reports is
written through :class:`envs.trace.TraceWriter` (the one writer of the format, which
validates each record) into ``<record_dir>/<engine_id>/<engine_id>-<UTC time>-<n>.jsonl``.
A file is rotated after ``max_steps`` records or ``max_age_s`` seconds; at most ``keep``
files are kept per engine (oldest deleted).  A record the open file cannot take (the engine
restarted so ``t_s`` went back, or it ran a ``k``/width beyond the header) starts a new
file with a header that fits.

Request records come with the decide calls too (``requests``: the engine's finished requests
in arrival order, on the steps' clock), so a recording replays its load and
``train-controller`` can train on it directly.  A request whose arrival goes back (engine
restart) is dropped and counted.  ``source`` is ``"recorded"``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envs.trace import TraceError, TraceWriter

__all__ = ["TraceRecorder"]

log = logging.getLogger(__name__)


@dataclass
class _Open:
    writer: TraceWriter
    opened: float
    lines: int
    max_k: int
    widths: tuple[int, ...]


class TraceRecorder:
    """Per-engine rotating trace files; call :meth:`write` from one thread (the event loop)."""

    def __init__(self, root: str | Path, *, max_steps: int = 100_000, max_age_s: float = 3600.0, keep: int = 48,
                 gzip: bool = False, clock=time.monotonic, header: dict[str, Any] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_steps, self.max_age_s, self.keep = max_steps, max_age_s, keep
        self.suffix = ".jsonl.gz" if gzip else ".jsonl"
        self._clock = clock
        self._header = dict(header or {})
        self._open: dict[str, _Open] = {}
        self._seq = 0

    def write(self, engine_id: str, records: list[dict], max_k: int, widths: tuple[int, ...]) -> int:
        """Write validated step records; returns how many could not be written."""
        failed = 0
        for rec in records:
            o = self._open.get(engine_id)
            need_k = max(max_k, rec["k"])
            need_w = tuple(sorted(set(widths) | {rec["width"]}))
            if (o is None or o.lines >= self.max_steps or self._clock() - o.opened >= self.max_age_s
                    or rec["k"] > o.max_k or rec["width"] not in o.widths):
                o = self._rotate(engine_id, need_k, need_w)
            try:
                o.writer.step(**rec)
                o.lines += 1
            except TraceError:  # t_s went back (engine restart): a new file
                try:
                    o = self._rotate(engine_id, need_k, need_w)
                    o.writer.step(**rec)
                    o.lines += 1
                except (TraceError, OSError) as exc:
                    log.warning("recorder: dropped a step of engine %s: %s", engine_id, exc)
                    failed += 1
            except OSError as exc:
                log.warning("recorder: cannot write %s: %s", o.writer.path, exc)
                failed += 1
        return failed

    def write_requests(self, engine_id: str, records: list[dict], max_k: int, widths: tuple[int, ...]) -> int:
        """Write finished requests (arrival order) into the engine's open file; returns how many failed."""
        o = self._open.get(engine_id)
        if o is None:
            o = self._rotate(engine_id, max_k, tuple(sorted(set(widths))))
        failed = 0
        for rec in records:
            try:
                o.writer.request(**rec)
                o.lines += 1
            except TraceError as exc:
                log.warning("recorder: dropped a request of engine %s: %s", engine_id, exc)
                failed += 1
            except OSError as exc:
                log.warning("recorder: cannot write %s: %s", o.writer.path, exc)
                failed += 1
        return failed

    def _rotate(self, engine_id: str, max_k: int, widths: tuple[int, ...]) -> _Open:
        self._close(engine_id)
        folder = self.root / engine_id
        folder.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        path = folder / f"{engine_id}-{stamp}-{self._seq:05d}{self.suffix}"
        notes = f"recorded by spec-sidecar for engine {engine_id}"
        w = TraceWriter(path, max_k=max_k, widths=list(widths), source="recorded",
                        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        **{"notes": notes, **self._header})
        o = self._open[engine_id] = _Open(w, self._clock(), 0, max_k, widths)
        self._prune(folder)
        return o

    def _prune(self, folder: Path) -> None:
        files = sorted(p for p in folder.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
        for p in files[:-self.keep]:
            try:
                p.unlink()
            except OSError:
                pass

    def flush(self) -> None:
        """Push buffered lines to the files."""
        for o in self._open.values():
            o.writer.flush()

    def files(self, engine_id: str) -> list[Path]:
        folder = self.root / engine_id
        return sorted(p for p in folder.iterdir()) if folder.exists() else []

    def _close(self, engine_id: str) -> None:
        o = self._open.pop(engine_id, None)
        if o is not None:
            o.writer.close()

    def close(self) -> None:
        for engine_id in list(self._open):
            self._close(engine_id)
