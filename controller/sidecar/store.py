"""The serving policy (swapped atomically) and the per-engine feature states.

**Atomic swap.**  A :class:`PolicySnapshot` is immutable and the store holds exactly one
reference to the current one.  A request reads ``store.current`` once and uses that
snapshot to the end, so no request can see half a policy; a reload builds and checks the
whole new snapshot first and only then replaces the reference (one assignment).  A bad
artifact raises before the swap, so the old policy keeps serving.

**Per-engine state.**  Every engine (by ``engine_id``) has its own
:class:`controller.features.FeatureState`, fed with the engine's finished steps by the
same :meth:`FeatureState.update` the training env calls (ARCHITECTURE.md contract 2).
A policy whose :class:`FeatureSpec` differs takes over the averages (they are kept in raw
units, so they stay valid under the new normalisation).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np

from controller.artifact import ArtifactError, Decision, PolicyArtifact, read_artifact_bytes
from controller.features import FeatureSpec, FeatureState, observe

__all__ = ["EngineEntry", "EngineStates", "PolicySnapshot", "PolicyStore", "decide", "decide_runs", "fold_steps",
           "load_snapshot"]

_EMA_FIELDS = ("alpha", "accept0", "tok_per_ms")


@dataclass(frozen=True)
class PolicySnapshot:
    """One loaded policy and everything derived from it; never mutated after construction."""

    artifact: PolicyArtifact
    sha256: str
    source: str
    loaded_at: float
    static: Decision  # the sidecar's own fallback: speculation off for every batch size
    _maps: dict = field(default_factory=dict, repr=False, compare=False)

    def argmax_table(self, obs: np.ndarray) -> np.ndarray:
        """The action index for every batch size at ``obs``: :meth:`PolicyArtifact.argmax_batch`."""
        return self.artifact.argmax_batch(obs)

    @property
    def version(self) -> str:
        return self.artifact.version

    @property
    def spec(self) -> FeatureSpec:
        return self.artifact.feature_spec

    def action_map(self, max_k: int | None, widths: Sequence[int] | None) -> dict | None:
        """``{policy action: action the engine can run}`` for an engine's capabilities, or None
        when every action already fits.  Same rule as :meth:`controller.actions.ActionSet.map_to_supported`:
        k clipped to the engine's max_k, the widest supported width not above the chosen one
        (else the narrowest)."""
        key = (max_k, tuple(widths) if widths else None)
        try:
            return self._maps[key]
        except KeyError:
            pass
        usable = sorted(set(widths)) if widths else None
        out = {}
        for k, w in self.artifact.actions:
            k2 = k if max_k is None else min(k, max_k)
            w2 = w
            if k2 == 0:
                w2 = 1
            elif usable is not None and w not in usable:
                below = [x for x in usable if x <= w]
                w2 = below[-1] if below else usable[0]
            out[(k, w)] = (k2, w2)
        result = None if all(a == b for a, b in out.items()) else out
        self._maps[key] = result  # benign race: both writers compute the same value
        return result


def load_snapshot(data: bytes | dict, source: str) -> PolicySnapshot:
    """Parse and check an artifact (file bytes or a decoded dict); raise :class:`ArtifactError`."""
    if isinstance(data, (bytes, bytearray)):
        sha = hashlib.sha256(data).hexdigest()
        try:
            d = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{source}: not valid JSON ({exc})") from None
    else:
        d = data
        sha = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()
    art = PolicyArtifact.from_dict(d, source)
    _check_spec(art.feature_spec, source)
    try:  # a forward pass at a fresh state proves the weights run before anything is swapped
        static = Decision.static(0, 1, max_num_seqs=art.feature_spec.max_num_seqs, version=f"{art.version}:static")
        art.decision(FeatureState(art.feature_spec), waiting=0, kv_usage=0.0, prefill_pending=0)
    except (ValueError, TypeError, ZeroDivisionError, FloatingPointError) as exc:
        raise ArtifactError(f"{source}: the policy does not evaluate ({exc})") from None
    return PolicySnapshot(art, sha, source, time.time(), static)


def _check_spec(spec: FeatureSpec, source: str) -> None:
    """FeatureSpec does not check its own fields; a served one must be sane numbers."""
    for name in ("max_num_seqs", "max_k", "max_width", "token_budget"):
        v = getattr(spec, name)
        if type(v) is not int or not 1 <= v <= 1 << 16:
            raise ArtifactError(f"{source}: feature_spec.{name}: expected an int in [1, 65536], found {v!r}")
    for name in ("ema", "accept_prior"):
        v = getattr(spec, name)
        if type(v) not in (int, float) or not 0 <= v <= 1:
            raise ArtifactError(f"{source}: feature_spec.{name}: expected a number in [0, 1], found {v!r}")


class PolicyStore:
    """Holds the current :class:`PolicySnapshot`; :meth:`swap` is the only writer."""

    def __init__(self, snapshot: PolicySnapshot):
        self.current = snapshot

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> PolicyStore:
        return cls(read_policy_file(path))

    def swap(self, snapshot: PolicySnapshot) -> PolicySnapshot:
        old, self.current = self.current, snapshot
        return old


def read_policy_file(path: str | os.PathLike) -> PolicySnapshot:
    return load_snapshot(read_artifact_bytes(path), str(path))


@dataclass
class EngineEntry:
    """One engine's feature state and what the next decision needs from its last step."""

    state: FeatureState
    last_seen: float = 0.0
    steps: int = 0
    batch_size: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefill_tokens: int = 0
    max_k: int | None = None
    widths: tuple[int, ...] | None = None

    def adopt(self, spec: FeatureSpec) -> None:
        """Move to a new FeatureSpec keeping the averages (raw units)."""
        if self.state.spec == spec:
            return
        new = FeatureState(spec)
        for name in _EMA_FIELDS:
            setattr(new, name, getattr(self.state, name))
        self.state = new


