"""The live engine's ``spec-trace/1`` recorder (writes through :class:`envs.trace.TraceWriter`).

The scheduler hook (:mod:`serving_patch.engine_hook`) calls :meth:`TraceRecorder.arrived`
when a request is added, :meth:`TraceRecorder.finished` when it is freed and
:meth:`TraceRecorder.step` after every engine step.  Step records are written as they come
(each is already in time order).  Request records must appear in arrival order with their
output size and finish time, so they are buffered from arrival until every earlier request
has finished, then written; requests still running at :meth:`close` are written with the
tokens they had (``finish_s`` omitted), those with no output token are dropped (the format
needs ``output_tokens >= 1``).

Times: ``t_s`` and ``arrival_s`` count from the first request the engine saw (not from
engine start, so a trace does not begin with warm-up idle time).  Arrival times come from
vLLM's ``Request.arrival_time`` (wall clock), step times from ``time.monotonic``; both are
mapped to the same origin.

Cost: one ``TraceWriter.step`` call per step (validation, ``json.dumps``, a buffered gzip
write), ~30 us, measured by ``bench/bench_engine.py`` against the step time.  A failure
(disk full, a record that does not validate) disables the recorder, is logged once and
counted; it never reaches the engine.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from typing import Any

from envs.trace import TraceWriter

__all__ = ["RequestOrder", "TraceRecorder"]

log = logging.getLogger(__name__)


class RequestOrder:
    """Finished requests released in arrival order: a request's record is ready once every
    earlier arrival has finished (``spec-trace/1`` wants request records in arrival order, with
    their output size).  Used by the recorder and, for the sidecar, by the step controller.

        >>> o = RequestOrder()
        >>> o.arrived("a", 1.0, 10); o.arrived("b", 2.0, 5)
        >>> o.finished("b", 3, 4.0)
        []
        >>> [r["id"] for r in o.finished("a", 7, 5.0)]
        ['a', 'b']
    """

    def __init__(self):
        # id -> [arrival_s, prompt, output, finish_s | None, request | None]
        self._pending: OrderedDict[str, list] = OrderedDict()
        self._last_arrival = 0.0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._pending)

    def arrived(self, request_id: str, arrival_s: float, prompt_tokens: int, request: Any = None) -> None:
        """``request`` (vLLM's Request, optional) lets :meth:`drain` read the output size of unfinished ones."""
        arrival = max(self._last_arrival, arrival_s, 0.0)  # arrival order = add order
        self._last_arrival = arrival
        self._pending[request_id] = [arrival, max(1, int(prompt_tokens)), 0, None, request]

    def finished(self, request_id: str, output_tokens: int, finish_s: float) -> list[dict[str, Any]]:
        entry = self._pending.get(request_id)
        if entry is None:
            return []
        entry[2] = int(output_tokens)
        entry[3] = max(entry[0], finish_s)
        entry[4] = None
        return self.drain()

    def drain(self, final: bool = False) -> list[dict[str, Any]]:
        """The records ready now (``final``: every one, unfinished ones with the tokens they have)."""
        pending, out = self._pending, []
        while pending:
            rid, (arrival, prompt, output, finish, req) = next(iter(pending.items()))
            if finish is None and not final:
                break
            del pending[rid]
            if finish is None and req is not None:
                output = int(getattr(req, "num_output_tokens", 0) or 0)
            if output < 1:
                self.dropped += 1
                continue
            rec = {"id": rid, "arrival_s": arrival, "prompt_tokens": prompt, "output_tokens": output}
            if finish is not None:
                rec["finish_s"] = finish
            out.append(rec)
        return out


class TraceRecorder:
    def __init__(self, path: str | os.PathLike, *, max_k: int, header: dict[str, Any]):
        self.path = str(path)
        self._writer = TraceWriter(path, max_k=max(1, max_k), widths=[1], source="recorded", **header)
        self._t0_mono: float | None = None
        self._t0_wall: float | None = None
        self._order = RequestOrder()
        self._last_t = 0.0
        self.steps = 0
        self.requests = 0
        self.errors = 0
        self.ns = 0  # time spent in this recorder (step path), for the overhead figure
        self.closed = False

    # ------------------------------------------------------------------ clock
    def _origin(self) -> None:
        if self._t0_mono is None:
            self._t0_mono = time.monotonic()
            self._t0_wall = time.time()

    def rel_mono(self, t: float) -> float:
        self._origin()
        return max(0.0, t - self._t0_mono)

    # ------------------------------------------------------------------ records
    def arrived(self, request_id: str, arrival_wall: float, prompt_tokens: int, request: Any = None) -> None:
        """``request`` (vLLM's Request, optional) lets :meth:`close` read the output size of unfinished ones."""
        if self.closed:
            return
        self._origin()
        self._order.arrived(request_id, arrival_wall - self._t0_wall, prompt_tokens, request)

    def finished(self, request_id: str, output_tokens: int, now_mono: float) -> None:
        if self.closed:
            return
        self._write_requests(self._order.finished(request_id, output_tokens, self.rel_mono(now_mono)))

    def _write_requests(self, records: list[dict[str, Any]]) -> None:
        for rec in records:
            self._guard(self._writer.request, rec)
            self.requests += 1

    @property
    def dropped_requests(self) -> int:
        return self._order.dropped

    def step(self, rec: dict[str, Any]) -> None:
        """Write one step (``rec`` holds every required ``step`` field; ``t_s`` relative already)."""
        if self.closed:
            return
        t = rec["t_s"]
        if t < self._last_t:  # clocks are monotonic; guard against float rounding only
            rec["t_s"] = t = self._last_t
        self._last_t = t
        self._guard(self._writer.step, rec)
        self.steps += 1

    def _guard(self, fn, rec: dict) -> None:
        try:
            fn(**rec)
        except Exception as exc:  # noqa: BLE001 -- the recorder must never fail the engine
            self.errors += 1
            if self.errors == 1:
                log.error("spec-controller recorder: %s; recording stops (the engine keeps serving)", exc)
            self.close(flush=False)

    def close(self, flush: bool = True) -> None:
        if self.closed:
            return
        if flush:
            self._write_requests(self._order.drain(final=True))
        self.closed = True
        try:
            self._writer.close()
        except Exception as exc:  # noqa: BLE001
            self.errors += 1
            log.error("spec-controller recorder: closing %s failed: %s", self.path, exc)

    def stats(self) -> dict[str, Any]:
        return {"path": self.path, "steps": self.steps, "requests": self.requests,
                "dropped_requests": self.dropped_requests, "errors": self.errors, "closed": self.closed,
                "pending_requests": len(self._order)}
