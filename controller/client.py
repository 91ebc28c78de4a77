"""Engine-side client of the sidecar: the step path is a list index, the network is elsewhere.

The vLLM plugin calls two methods on its step path, and neither touches the network:

- :meth:`SidecarClient.lookup` at schedule time: the ``(k, width)`` for the batch size
  from the newest decision table (ARCHITECTURE.md contract 4) -- an attribute read, a clock
  read and a list index (~1 us);
- :meth:`SidecarClient.record_step` after the step: appends the finished step's
  ``spec-trace/1`` fields to a bounded queue (~0.3 us; no lock, no syscall while steps flow).

A daemon thread posts the queued steps to ``POST /v1/decide`` over one persistent
connection and swaps in the decision it gets back (pipelined: the table for step n+1 is
fetched while step n+1 is already scheduled with the previous one).  While steps flow it
naps ``poll_s`` (0.5 ms) between sends instead of being woken per step -- waking a thread
costs the step path a futex syscall, 15-40 us measured here; after ``park_after_s`` without
steps it parks on an event that the next step sets.  With nothing to send it refreshes
every ``stale_after_s / 2``, which also picks up a reloaded policy.

**Transport** (measured by ``bench/bench_sidecar.py``, ARCHITECTURE.md numbers): stdlib
``http.client`` keep-alive (~0.4 ms a call, httpx ~0.85 ms) over TCP loopback, or over a Unix
socket with ``url="unix:///path/to.sock"``.  The call is off the critical path, so its
latency only sets how fresh the table is.

**Fallbacks** (counted by reason, reported to the sidecar's ``spec_controller_fallbacks_total``):
a table older than ``stale_after_s`` is still used (``stale``: the last good decision); one
older than ``max_age_s`` is not (``expired``: the configured static choice), nor is there a
table before the first answer (``no_decision``).  A refused connection keeps the queued
steps and retries with exponential backoff (with jitter, capped); a timeout, an HTTP error
or a garbage answer drops that batch (it may have been applied) and counts the error.
Nothing the sidecar does -- down, slow, or answering garbage -- can fail an engine step.

    >>> c = SidecarClient(ClientConfig(url="http://127.0.0.1:9", engine_id="e0", static=(2, 1)), start=False)
    >>> c.lookup(8)  # no decision yet: the static choice
    (2, 1)
    >>> c.stats()["fallbacks"]["no_decision"]
    1
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from controller.artifact import Decision
from controller.sidecar.wire import table_from_runs

__all__ = ["ClientConfig", "SidecarClient"]

log = logging.getLogger(__name__)

FALLBACK_REASONS = ("no_decision", "stale", "expired")
ERROR_KINDS = ("connect", "timeout", "http_status", "bad_response")


@dataclass(frozen=True)
class ClientConfig:
    """Settings of one engine's client; checked at construction."""

    url: str = "http://127.0.0.1:8731"
    engine_id: str = "engine-0"
    max_k: int | None = None             # the engine's largest k (sent so the sidecar maps the table to it)
    widths: tuple[int, ...] | None = None  # tree widths the engine supports
    static: tuple[int, int] = (0, 1)     # the fallback choice for every batch size
    max_num_seqs: int = 256
    timeout_s: float = 0.25              # connect and read timeout of one call
    stale_after_s: float = 1.0           # a table older than this counts as a "stale" fallback
    max_age_s: float = 30.0              # a table older than this is not used ("expired": static)
    max_pending: int = 4096              # queued step records kept while the sidecar is away
    max_batch: int = 256                 # step records per call
    backoff_s: tuple[float, float] = (0.05, 2.0)  # first and largest wait after a failure
    poll_s: float = 0.0005               # background nap between sends while steps flow
    park_after_s: float = 0.05           # no step for this long: park until the next one
    token: str | None = None             # not needed for /v1/decide; kept for symmetry with PUT
    extra_headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        u = urlsplit(self.url)
        if u.scheme not in ("http", "unix") or (u.scheme == "http" and not u.hostname) or (
                u.scheme == "unix" and not u.path):
            raise ValueError(f"url must be http://HOST:PORT or unix:///path/to.sock, got url={self.url!r}")
        if not 0 < self.timeout_s <= 60:
            raise ValueError(f"timeout_s must be in (0, 60], got timeout_s={self.timeout_s}")
        if not 0 < self.stale_after_s <= self.max_age_s:
            raise ValueError(f"need 0 < stale_after_s <= max_age_s, got stale_after_s={self.stale_after_s}, "
                             f"max_age_s={self.max_age_s}")
        if not 0 < self.poll_s <= self.park_after_s:
            raise ValueError(f"need 0 < poll_s <= park_after_s, got poll_s={self.poll_s}, "
                             f"park_after_s={self.park_after_s}")
        if self.max_pending < 1 or self.max_batch < 1:
            raise ValueError(f"max_pending and max_batch must be >= 1, got {self.max_pending}, {self.max_batch}")
        lo, hi = self.backoff_s
        if not 0 < lo <= hi:
            raise ValueError(f"backoff_s must be (first, largest) with 0 < first <= largest, got {self.backoff_s}")
        k, w = self.static
        if k < 0 or w < 1 or (self.max_k is not None and k > self.max_k):
            raise ValueError(f"static=(k, width) must have 0 <= k <= max_k and width >= 1, got {self.static}")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


