"""The policy artifact (ARCHITECTURE.md contract 5) and the decision table (contract 4).

A policy artifact is one JSON file, loadable without torch: the feature names and their
normalisation (:class:`controller.features.FeatureSpec`), the action table, the MLP weights
for a numpy forward pass (~5 us), provenance (trace hashes, seed, library versions) and the
evaluation summary.  SB3 checkpoints may sit beside it; nothing here needs them.

The engine does not run the network every step.  The controller evaluates it once per
refresh at the current state for every batch size (:meth:`PolicyArtifact.decision`) and
hands the engine a :class:`Decision`: a list indexed by batch size, so the per-step
critical path is a list index.

    >>> art = PolicyArtifact.random(FeatureSpec(max_num_seqs=8, max_k=2), [(0, 1), (1, 1), (2, 1)], seed=0)
    >>> d = art.decision(FeatureState(art.feature_spec), waiting=0, kv_usage=0.1, prefill_pending=0)
    >>> len(d.table) == 9 and d.lookup(3) in [(0, 1), (1, 1), (2, 1)]
    True
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from controller.features import BATCH_FEATURES, FEATURE_NAMES, FeatureSpec, FeatureState, batch_sweep, observe

ARTIFACT_SCHEMA = "spec-policy/1"
ACTIVATIONS = {"tanh": np.tanh, "relu": lambda x: np.maximum(x, 0.0)}

__all__ = ["ARTIFACT_SCHEMA", "ArtifactError", "Decision", "PolicyArtifact", "read_artifact_bytes"]


class ArtifactError(ValueError):
    """A policy artifact that cannot be used; names the file, the field and the fix."""


def read_artifact_bytes(path: str | os.PathLike) -> bytes:
    """The artifact file's bytes; a missing file says how to make one."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"policy artifact {str(path)!r} does not exist; train one with "
                                f"`train-controller --trace 'traces/*.jsonl*' --out DIR`") from None


@dataclass(frozen=True)
class Decision:
    """Actions indexed by batch size: ``table[b]`` is the ``(k, width)`` for batch size ``b``.

    Batch sizes past the end use the last entry.  ``version`` names the policy that made it.
    """

    table: tuple[tuple[int, int], ...]
    version: str = ""

    def lookup(self, batch_size: int) -> tuple[int, int]:
        t = self.table
        return t[batch_size] if 0 <= batch_size < len(t) else t[-1]

    def ranges(self) -> list[list[int]]:
        """``[[lo, hi, k], ...]``: vLLM's ``num_speculative_tokens_per_batch_size`` list form (chain k)."""
        out: list[list[int]] = []
        for b, (k, _w) in enumerate(self.table):
            if b == 0:
                continue
            if out and out[-1][2] == k:
                out[-1][1] = b
            else:
                out.append([b, b, k])
        return out

    @classmethod
    def static(cls, k: int, width: int = 1, max_num_seqs: int = 256, version: str = "static") -> Decision:
        return cls(tuple([(k, width)] * (max_num_seqs + 1)), version)


