"""The ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` once in every process it starts (front end, EngineCore,
workers), each call guarded by vLLM itself; this function adds its own guard so a broken
install never reaches vLLM's log as a traceback, and does nothing unless the plugin is
configured (``SPEC_CONTROLLER`` or ``SPEC_TRACE_OUT``).  On a vLLM version the hook was
not tested on it warns and stays off (``SPEC_CONTROLLER_ALLOW_UNTESTED=1`` overrides).
"""

from __future__ import annotations

import logging
import os

__all__ = ["register"]

log = logging.getLogger("serving_patch")


def _single_thread_torch() -> None:
    """One torch thread per process unless the operator chose otherwise (2-core machines)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except Exception as exc:  # noqa: BLE001
        log.debug("torch.set_num_threads(1) failed: %s", exc)


def register() -> bool:
    """Install the scheduler hook when configured; returns whether it is installed."""
    try:
        from serving_patch.compat import check_vllm_version
        from serving_patch.config import PluginConfig

        cfg = PluginConfig.from_env()
        if not cfg.enabled:
            return False
        ok, msg = check_vllm_version()
        if not ok:
            log.warning(msg)
            return False
        _single_thread_torch()
        from serving_patch.engine_hook import install

        installed = install()
        log.debug("spec-controller plugin: %s; hook installed=%s", msg, installed)
        return installed
    except Exception as exc:  # noqa: BLE001 -- the plugin must never take the engine down
        log.error("spec-controller plugin not loaded: %s: %s (vLLM runs unchanged)", type(exc).__name__, exc)
        return False
