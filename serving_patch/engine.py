"""Engine settings for this CPU and one way to build a ``vllm.LLM`` with the plugin configured.

Used by ``record-trace``, the real-engine tests and ``bench/bench_engine.py`` so they run
the same engine.  Facts behind the defaults (ARCHITECTURE.md, measured here):
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the EngineCore in-process (start ~10 s instead
of ~25 s, and the tests can read the live controller); ``VLLM_CPU_KVCACHE_SPACE`` is small
(GiB); one torch thread (``OMP_NUM_THREADS=1``); float32 so greedy argmax ties are rare.

Plugin settings are environment variables read when the scheduler is built, so
:func:`make_llm` sets them for the duration of the construction only
(:func:`plugin_env`) and calls :func:`serving_patch.engine_hook.install` itself: vLLM
loads general plugins once per process, so a second in-process engine would otherwise
not see a configuration that the first one lacked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["METHODS", "EngineSpec", "close_llm", "engine_defaults", "make_llm", "plugin_env", "speculative_config"]

METHODS = ("none", "ngram", "draft_model")
NGRAM_MIN_N, NGRAM_MAX_N = 2, 4  # the ngram engines' prompt_lookup_min / _max (serving_patch.agree matches them)

_PLUGIN_VARS = ("SPEC_CONTROLLER", "SPEC_CONTROLLER_FALLBACK_K", "SPEC_CONTROLLER_REFRESH_S",
                "SPEC_CONTROLLER_MAX_AGE_S", "SPEC_CONTROLLER_RELOAD_S", "SPEC_CONTROLLER_EXPLORE",
                "SPEC_CONTROLLER_EXPLORE_HOLD", "SPEC_CONTROLLER_LAZY_DRAFTER", "SPEC_CONTROLLER_CATCHUP_MAX_TOKENS",
                "SPEC_CONTROLLER_SEED", "SPEC_CONTROLLER_ENGINE_ID", "SPEC_CONTROLLER_DECIDE_EVERY", "SPEC_TRACE_OUT",
                "SPEC_TRACE_NOTES")


def engine_defaults(kv_cache_gib: int = 2) -> None:
    """Process-wide settings for an in-process CPU engine (only where the operator set none)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # the ngram proposer's numba parfor starts a thread pool sized to the cores, which also raises
    # torch's OpenMP threads process-wide (1 -> 2 measured): keep every engine on the same count
    os.environ.setdefault("NUMBA_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class EngineSpec:
    """What distinguishes the engines a benchmark or a test compares."""

    method: str = "none"           # none | ngram | draft_model
    max_k: int = 4                 # num_speculative_tokens
    max_num_seqs: int = 32
    max_model_len: int = 1024
    vllm_table: tuple[tuple[int, int, int], ...] | None = None  # vLLM's own num_speculative_tokens_per_batch_size

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method != "none" and self.max_k < 1:
            raise ValueError(f"max_k must be >= 1 with method={self.method!r}, got {self.max_k}")


def speculative_config(spec: EngineSpec, draft_path: str | None) -> dict[str, Any] | None:
    if spec.method == "none":
        return None
    cfg: dict[str, Any] = {"method": spec.method, "num_speculative_tokens": spec.max_k}
    if spec.method == "ngram":
        cfg.update(prompt_lookup_max=NGRAM_MAX_N, prompt_lookup_min=NGRAM_MIN_N)
    else:
        if not draft_path:
            raise ValueError("method='draft_model' needs the draft model's path")
        cfg["model"] = str(draft_path)
    if spec.vllm_table:
        cfg["num_speculative_tokens_per_batch_size"] = [list(r) for r in spec.vllm_table]
    return cfg


@contextlib.contextmanager
def plugin_env(controller: str | None = None, *, trace_out: str | None = None, explore: float = 0.0,
               explore_hold: int = 1,
               fallback_k: int | None = None, seed: int | None = None, refresh_s: float | None = None,
               reload_s: float | None = None, notes: str | None = None,
               lazy_drafter: bool | None = None, catchup_max_tokens: int | None = None) -> Iterator[None]:
    """Set the plugin's variables (and clear the others) for the body of the ``with``."""
    values = {"SPEC_CONTROLLER": controller, "SPEC_TRACE_OUT": trace_out,
              "SPEC_CONTROLLER_EXPLORE": str(explore) if explore else None,
              "SPEC_CONTROLLER_EXPLORE_HOLD": str(explore_hold) if explore and explore_hold > 1 else None,
              "SPEC_CONTROLLER_FALLBACK_K": None if fallback_k is None else str(fallback_k),
              "SPEC_CONTROLLER_SEED": None if seed is None else str(seed),
              "SPEC_CONTROLLER_REFRESH_S": None if refresh_s is None else str(refresh_s),
              "SPEC_CONTROLLER_RELOAD_S": None if reload_s is None else str(reload_s),
              "SPEC_TRACE_NOTES": notes,
              "SPEC_CONTROLLER_LAZY_DRAFTER": None if lazy_drafter is None else str(int(lazy_drafter)),
              "SPEC_CONTROLLER_CATCHUP_MAX_TOKENS": None if catchup_max_tokens is None else str(catchup_max_tokens)}
    saved = {k: os.environ.get(k) for k in set(_PLUGIN_VARS) | set(values)}
    try:
        for k in saved:
            v = values.get(k)
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _llvmlite_scan_workaround() -> None:
    """Let vLLM's Triton-override scan pass llvmlite's lazy library object (a second in-process engine).

    At worker start vLLM 0.32's ``triton_utils.dispatcher._rebind_kernels`` calls
    ``vars(value).get("kernel")`` on every module attribute.  Once numba is imported (the
    ``ngram`` proposer imports it), ``llvmlite.binding.ffi.lib`` answers any attribute,
    ``__dict__`` included, with a ctypes function wrapper, and the next engine built in the
    process dies with ``'_lib_fn_wrapper' object has no attribute 'get'``.  Giving that object a
    plain ``__dict__`` entry in its function table is enough.
    """
    import sys

    ffi = sys.modules.get("llvmlite.binding.ffi")
    table = getattr(getattr(ffi, "lib", None), "_fntab", None)
    if isinstance(table, dict) and not isinstance(table.get("__dict__"), dict):
        table["__dict__"] = {}


def close_llm(llm) -> None:
    """Shut an in-process engine down now, not whenever the garbage collector reaches it: a late
    shutdown tears down vLLM's process-wide parallel groups under the next engine built in the
    process ("pipeline model parallel group is not initialized" on its first step)."""
    import contextlib
    import gc

    with contextlib.suppress(Exception):  # best effort: a half-built engine may have nothing to stop
        llm.llm_engine.engine_core.shutdown()
    gc.collect()


def make_llm(target: str, draft: str | None, spec: EngineSpec, *, controller: str | None = None,
             trace_out: str | None = None, explore: float = 0.0, explore_hold: int = 1,
             fallback_k: int | None = None,
             seed: int = 0, refresh_s: float | None = None, reload_s: float | None = None,
             notes: str | None = None, log_stats: bool = True, lazy_drafter: bool | None = None,
             catchup_max_tokens: int | None = None, **llm_kwargs: Any):
    """A ``vllm.LLM`` for ``target`` with the plugin configured as given (None = inert)."""
    engine_defaults()
    from vllm import LLM

    if controller or trace_out:
        from serving_patch.engine_hook import install

        install()
    _llvmlite_scan_workaround()
    with plugin_env(controller, trace_out=trace_out, explore=explore, explore_hold=explore_hold,
                    fallback_k=fallback_k, seed=seed,
                    refresh_s=refresh_s, reload_s=reload_s, notes=notes, lazy_drafter=lazy_drafter,
                    catchup_max_tokens=catchup_max_tokens):
        return LLM(model=str(target), speculative_config=speculative_config(spec, draft), dtype="float32",
                   max_model_len=spec.max_model_len, max_num_seqs=spec.max_num_seqs, enforce_eager=True,
                   disable_log_stats=not log_stats, seed=seed, **llm_kwargs)
