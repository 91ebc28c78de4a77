"""The plugin's settings: environment variables, read once per engine, checked at construction.

The plugin is inert unless ``SPEC_CONTROLLER`` or ``SPEC_TRACE_OUT`` is set (environment
variables reach every vLLM process, the spawned EngineCore included).

==================================  ==========================================================
``SPEC_CONTROLLER``                 the decision source (below); unset = vLLM decides k
``SPEC_CONTROLLER_FALLBACK_K``      the configured static k used when no good decision exists (0)
``SPEC_CONTROLLER_REFRESH_S``       how often the background thread polls the sidecar (0.02);
                                  the embedded policy and static tables are polled on
                                  the engine's thread after each step instead
``SPEC_CONTROLLER_MAX_AGE_S``       a table older than this is not used: static fallback (30)
``SPEC_CONTROLLER_RELOAD_S``        how often the background thread checks a policy file for a
                                  new version (2; a reload never runs on the step path)
``SPEC_CONTROLLER_EXPLORE``         fraction of steps on a uniformly random k (0; recording)
``SPEC_CONTROLLER_EXPLORE_HOLD``    steps a random k is held once drawn (1); > 1 makes each
                                  random k draft *and* verify at that k, so recorded step
                                  times belong to one k (vLLM verifies a step late)
``SPEC_CONTROLLER_LAZY_DRAFTER``    1 (default): k = 0 steps take vLLM's plain path (plain
                                  sampler, no proposer bookkeeping) and, with ``draft_model``,
                                  skip the drafter pass, k > 0 catching its KV up first
                                  (:mod:`serving_patch.drafter`); 0 keeps vLLM's own k = 0
``SPEC_CONTROLLER_CATCHUP_MAX_TOKENS``  cap on the tokens one catch-up adds to the drafter pass
                                  (0 = the drafter's buffer, max_num_batched_tokens); a
                                  longer gap keeps its newest tokens (bounds the step's time)
``SPEC_CONTROLLER_CALIBRATE``       1 (default): correct the embedded policy's table online from
                                  the engine's own steps (measured rate per batch size and k,
                                  short exploration holds next to the policy's k;
                                  :mod:`controller.online`); 0: the policy as trained
``SPEC_CONTROLLER_MIN_GAIN``        the gain over off (measured in the same batch-size bucket)
                                  the calibration needs before it keeps or starts
                                  speculating there (0.03; 0 = any gain beyond noise)
``SPEC_CONTROLLER_SPECULATE_OVER_OFF``  0 (default): where the policy says off, off stands; 1: the
                                  calibration may replace the policy's off with a k > 0 that
                                  clears the min gain on clean steps (which do not see what
                                  speculating costs a closed loop end to end: controller.online)
``SPEC_CONTROLLER_DECIDE_EVERY``    steps between the embedded policy's decisions (4); a queue
                                  change, or the calibration ending an exploration hold,
                                  decides at once.  1 = at every step (the refresher's CPU
                                  then ~3x: it holds the GIL the engine needs)
``SPEC_CONTROLLER_SEED``            seed of the exploration draws (0)
``SPEC_CONTROLLER_ENGINE_ID``       engine id reported to the sidecar (``engine-<pid>``)
``SPEC_TRACE_OUT``                  write a ``spec-trace/1`` trace of every step to this file
``SPEC_TRACE_NOTES``                free text for the trace header's ``notes``
``SPEC_CONTROLLER_ALLOW_UNTESTED``  run on a vLLM version the hook was not tested on
==================================  ==========================================================

``SPEC_CONTROLLER`` forms (``kind:argument``; a bare path means ``embedded:``)::

    embedded:/path/to/policy.json     the trained artifact, evaluated in-process (default, no network)
    sidecar:http://127.0.0.1:8731     the FastAPI sidecar (controller.client, pipelined)
    static:3                          k = 3 at every batch size (static:0 = off through the controller)
    table:[[1,4,4],[5,16,2],[17,256,0]]   a batch-size table, vLLM's list form
    cycle:0,4                         k = 0, 4, 0, 4, ... one per step (diagnostics: EQSPEC tests)
    vllm                              keep vLLM's own lookup (record only)

    >>> PluginConfig.from_env({"SPEC_CONTROLLER": "static:2"}).source
    ('static', '2')
    >>> PluginConfig.from_env({}).enabled
    False
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["SOURCE_KINDS", "PluginConfig", "parse_table"]

SOURCE_KINDS = ("embedded", "sidecar", "static", "table", "cycle", "vllm")


def parse_table(text: str) -> list[tuple[int, int, int]]:
    """``[[lo, hi, k], ...]`` (vLLM's ``num_speculative_tokens_per_batch_size`` form), checked."""
    try:
        rows = json.loads(text)
        out = [(int(lo), int(hi), int(k)) for lo, hi, k in rows]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"table must be a JSON list of [lo, hi, k] triples, got {text!r} ({exc})") from None
    if not out or out[0][0] != 1 or any(lo > hi or k < 0 for lo, hi, k in out):
        raise ValueError(f"table must start at batch size 1 with lo <= hi and k >= 0 in every row, got {text!r}")
    return out


