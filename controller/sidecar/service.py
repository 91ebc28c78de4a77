"""The sidecar's state and its operations, apart from HTTP (routes stay thin).

One :class:`SidecarService` per app: settings, the policy store, the per-engine feature
states, the metrics and the optional recorder.  Everything runs on the server's event loop
(one worker process: the engine states live in memory), so a decide call is never
interleaved with another one or with a policy swap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from controller.artifact import ArtifactError
from controller.features import FeatureState
from controller.sidecar.metrics import SidecarMetrics
from controller.sidecar.recorder import TraceRecorder
from controller.sidecar.schemas import MAX_K, DecideRequest
from controller.sidecar.settings import SidecarSettings
from controller.sidecar.store import (
    EngineEntry,
    EngineStates,
    PolicySnapshot,
    PolicyStore,
    decide,
    decide_runs,
    fold_steps,
    load_snapshot,
)
from controller.sidecar.wire import runs_from_table
from envs.trace import TraceError, ReadState, validate_record

__all__ = ["InvalidSteps", "SidecarService"]

log = logging.getLogger("controller.sidecar")


class InvalidSteps(ValueError):
    """A step record that breaks a ``spec-trace/1`` invariant; ``loc`` points into the body."""

    def __init__(self, index: int, field: str, msg: str):
        self.loc = ["body", "steps", index, field]
        self.msg = msg
        super().__init__(f"steps[{index}].{field}: {msg}")


def _stat_key(path: Path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class SidecarService:
    def __init__(self, settings: SidecarSettings, metrics: SidecarMetrics, store: PolicyStore | None = None):
        self.settings = settings
        self.metrics = metrics
        self.store = store if store is not None else PolicyStore.from_file(settings.policy)
        self.engines = EngineStates(settings.max_engines)
        self.recorder = None
        if settings.record_dir is not None:
            self.recorder = TraceRecorder(settings.record_dir, max_steps=settings.record_max_steps,
                                          max_age_s=settings.record_max_age_s, keep=settings.record_keep,
                                          gzip=settings.record_gzip)
        self.ready = True
        self._policy_key = _stat_key(settings.policy)
        metrics.policy_swapped(self.store.current, None)
        metrics.track_engines(lambda: self.engines.connected(settings.engine_ttl_s))

    # ------------------------------------------------------------------ decide
    def decide(self, req: DecideRequest) -> bytes:
        """Fold the request's steps into the engine's state and return the encoded decision."""
        t0 = time.perf_counter()
        steps = req.steps
        if len(steps) > self.settings.max_steps_per_request:
            raise InvalidSteps(self.settings.max_steps_per_request, "<list>",
                               f"at most max_steps_per_request={self.settings.max_steps_per_request} steps per "
                               f"call, found {len(steps)}: send them in smaller batches")
        records = self._check_steps(req) if steps else []
        snap = self.store.current  # read once: this request uses one policy throughout
        entry = self.engines.get(req.engine_id, snap.spec)
        if req.max_k is not None:
            entry.max_k = req.max_k
        if req.widths is not None:
            entry.widths = tuple(sorted(set(req.widths)))
        fold_steps(entry, steps)
        m = self.metrics
        for s in steps:
            m.observe_step(s)
        if req.client is not None:
            m.observe_client(req.client)
        if self.recorder is not None and (records or req.requests):
            max_k = entry.max_k or snap.spec.max_k
            widths = entry.widths or tuple(sorted({w for _, w in snap.artifact.actions}))
            if records:
                failed = self.recorder.write(req.engine_id, records, max_k, widths)
                m.recorded_steps.inc(len(records) - failed)
                if failed:
                    m.recorder_errors.inc(failed)
            if req.requests:
                failed = self.recorder.write_requests(req.engine_id, [r.trace_fields() for r in req.requests],
                                                      max_k, widths)
                m.recorded_requests.inc(len(req.requests) - failed)
                if failed:
                    m.recorder_errors.inc(failed)
        fallback, version = None, snap.version
        try:
            runs, action = decide_runs(snap, entry, req.prefill_pending)
        except (ValueError, FloatingPointError) as exc:  # never seen; serve the static choice, say so
            log.error("policy %s failed for engine %s: %s", snap.version, req.engine_id, exc)
            runs, action = runs_from_table(snap.static.table), snap.static.lookup(entry.batch_size)
            fallback, version = "policy_error", snap.static.version
            m.fallback("policy_error")
        body = json.dumps({"engine_id": req.engine_id, "version": version, "max_num_seqs": snap.spec.max_num_seqs,
                           "runs": runs, "fallback": fallback}, separators=(",", ":")).encode()
        m.observe_decision(action, time.perf_counter() - t0)
        return body

    def _check_steps(self, req: DecideRequest) -> list[dict]:
        """Each step through :func:`envs.trace.validate_record` (the format's one validator)."""
        st = ReadState()
        widths = sorted(set(req.widths)) if req.widths else sorted({s.width for s in req.steps})
        try:
            validate_record({"type": "header", "schema": "spec-trace/1", "source": "recorded",
                             "max_k": req.max_k or MAX_K, "widths": widths}, st, "<decide>", 1)
        except TraceError as exc:  # the schema bounds max_k and widths, so this is a bug if it happens
            raise InvalidSteps(0, exc.field, f"expected {exc.expected}, found {exc.found!r}") from None
        records = []
        for i, s in enumerate(req.steps):
            rec = s.trace_fields()
            try:
                validate_record(rec, st, "<decide>", i + 2)
            except TraceError as exc:
                raise InvalidSteps(i, exc.field, f"expected {exc.expected}, found {exc.found!r}") from None
            records.append(rec)
        return records

    # ------------------------------------------------------------------ policy
    def policy_info(self, engine_id: str | None) -> dict[str, Any]:
        """What is serving, and its table at ``engine_id``'s state (a fresh state when None).

        Raises KeyError for an engine that has not called ``/v1/decide``."""
        snap = self.store.current
        if engine_id is None:
            entry = EngineEntry(FeatureState(snap.spec))
        else:
            known = self.engines.peek(engine_id)
            if known is None:
                raise KeyError(engine_id)
            entry = dataclasses.replace(known)  # a copy: adopt() must not touch the live state
            entry.adopt(snap.spec)
        d = decide(snap, entry)
        art = snap.artifact
        return {"version": art.version, "sha256": snap.sha256, "source": snap.source, "loaded_at": snap.loaded_at,
                "feature_names": list(art.feature_names), "feature_spec": art.feature_spec.to_dict(),
                "actions": [list(a) for a in art.actions], "provenance": _jsonable(art.provenance),
                "evaluation": _jsonable(art.evaluation), "engine_id": engine_id,
                "table": [list(a) for a in d.table], "ranges": d.ranges()}

    async def put_policy(self, artifact: dict) -> tuple[PolicySnapshot, bool]:
        """Check an uploaded artifact, swap it in, then persist it to the policy file
        (so a restart serves it too); returns the snapshot and whether the file was written."""
        data = json.dumps(artifact, separators=(",", ":")).encode()
        try:
            snap = await asyncio.to_thread(load_snapshot, data, "PUT")
        except ArtifactError:
            self.metrics.policy_refused("put")
            raise
        self._swap(snap, "put")
        return snap, await asyncio.to_thread(self._persist, data)

    def _persist(self, data: bytes) -> bool:
        path = self.settings.policy
        tmp = path.with_name(path.name + ".put.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("PUT /v1/policy: serving the new policy but could not write %s: %s", path, exc)
            return False
        self._policy_key = _stat_key(path)
        return True

    async def reload_file(self) -> bool:
        """Reload the policy file if its bytes changed; a bad file is refused and logged."""
        path = self.settings.policy
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            log.warning("policy file %s unreadable, keeping %s: %s", path, self.store.current.version, exc)
            self.metrics.policy_refused("file")
            return False
        if hashlib.sha256(data).hexdigest() == self.store.current.sha256:
            return False
        try:
            snap = await asyncio.to_thread(load_snapshot, data, str(path))
        except ArtifactError as exc:
            log.warning("refused policy file, keeping version %s: %s", self.store.current.version, exc)
            self.metrics.policy_refused("file")
            return False
        self._swap(snap, "file")
        return True

    def _swap(self, snap: PolicySnapshot, trigger: str) -> None:
        old = self.store.swap(snap)
        self.metrics.policy_swapped(snap, trigger)
        log.info("policy %s -> %s (%s)", old.version, snap.version, trigger)

    async def watch(self) -> None:
        """Poll the policy file (and flush the recorder) every ``watch_interval_s`` until cancelled."""
        interval = self.settings.watch_interval_s
        while True:
            await asyncio.sleep(interval)
            if self.recorder is not None:
                self.recorder.flush()
            if not self.settings.watch:
                continue
            key = _stat_key(self.settings.policy)
            if key is not None and key != self._policy_key:
                self._policy_key = key
                await self.reload_file()

    def close(self) -> None:
        self.ready = False
        if self.recorder is not None:
            self.recorder.close()


def _jsonable(x: Any) -> Any:
    """Provenance and evaluation as strict JSON (non-finite floats become None)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return str(x)