class EngineStates:
    """``engine_id -> EngineEntry``, least recently seen evicted past ``max_engines``."""

    def __init__(self, max_engines: int = 1024, clock=time.monotonic):
        self.max_engines = max_engines
        self._clock = clock
        self._entries: OrderedDict[str, EngineEntry] = OrderedDict()

    def get(self, engine_id: str, spec: FeatureSpec) -> EngineEntry:
        e = self._entries.get(engine_id)
        if e is None:
            e = EngineEntry(FeatureState(spec))
            self._entries[engine_id] = e
            while len(self._entries) > self.max_engines:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(engine_id)
            e.adopt(spec)
        e.last_seen = self._clock()
        return e

    def peek(self, engine_id: str) -> EngineEntry | None:
        return self._entries.get(engine_id)

    def connected(self, ttl_s: float) -> int:
        """Engines seen within ``ttl_s`` (entries are ordered by last seen, newest last)."""
        cutoff = self._clock() - ttl_s
        n = 0
        for e in reversed(self._entries.values()):
            if e.last_seen < cutoff:
                break
            n += 1
        return n

    def summary(self) -> list[dict[str, Any]]:
        now = self._clock()
        return [{"engine_id": k, "steps": e.steps, "seen_s_ago": round(now - e.last_seen, 3),
                 "batch_size": e.batch_size, "waiting": e.waiting, "kv_usage": e.kv_usage}
                for k, e in self._entries.items()]

    def __len__(self) -> int:
        return len(self._entries)


def fold_steps(entry: EngineEntry, steps: Sequence[Any]) -> None:
    """Feed finished steps (objects with the trace step fields) into the engine's state.

    ``k`` and ``width`` are clipped to the policy's FeatureSpec (``accepted_per_pos`` is cut to k).
    """
    st = entry.state
    spec = st.spec
    for s in steps:
        k = min(s.k, spec.max_k)
        st.update(s.batch_size, k, min(s.width, spec.max_width), s.drafts, s.accepted_per_pos[:k] if k else (),
                  s.step_ms, s.batch_size + s.accepted_tokens)
    if steps:
        last = steps[-1]
        entry.steps += len(steps)
        entry.batch_size, entry.waiting, entry.kv_usage = last.batch_size, last.waiting, last.kv_usage
        entry.prefill_tokens = last.prefill_tokens


def decide_runs(snapshot: PolicySnapshot, entry: EngineEntry,
                prefill_pending: int | None = None) -> tuple[list[list[int]], tuple[int, int]]:
    """:func:`decide` in wire form (``[first_batch, last_batch, k, width]`` runs) plus the action at
    the engine's current batch size, without building the 257-entry table in Python.

    Same choices as :meth:`PolicyArtifact.decision` (the shared :func:`observe` and
    :func:`batch_sweep`, the artifact's argmax via :meth:`PolicySnapshot.argmax_table`,
    batch 0 off); a test holds the two equal.  This is the sidecar's per-request path, where
    the Python table cost ~50 us and the float64 forward pass ~170 us (64x64 MLP).
    """
    art = snapshot.artifact
    spec = art.feature_spec
    pending = entry.prefill_tokens if prefill_pending is None else prefill_pending
    obs = observe(entry.state, 0, entry.waiting, entry.kv_usage, pending)
    n = spec.max_num_seqs + 1
    idx = snapshot.argmax_table(obs)
    starts = np.flatnonzero(np.diff(idx)) + 1
    bounds = [0, *starts.tolist(), n]
    actions = art.actions
    amap = snapshot.action_map(entry.max_k, entry.widths)
    runs: list[list[int]] = []
    for lo, hi in pairwise(bounds):
        a = actions[idx[lo]]
        if amap is not None:
            a = amap.get(a, a)
        if lo == 0:  # nothing to draft for at batch 0
            if hi > 1:
                runs.append([1, hi - 1, a[0], a[1]])
            runs.insert(0, [0, 0, 0, 1])
            continue
        if runs and runs[-1][2] == a[0] and runs[-1][3] == a[1]:
            runs[-1][1] = hi - 1
        else:
            runs.append([lo, hi - 1, a[0], a[1]])
    if len(runs) > 1 and runs[0][2:] == runs[1][2:]:
        runs[0][1] = runs.pop(1)[1]
    b = min(entry.batch_size, n - 1)
    for lo, hi, k, w in runs:
        if lo <= b <= hi:
            return runs, (k, w)
    raise AssertionError("runs cover 0..max_num_seqs")


def decide(snapshot: PolicySnapshot, entry: EngineEntry, prefill_pending: int | None = None) -> Decision:
    """The decision table for the engine's coming steps (contract 4), mapped to what the
    engine can run.  The same call serves the embedded mode and the sidecar."""
    pending = entry.prefill_tokens if prefill_pending is None else prefill_pending
    d = snapshot.artifact.decision(entry.state, entry.waiting, entry.kv_usage, pending)
    amap = snapshot.action_map(entry.max_k, entry.widths)
    if amap is not None:
        d = Decision(tuple(amap.get(a, a) for a in d.table), d.version)
    return d