def _float(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        v = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number in [{lo:g}, {hi:g}], got {raw!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo:g}, {hi:g}], got {v:g}")
    return v


def _int(env: Mapping[str, str], name: str, default: int, lo: int) -> int:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an int >= {lo}, got {raw!r}") from None
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return v


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1 or 0 (true/false, yes/no, on/off), got {raw!r}")


@dataclass(frozen=True)
class PluginConfig:
    source: tuple[str, str] | None = None  # (kind, argument); None = vLLM's own k
    fallback_k: int = 0
    refresh_s: float = 0.02
    max_age_s: float = 30.0
    reload_s: float = 2.0
    explore: float = 0.0
    explore_hold: int = 1
    lazy_drafter: bool = True
    catchup_max_tokens: int = 0
    calibrate: bool = True
    min_gain: float = 0.03
    speculate_over_off: bool = False
    decide_every: int = 4
    seed: int = 0
    engine_id: str = ""
    trace_out: str | None = None
    trace_notes: str | None = None

    def __post_init__(self):
        if self.source is not None:
            kind, arg = self.source
            if kind not in SOURCE_KINDS:
                raise ValueError(f"SPEC_CONTROLLER kind {kind!r} is not one of {', '.join(SOURCE_KINDS)}")
            if kind in ("embedded", "sidecar") and not arg:
                raise ValueError(f"SPEC_CONTROLLER={kind}: needs an argument (a policy path or a sidecar URL)")
            if kind == "static":
                if not arg.isdigit():
                    raise ValueError(f"SPEC_CONTROLLER=static:K needs an int K >= 0, got {arg!r}")
            elif kind == "table":
                parse_table(arg)
            elif kind == "cycle":
                try:
                    ks = [int(x) for x in arg.split(",")]
                except ValueError:
                    ks = []
                if not ks or min(ks) < 0:
                    raise ValueError(f"SPEC_CONTROLLER=cycle:K0,K1,... needs ints >= 0, got {arg!r}")
        if not 0 < self.refresh_s <= self.max_age_s:
            raise ValueError(f"need 0 < SPEC_CONTROLLER_REFRESH_S <= SPEC_CONTROLLER_MAX_AGE_S, got "
                             f"{self.refresh_s:g} and {self.max_age_s:g}")

    @property
    def enabled(self) -> bool:
        """Whether the hook does anything at all (a decision source or a recorder is configured)."""
        return self.source is not None or bool(self.trace_out)

    @property
    def controls_k(self) -> bool:
        return self.source is not None and self.source[0] != "vllm"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PluginConfig:
        env = os.environ if env is None else env
        raw = env.get("SPEC_CONTROLLER", "").strip()
        source = None
        if raw:
            kind, sep, arg = raw.partition(":")
            if kind == "vllm" and not sep:
                source = ("vllm", "")
            elif sep and kind in SOURCE_KINDS:
                source = (kind, arg.strip())
            else:  # a bare path (may itself contain ':' only as a Windows drive, not here)
                source = ("embedded", raw)
        return cls(
            source=source,
            fallback_k=_int(env, "SPEC_CONTROLLER_FALLBACK_K", 0, 0),
            refresh_s=_float(env, "SPEC_CONTROLLER_REFRESH_S", 0.02, 1e-4, 3600),
            max_age_s=_float(env, "SPEC_CONTROLLER_MAX_AGE_S", 30.0, 1e-3, 1e6),
            reload_s=_float(env, "SPEC_CONTROLLER_RELOAD_S", 2.0, 0.05, 1e6),
            explore=_float(env, "SPEC_CONTROLLER_EXPLORE", 0.0, 0.0, 1.0),
            explore_hold=_int(env, "SPEC_CONTROLLER_EXPLORE_HOLD", 1, 1),
            lazy_drafter=_bool(env, "SPEC_CONTROLLER_LAZY_DRAFTER", True),
            catchup_max_tokens=_int(env, "SPEC_CONTROLLER_CATCHUP_MAX_TOKENS", 0, 0),
            calibrate=_bool(env, "SPEC_CONTROLLER_CALIBRATE", True),
            min_gain=_float(env, "SPEC_CONTROLLER_MIN_GAIN", 0.03, 0.0, 0.5),
            speculate_over_off=_bool(env, "SPEC_CONTROLLER_SPECULATE_OVER_OFF", False),
            decide_every=_int(env, "SPEC_CONTROLLER_DECIDE_EVERY", 4, 1),
            seed=_int(env, "SPEC_CONTROLLER_SEED", 0, 0),
            engine_id=env.get("SPEC_CONTROLLER_ENGINE_ID", "") or f"engine-{os.getpid()}",
            trace_out=env.get("SPEC_TRACE_OUT") or None,
            trace_notes=env.get("SPEC_TRACE_NOTES") or None,
        )
