"""llcfast: local learning coefficient estimation by multi-chain SGLD, with
fused C++/CUDA kernels and a pure-torch reference (llcfast.reference)."""
from ._ext import build_info, extension_available
from . import ops, reference
from .estimate.result import LLCResult
from .engine.interrupt import LLCInterrupted
from .estimate.llc import estimate_llc, estimate_wbic
from .engine.samplers import SAMPLERS
from .pipeline.stages import Stage, StageFit, detect_stages
from .estimate.hessian import (HessianEigs, HessianSpectrum, HessianTrace, hessian_eigs, hessian_spectrum, hessian_trace)

__version__ = "0.1.0"

__all__ = ["Stage", "StageFit", "detect_stages", "HessianEigs", "HessianSpectrum", "HessianTrace", "LLCInterrupted", "LLCResult", "SAMPLERS", "estimate_llc", "estimate_wbic", "hessian_eigs",
           "hessian_spectrum", "hessian_trace", "build_info", "extension_available", "ops", "reference", "__version__"]