class _BadResponse(ValueError):
    pass


class SidecarClient:
    """One engine's connection to its sidecar (module docstring).  Thread-safe for one step
    thread plus the client's own background thread."""

    def __init__(self, config: ClientConfig, *, start: bool = True):
        self.config = c = config
        self._static = Decision.static(c.static[0], c.static[1], max_num_seqs=c.max_num_seqs, version="static")
        self._current: tuple[Decision, float] | None = None  # (table, monotonic time received)
        self._pending: deque[dict] = deque(maxlen=c.max_pending)
        self._requests: deque[dict] = deque(maxlen=c.max_pending)  # finished requests, ride with the steps
        self._wake = threading.Event()
        self._parked = False  # the background thread waits on _wake (set only then: a wake is a syscall)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._conn_used = False
        # counters: each written by one thread only (fallbacks/dropped: step thread; the rest: background)
        self._fb_no_decision = self._fb_stale = self._fb_expired = 0
        self._dropped = 0           # step thread: appends to a full queue
        self._dropped_requests = 0  # step thread: request records beyond a full queue
        self._requeue_dropped = 0   # background thread: a failed batch that no longer fits back
        self._errors = dict.fromkeys(ERROR_KINDS, 0)
        self._calls_ok = 0
        self._reported: dict[str, int] = {}
        self._headers = {"Content-Type": "application/json", **c.extra_headers}
        if c.token:
            self._headers["Authorization"] = f"Bearer {c.token}"
        self._last_call = 0.0
        if start:
            self.start()

    # ------------------------------------------------------------------ step path
    def lookup(self, batch_size: int) -> tuple[int, int]:
        """``(k, width)`` for this step's batch size; never blocks, never raises for an int."""
        cur = self._current
        if cur is not None:
            age = time.monotonic() - cur[1]
            if age <= self.config.stale_after_s:
                return cur[0].lookup(batch_size)
            if age <= self.config.max_age_s:
                self._fb_stale += 1
                return cur[0].lookup(batch_size)
            self._fb_expired += 1
        else:
            self._fb_no_decision += 1
        return self._static.lookup(batch_size)

    def record_step(self, record: dict[str, Any]) -> None:
        """Queue a finished step's ``spec-trace/1`` fields for the sidecar; never blocks."""
        pending = self._pending
        if len(pending) == pending.maxlen:
            self._dropped += 1
        pending.append(record)
        if self._parked:
            self._wake.set()

    def record_request(self, record: dict[str, Any]) -> None:
        """Queue a finished request's ``spec-trace/1`` request fields (arrival order, the steps' clock);
        they go with the next call, so the sidecar's recording replays the load.  Never blocks."""
        if len(self._requests) == self._requests.maxlen:
            self._dropped_requests += 1
        self._requests.append(record)

    @property
    def decision(self) -> Decision:
        """The table :meth:`lookup` would use now (the static one when none is usable)."""
        cur = self._current
        if cur is None or time.monotonic() - cur[1] > self.config.max_age_s:
            return self._static
        return cur[0]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"spec-sidecar-client-{self.config.engine_id}",
                                            daemon=True)
            self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._disconnect()

    def __enter__(self) -> SidecarClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        cur = self._current
        return {"calls_ok": self._calls_ok, "errors": dict(self._errors),
                "fallbacks": {"no_decision": self._fb_no_decision, "stale": self._fb_stale,
                              "expired": self._fb_expired},
                "dropped_steps": self._dropped + self._requeue_dropped, "pending": len(self._pending),
                "dropped_requests": self._dropped_requests, "pending_requests": len(self._requests),
                "version": cur[0].version if cur else None,
                "age_s": None if cur is None else time.monotonic() - cur[1]}

    def wait_for_decision(self, timeout: float = 5.0) -> bool:
        """Block (not on a step path!) until a decision has arrived; for start-up and tests."""
        deadline = time.monotonic() + timeout
        while self._current is None and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.005)
        return self._current is not None

    # ------------------------------------------------------------------ background
    def _run(self) -> None:
        c = self.config
        backoff = c.backoff_s[0]
        refresh = c.stale_after_s / 2
        last_step = 0.0
        while not self._stop.is_set():
            if not self._pending:
                if time.monotonic() - last_step < c.park_after_s:
                    time.sleep(c.poll_s)  # steps are flowing: nap, the next one is due soon
                else:
                    self._parked = True
                    if not self._pending:  # re-check after announcing: record_step sets _wake from now on
                        self._wake.wait(refresh)
                    self._parked = False
                    self._wake.clear()
                if self._stop.is_set():
                    break
            batch = [self._pending.popleft() for _ in range(min(c.max_batch, len(self._pending)))]
            reqs = [self._requests.popleft() for _ in range(min(c.max_batch, len(self._requests)))]
            cur = self._current
            if batch:
                last_step = time.monotonic()
            elif cur is not None and time.monotonic() - cur[1] < refresh and not reqs:
                continue
            ok, retry = self._call(batch, reqs)
            if ok:
                backoff = c.backoff_s[0]
                continue
            if retry and batch:  # nothing reached the sidecar: keep the steps, oldest first
                room = self._pending.maxlen - len(self._pending)
                keep = batch[-room:] if room else []
                self._requeue_dropped += len(batch) - len(keep)
                self._pending.extendleft(reversed(keep))
            if retry and reqs:
                room = self._requests.maxlen - len(self._requests)
                keep = reqs[-room:] if room else []
                self._dropped_requests += len(reqs) - len(keep)
                self._requests.extendleft(reversed(keep))
            self._stop.wait(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, c.backoff_s[1])

    def _payload(self, batch: list[dict], reqs: list[dict] | None = None) -> tuple[bytes, dict[str, int]]:
        c = self.config
        totals = {"no_decision": self._fb_no_decision, "stale": self._fb_stale, "expired": self._fb_expired,
                  **{f"err:{k}": v for k, v in self._errors.items()},
                  "dropped": self._dropped + self._requeue_dropped}
        delta = {k: v - self._reported.get(k, 0) for k, v in totals.items()}
        body: dict[str, Any] = {"engine_id": c.engine_id, "steps": batch}
        if reqs:
            body["requests"] = reqs
        if c.max_k is not None:
            body["max_k"] = c.max_k
        if c.widths is not None:
            body["widths"] = list(c.widths)
        if any(delta.values()):
            body["client"] = {"fallbacks": {r: delta[r] for r in FALLBACK_REASONS if delta[r]},
                              "errors": {k: delta[f"err:{k}"] for k in ERROR_KINDS if delta[f"err:{k}"]},
                              "dropped_steps": delta["dropped"]}
        return json.dumps(body, separators=(",", ":")).encode(), totals

    def _call(self, batch: list[dict], reqs: list[dict] | None = None) -> tuple[bool, bool]:
        """One POST; returns (succeeded, safe to resend the batch)."""
        try:
            body, totals = self._payload(batch, reqs)
        except (TypeError, ValueError) as exc:  # a record that is not JSON: drop it, say why once
            log.error("sidecar client: cannot encode step records (%s); dropping %d", exc, len(batch))
            return False, False
        for attempt in (0, 1):
            reused = self._conn is not None and self._conn_used
            try:
                conn = self._connection()
                conn.request("POST", "/v1/decide", body, self._headers)
                resp = conn.getresponse()
                data = resp.read()
                self._conn_used = True
            except (ConnectionRefusedError, FileNotFoundError, socket.gaierror) as exc:
                self._fail("connect", exc)
                return False, True
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self._disconnect()
                if reused and attempt == 0:
                    continue  # the server closed an idle keep-alive connection: retry once, fresh
                self._fail("connect", exc)
                return False, True
            except TimeoutError as exc:
                self._fail("timeout", exc)
                return False, False
            except (OSError, http.client.HTTPException) as exc:
                self._fail("bad_response", exc)
                return False, False
            break
        if resp.status != 200:
            self._fail("http_status", f"HTTP {resp.status}: {data[:300]!r}")
            if resp.will_close:
                self._disconnect()
            return False, resp.status in (502, 503, 504)
        try:
            decision = self._parse(data)
        except _BadResponse as exc:
            self._fail("bad_response", exc)
            self._disconnect()
            return False, False
        self._current = (decision, time.monotonic())
        self._reported = totals
        self._calls_ok += 1
        if resp.will_close:
            self._disconnect()
        return True, False

    def _parse(self, data: bytes) -> Decision:
        c = self.config
        try:
            d = json.loads(data)
            table = table_from_runs(d["runs"])
            version = d["version"]
        except (ValueError, KeyError, TypeError) as exc:
            raise _BadResponse(f"not a decision: {exc}; body {data[:200]!r}") from None
        if not isinstance(version, str):
            raise _BadResponse(f"version must be a string, found {version!r}")
        max_k = c.max_k if c.max_k is not None else 64
        widths = set(c.widths) if c.widths is not None else None
        for k, w in set(table):
            if not 0 <= k <= max_k or w < 1 or (k and widths is not None and w not in widths):
                raise _BadResponse(f"action (k={k}, width={w}) is beyond the engine (max_k={max_k}, "
                                   f"widths={sorted(widths) if widths else 'any'})")
        return Decision(table, version)

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            u = urlsplit(self.config.url)
            if u.scheme == "unix":
                conn = _UnixHTTPConnection(u.path, self.config.timeout_s)
            else:
                conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=self.config.timeout_s)
            conn.connect()
            if u.scheme == "http":
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn, self._conn_used = conn, False
        return self._conn

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass

    def _fail(self, kind: str, exc: object) -> None:
        self._errors[kind] += 1
        self._disconnect()
        if self._errors[kind] in (1, 10, 100, 1000) or self._errors[kind] % 10000 == 0:
            log.warning("sidecar client %s: %s error #%d: %s", self.config.engine_id, kind, self._errors[kind], exc)