@dataclass
class PolicyArtifact:
    """A self-describing MLP policy over the shared features (module docstring)."""

    feature_spec: FeatureSpec
    actions: list[tuple[int, int]]
    weights: list[np.ndarray]
    biases: list[np.ndarray]
    activation: str = "tanh"
    version: str = "0"
    provenance: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    feature_names: tuple[str, ...] = FEATURE_NAMES

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ArtifactError(f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        self.actions = [tuple(int(x) for x in a) for a in self.actions]
        self.weights = [np.asarray(w, dtype=np.float64) for w in self.weights]
        self.biases = [np.asarray(b, dtype=np.float64) for b in self.biases]
        n_in = len(self.feature_names)
        if tuple(self.feature_names) != FEATURE_NAMES:
            raise ArtifactError(f"the artifact's features {list(self.feature_names)} differ from this controller's "
                                f"{list(FEATURE_NAMES)}: retrain the policy with this version")
        if not self.weights or len(self.weights) != len(self.biases):
            raise ArtifactError("weights and biases must be non-empty lists of the same length")
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if w.ndim != 2 or b.shape != (w.shape[1],) or w.shape[0] != n_in or not np.all(np.isfinite(w)):
                raise ArtifactError(f"layer {i}: weight {w.shape} / bias {b.shape} do not chain from {n_in} inputs "
                                    f"(or hold non-finite values)")
            n_in = w.shape[1]
        if n_in != len(self.actions):
            raise ArtifactError(f"the last layer has {n_in} outputs but there are {len(self.actions)} actions")
        self._act = ACTIVATIONS[self.activation]
        self._fast: tuple | None = None  # argmax_batch(): float32 weights, batch part of layer 1
        self._tables: dict[bytes, tuple] = {}  # decision(): argmax rows -> table (the actions')

    # ------------------------------------------------------------------ inference
    def logits(self, obs: np.ndarray) -> np.ndarray:
        """Numpy forward pass; ``obs`` is ``(n_features,)`` or ``(batch, n_features)``."""
        x = np.asarray(obs, dtype=np.float64)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = x @ w + b
            if i < last:
                x = self._act(x)
        return x

    def act(self, obs: np.ndarray) -> int:
        return int(np.argmax(self.logits(obs)))

    def argmax_batch(self, obs: np.ndarray) -> np.ndarray:
        """``argmax(logits(batch_sweep(obs, 0..max_num_seqs)))``: the action index for every
        batch size at observation ``obs`` (its batch entries are ignored), computed the cheap way.

        Only the batch-size features differ between the rows, so the first layer is the batch
        part (precomputed once per artifact) plus one row for the rest; the forward pass runs
        in float32.  Any batch size whose two best logits are within a relative 1e-4 (float32
        rounding measured <= 3e-7 on a 64x64 MLP) is recomputed with the float64
        :meth:`logits` on the shared :func:`batch_sweep` rows, so the choice is always the
        float64 policy's.  ~3x cheaper than the float64 sweep; the engine's refresher and the
        sidecar's per-request path both run it.  Weights are read once: do not mutate them
        after the first call.
        """
        f32, sweep1 = self._fast or self._build_fast()
        o = np.asarray(obs, dtype=np.float32).copy()
        o[list(BATCH_FEATURES)] = 0.0
        (w0, b0), rest = f32[0], f32[1:]
        x = sweep1 + (o @ w0 + b0)
        tanh = self.activation == "tanh"
        for w, b in rest:
            x = np.tanh(x, out=x) if tanh else self._act(x)
            x = x @ w
            x += b
        idx = np.argmax(x, axis=1)
        if x.shape[1] > 1:
            top2 = np.partition(x, -2, axis=1)[:, -2:]
            close = np.flatnonzero((top2[:, 1] - top2[:, 0]) <= 1e-4 * (1.0 + np.abs(top2[:, 1])))
            if close.size:
                idx[close] = np.argmax(self.logits(batch_sweep(obs, close, self.feature_spec)), axis=1)
        return idx

    def _build_fast(self) -> tuple:
        """:meth:`argmax_batch`'s float32 weights and the batch entries' share of the first layer."""
        f32 = tuple((w.astype(np.float32), b.astype(np.float32)) for w, b in zip(self.weights, self.biases))
        spec = self.feature_spec
        rows = batch_sweep(np.zeros(len(self.feature_names), np.float32), np.arange(spec.max_num_seqs + 1), spec)
        cols = list(BATCH_FEATURES)
        self._fast = (f32, rows[:, cols] @ f32[0][0][cols])
        return self._fast

    def decision(self, state: FeatureState, waiting: int, kv_usage: float, prefill_pending: int) -> Decision:
        """The action for every batch size ``0..max_num_seqs`` at the current state (contract 4):
        :meth:`argmax_batch` at the state's observation, batch size 0 off.  The engine's
        refresher runs this once per step on a thread that holds the GIL the engine needs.
        """
        idx = self.argmax_batch(observe(state, 0, waiting, kv_usage, prefill_pending))
        idx[0] = -1  # batch size 0: nothing to draft for
        key = idx.tobytes()
        table = self._tables.get(key)
        if table is None:  # a few distinct tables recur: build each once (and hand out the same tuple)
            acts = self.actions
            table = tuple([(0, 1)] + [acts[i] for i in idx[1:].tolist()])
            if len(self._tables) < 256:
                self._tables[key] = table
        return Decision(table, self.version)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return {"schema": ARTIFACT_SCHEMA, "version": self.version, "feature_names": list(self.feature_names),
                "feature_spec": self.feature_spec.to_dict(), "actions": [list(a) for a in self.actions],
                "activation": self.activation, "weights": [w.tolist() for w in self.weights],
                "biases": [b.tolist() for b in self.biases], "provenance": self.provenance,
                "evaluation": self.evaluation}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        os.replace(tmp, path)  # atomic: a watcher never sees half a file
        return path

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> PolicyArtifact:
        if not isinstance(d, dict):
            raise ArtifactError(f"{source}: expected a JSON object, found {type(d).__name__}")
        if d.get("schema") != ARTIFACT_SCHEMA:
            raise ArtifactError(f"{source}: schema: expected {ARTIFACT_SCHEMA!r}, found {d.get('schema')!r}")
        for name in ("feature_spec", "actions", "weights", "biases"):
            if name not in d:
                raise ArtifactError(f"{source}: {name}: required field is missing")
        try:
            return cls(feature_spec=FeatureSpec(**d["feature_spec"]), actions=d["actions"],
                       weights=d["weights"], biases=d["biases"], activation=d.get("activation", "tanh"),
                       version=str(d.get("version", "0")), provenance=d.get("provenance", {}),
                       evaluation=d.get("evaluation", {}), feature_names=tuple(d.get("feature_names", ())))
        except ArtifactError as exc:
            raise ArtifactError(f"{source}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"{source}: malformed artifact ({exc})") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> PolicyArtifact:
        path = Path(path)
        data = read_artifact_bytes(path)
        try:
            d = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(d, str(path))

    @classmethod
    def random(cls, spec: FeatureSpec, actions: list[tuple[int, int]], hidden: tuple[int, ...] = (16,),
               seed: int = 0) -> PolicyArtifact:
        """An untrained artifact (for tests and smoke runs)."""
        rng = np.random.default_rng(seed)
        sizes = [len(FEATURE_NAMES), *hidden, len(actions)]
        ws = [rng.normal(0, 1 / np.sqrt(a), (a, b)) for a, b in zip(sizes[:-1], sizes[1:])]
        bs = [np.zeros(b) for b in sizes[1:]]
        return cls(spec, actions, ws, bs, version=f"random-{seed}")
