"""Loads the compiled kernels (llcfast._C) and reports what was built.

If the extension is missing (or LLCFAST_DISABLE_EXTENSION=1), every op falls
back to its pure-torch twin in llcfast.reference, with one warning that says
how to build the kernels.
"""
from __future__ import annotations

import os
import platform
import warnings

import torch

BUILD_HINT = ("build the kernels with `pip install --no-build-isolation -e .` from the llcfast checkout "
              "(see README: Building)")

_C = None
_load_error = None
if os.environ.get("LLCFAST_DISABLE_EXTENSION", "") == "1":
    _load_error = "disabled by LLCFAST_DISABLE_EXTENSION=1"
else:
    try:
        from . import _C  # noqa: F811  (registers torch.ops.llcfast.*)
    except ImportError as exc:  # not built, or built against another torch
        _load_error = f"{type(exc).__name__}: {exc}"

_warned = False


def extension_available() -> bool:
    return _C is not None


def cuda_kernels_built() -> bool:
    return _C is not None and bool(_C.build_info()["cuda_kernels"])


def kernels_for(device: torch.device) -> bool:
    """Whether compiled kernels serve tensors on ``device``."""
    if _C is None:
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and cuda_kernels_built()


def warn_fallback(device: torch.device) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    reason = _load_error if _C is None else f"this build has no kernels for {device.type} tensors"
    warnings.warn(f"llcfast: compiled kernels unavailable ({reason}); using the pure-torch reference, which is "
                  f"slower. To fix: {BUILD_HINT}.", RuntimeWarning, stacklevel=3)


def build_info() -> dict:
    """What this installation runs: compiled kernels (CPU, CUDA and archs),
    the torch and CUDA versions it was built with and runs on, and the GPU."""
    info = {
        "extension_loaded": _C is not None,
        "extension_error": _load_error,
        "cpu_kernels": False,
        "cuda_kernels": False,
        "cuda_archs": "",
        "built_with_torch": None,
        "built_with_cuda": None,
        "compiler": None,
    }
    if _C is not None:
        info.update(_C.build_info())
        info["extension_path"] = _C.__file__
    try:
        from ._build_choice import CUDA as why
    except ImportError:  # built before the build recorded its choice
        why = None
    info["cuda_build_choice"] = why
    info.update({
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "gpus": [],
    })
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append(f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)")
    return info
