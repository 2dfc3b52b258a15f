"""llcfast: local learning coefficient estimation by multi-chain SGLD, with
fused C++/CUDA kernels and a pure-torch reference (llcfast.reference).

The public names load on first use, so that ``llcfast --help`` answers
without importing torch. The first public name used loads the kernels
(``torch.ops.llcfast.*``) with their fake kernels and vmap rules."""
import importlib

__version__ = "0.1.0"

# public name -> the module that defines it (tests/package/test_import_graph.py reads this table)
_LAZY = {
    "build_info": "llcfast._ext", "extension_available": "llcfast._ext",
    "LLCResult": "llcfast.estimate.result", "LLCInterrupted": "llcfast.engine.interrupt",
    "estimate_llc": "llcfast.estimate.llc", "estimate_wbic": "llcfast.estimate.llc",
    "SAMPLERS": "llcfast.engine.samplers", "FastPath": "llcfast.fastpath.settings",
    "Stage": "llcfast.pipeline.stages", "StageFit": "llcfast.pipeline.stages",
    "detect_stages": "llcfast.pipeline.stages",
    "HessianEigs": "llcfast.estimate.hessian", "HessianSpectrum": "llcfast.estimate.hessian",
    "HessianTrace": "llcfast.estimate.hessian", "hessian_eigs": "llcfast.estimate.hessian",
    "hessian_spectrum": "llcfast.estimate.hessian", "hessian_trace": "llcfast.estimate.hessian",
    "estimate_bif": "llcfast.estimate.bif", "BIFResult": "llcfast.estimate.bif",
    "estimate_susceptibilities": "llcfast.estimate.susceptibilities",
    "SusceptibilityResult": "llcfast.estimate.susceptibilities",
    "loss_along_path": "llcfast.landscape.paths", "PathResult": "llcfast.landscape.paths",
    "align_permutation": "llcfast.landscape.permutation",
    "layer_ablation": "llcfast.landscape.ablation", "AblationResult": "llcfast.landscape.ablation",
    "ops": "llcfast.ops", "reference": "llcfast.reference",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'llcfast' has no attribute {name!r}")
    importlib.import_module("llcfast.ops")  # registers the kernels' fakes and vmap rules with torch
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__ == f"llcfast.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
