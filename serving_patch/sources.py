"""Where the engine's decision table comes from (ARCHITECTURE.md contract 4).

:meth:`DecisionSource.poll` returns a new :class:`controller.artifact.Decision` (or ``None``:
nothing new) and may raise; :meth:`DecisionSource.on_step` gets each finished step's
``spec-trace/1`` fields on the step path and must only enqueue them.  Who polls depends on the
source's :attr:`~DecisionSource.inline`:

- an *inline* source (embedded, static) is cheap, in-process CPU work with nothing to wait on:
  the engine's own thread polls it right after each step (after the step's record is folded,
  before the next schedule), and the controller's background thread only runs its
  :meth:`~DecisionSource.background` work (the embedded policy's file check and reload) every
  ``reload_s``, and after a reload polls once itself so that an idle engine has the new
  policy's table (a lock keeps the two polls apart; the step path skips, never waits).
  Polled from the background thread every 20 ms, the same work still held the GIL that the
  engine's Python needs, ran on cold caches (325 us of CPU per step inside the engine against
  ~50 us warm) and added two thread switches per poll; on the 2-core VM the learned controller
  then measured 0.992 [0.985, 0.999] of the best pooled over four load levels where it ran the
  best's k on 91-100% of its steps (session 30, ``bench/HISTORY.md``).
- the sidecar is polled by the background thread every ``refresh_s`` (its client thread does
  the HTTP); nothing on the step path waits for the network.

- :class:`EmbeddedSource` -- the trained policy artifact (``policy.json``) evaluated in this
  process with the shared feature function: the step records feed a
  :class:`controller.features.FeatureState`, and a poll that finds ``decide_every`` (4) new
  steps or a changed queue evaluates the numpy MLP once for every batch size (44 us; else it
  folds the steps in and returns).  With ``SPEC_CONTROLLER_CALIBRATE=1`` (the default) a
  :class:`controller.online.OnlineCalibration` fed the same steps overrides that table where the
  engine's own measurements say another k is faster, and decides with it (an exploration hold
  that ends decides at once).  The table covers every batch size, so a batch that grows or
  shrinks between decisions still finds its k; the features it is computed from average over
  ~150 drafted tokens and move little in 4 steps, while deciding at every step cost the
  refresher thread, which holds the GIL the engine needs, ~0.9% of a batch-1 step.
  The file is re-read when it changes (``train-controller`` replaces it atomically); a
  missing or corrupt file keeps the last good policy.
- :class:`SidecarSource` -- the FastAPI sidecar through :class:`controller.client.SidecarClient`
  (its own thread posts the steps to ``POST /v1/decide`` and swaps in the answer).
- :class:`StaticSource` -- one fixed table: ``static:K`` or a vLLM-style batch-size table.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.artifact import Decision, PolicyArtifact
from controller.features import FeatureState
from controller.online import OnlineCalibration

__all__ = ["DecisionSource", "EmbeddedSource", "EngineSnapshot", "SidecarSource", "StaticSource",
           "dense_table", "make_source"]

log = logging.getLogger(__name__)


@dataclass
class EngineSnapshot:
    """The engine state a decision is made for (read by the background thread, racy but benign)."""

    waiting: int = 0
    kv_usage: float = 0.0
    prefill_pending: int = 0


def dense_table(rows: list[tuple[int, int, int]], max_num_seqs: int) -> Decision:
    """A vLLM list-form table ``[[lo, hi, k], ...]`` as a dense :class:`Decision` over ``0..max_num_seqs``.

    Gaps and the tail carry the previous k forward, as vLLM's own
    ``build_dynamic_sd_schedule_lookup`` does.

        >>> dense_table([(1, 2, 4), (4, 5, 1)], 6).table
        ((0, 1), (4, 1), (4, 1), (4, 1), (1, 1), (1, 1), (1, 1))
    """
    rows = sorted(rows)
    table = [(0, 1)]
    k = rows[0][2]
    for b in range(1, max_num_seqs + 1):
        for lo, hi, rk in rows:
            if lo <= b <= hi:
                k = rk
                break
        table.append((k, 1))
    return Decision(tuple(table), "table")


class DecisionSource:
    name = "source"
    wants_requests = False  # whether on_request should be fed (finished requests, arrival order)
    inline = False  # polled on the engine's thread after each step (cheap, in-process) rather than by the timer

    def background(self) -> bool:
        """Slow upkeep that must stay off the step path (an inline source's file reload); the
        controller's background thread calls it every ``reload_s``.  Returns whether it changed
        what the next poll decides with (the thread then polls once itself, so an idle engine
        gets a new policy's table too)."""
        return False

    def poll(self, snapshot: EngineSnapshot) -> Decision | None:
        raise NotImplementedError

    def on_step(self, record: dict[str, Any]) -> None:
        pass

    def on_request(self, record: dict[str, Any]) -> None:
        """A finished request's ``spec-trace/1`` request fields, in arrival order (step path: enqueue only)."""

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}

    @property
    def expires(self) -> bool:
        """Whether a decision from this source can go stale (fixed tables cannot)."""
        return True


class StaticSource(DecisionSource):
    """One fixed decision, handed over on the first poll."""

    name = "static"
    inline = True

    def __init__(self, decision: Decision):
        self.decision = decision
        self._given = False

    def poll(self, snapshot: EngineSnapshot) -> Decision | None:
        if self._given:
            return None
        self._given = True
        return self.decision

    @property
    def expires(self) -> bool:
        return False


class EmbeddedSource(DecisionSource):
    """The policy artifact, in-process (module docstring)."""

    name = "embedded"
    inline = True

    def __init__(self, path: str | os.PathLike, reload_s: float = 2.0, clock=None,
                 calibration: OnlineCalibration | None = None, decide_every: int = 4):
        import time

        if type(decide_every) is not int or decide_every < 1:
            raise ValueError(f"decide_every must be an int >= 1 (steps between the policy's decisions), "
                             f"got {decide_every!r}")
        self.decide_every = decide_every
        self._since = 0  # steps folded in since the last decision
        self.decisions = 0
        self.path = Path(path)
        self.reload_s = reload_s
        self._clock = clock or time.monotonic
        self.artifact: PolicyArtifact | None = None
        self.state: FeatureState | None = None
        self._mtime: float | None = None
        self._next_check = 0.0
        self._steps: deque[dict] = deque(maxlen=4096)
        self._decided_for: tuple | None = None  # the snapshot of the last decision (None: decide)
        self.load_errors = 0
        self.loads = 0
        self.last_error: str | None = None
        self.calibration = calibration  # measured overrides of the policy's table (controller.online)
        self._maybe_reload(force=True)

    def _maybe_reload(self, force: bool = False) -> bool:
        """Check the file (every ``reload_s``) and load a new version; whether one was loaded."""
        now = self._clock()
        if not force and now < self._next_check:
            return False
        self._next_check = now + self.reload_s
        try:
            mtime = self.path.stat().st_mtime
        except OSError as exc:
            self._fail(f"policy file {str(self.path)!r} is not readable ({exc.strerror})")
            return False
        if mtime == self._mtime and self.artifact is not None:
            return False
        try:
            art = PolicyArtifact.load(self.path)
        except Exception as exc:  # noqa: BLE001 -- any bad file: keep serving on the last good policy
            self._mtime = mtime  # do not re-parse the same bad bytes every check
            self._fail(f"{exc}")
            return False
        self._mtime = mtime
        if self.artifact is None or art.feature_spec != self.artifact.feature_spec:
            self.state = FeatureState(art.feature_spec)
        self.artifact = art
        self._decided_for = None  # a new policy decides at the next poll
        self.loads += 1
        self.last_error = None
        log.info("spec-controller: loaded policy %s (version %s)", self.path, art.version)
        return True

    def _fail(self, msg: str) -> None:
        self.load_errors += 1
        if msg != self.last_error:
            log.warning("spec-controller: %s; %s", msg,
                        "keeping the last good policy" if self.artifact is not None else "using the fallback")
        self.last_error = msg

    def background(self) -> bool:
        # a stat() every reload_s; a changed file is parsed here, never on the step path
        return self._maybe_reload()

    def on_step(self, record: dict[str, Any]) -> None:
        self._steps.append(record)

    def poll(self, snapshot: EngineSnapshot) -> Decision | None:
        steps = self._steps
        state = self.state
        self._since += len(steps)
        cal = self.calibration
        while steps:
            r = steps.popleft()
            if state is not None:
                state.update(r["batch_size"], r["k"], r["width"], r["drafts"], r["accepted_per_pos"], r["step_ms"])
            if cal is not None:
                cal.observe(r)
        if self.artifact is None or state is None:
            return None
        # KV use moves at every schedule and is read again at the next decision; decide_every
        # steps, a queue change or the calibration's end of an exploration hold decide
        key = (snapshot.waiting, snapshot.prefill_pending)
        if key == self._decided_for and self._since < self.decide_every and not (cal is not None and cal.urgent):
            return None  # nothing new enough since the last decision: it stands
        self._decided_for = key
        self._since = 0
        self.decisions += 1
        d = self.artifact.decision(state, snapshot.waiting, snapshot.kv_usage, snapshot.prefill_pending)
        if cal is None:
            return d
        prior = tuple([k for k, _w in d.table])
        ks = cal.table(prior)
        if ks is prior:
            return d
        return Decision(tuple([(k, 1) for k in ks]), d.version + "+calibrated")

    def stats(self) -> dict[str, Any]:
        out = {"path": str(self.path), "loads": self.loads, "load_errors": self.load_errors,
               "decisions": self.decisions, "decide_every": self.decide_every,
               "version": self.artifact.version if self.artifact else None, "last_error": self.last_error}
        if self.calibration is not None:
            out["calibration"] = self.calibration.stats()
        return out


class SidecarSource(DecisionSource):
    """The sidecar, through the engine-side client (its own thread does the HTTP)."""

    name = "sidecar"

    def __init__(self, url: str, *, engine_id: str, max_k: int, fallback_k: int, max_num_seqs: int,
                 max_age_s: float):
        from controller.client import ClientConfig, SidecarClient

        self.max_age_s = max_age_s
        self.client = SidecarClient(ClientConfig(url=url, engine_id=engine_id, max_k=max_k, widths=(1,),
                                                 static=(min(fallback_k, max_k), 1), max_num_seqs=max_num_seqs,
                                                 max_age_s=max(max_age_s, 1.0)))

    wants_requests = True  # the sidecar records them beside the steps, so its recordings replay the load

    def on_step(self, record: dict[str, Any]) -> None:
        self.client.record_step(record)

    def on_request(self, record: dict[str, Any]) -> None:
        self.client.record_request(record)

    def poll(self, snapshot: EngineSnapshot) -> Decision | None:
        st = self.client.stats()
        if st["age_s"] is None or st["age_s"] > self.max_age_s:
            return None
        return self.client.decision

    def close(self) -> None:
        self.client.close()

    def stats(self) -> dict[str, Any]:
        return self.client.stats()


def make_source(kind: str, arg: str, *, max_k: int, max_num_seqs: int, fallback_k: int, reload_s: float,
                max_age_s: float, engine_id: str, calibration: OnlineCalibration | None = None,
                decide_every: int = 4) -> DecisionSource:
    """The source named by ``SPEC_CONTROLLER`` (see :mod:`serving_patch.config`); ``calibration``
    (the embedded policy only) overrides its table where the engine's own steps measure better."""
    from serving_patch.config import parse_table

    if kind == "embedded":
        return EmbeddedSource(arg, reload_s=reload_s, calibration=calibration, decide_every=decide_every)
    if kind == "sidecar":
        return SidecarSource(arg, engine_id=engine_id, max_k=max_k, fallback_k=fallback_k,
                             max_num_seqs=max_num_seqs, max_age_s=max_age_s)
    if kind == "static":
        return StaticSource(Decision.static(int(arg), max_num_seqs=max_num_seqs, version=f"static:{arg}"))
    if kind == "table":
        return StaticSource(dense_table(parse_table(arg), max_num_seqs))
    raise ValueError(f"no decision source of kind {kind!r}")
