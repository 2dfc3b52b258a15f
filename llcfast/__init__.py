"""llcfast: local learning coefficient estimation by multi-chain SGLD, with
fused C++/CUDA kernels and a pure-torch reference (llcfast.reference)."""
from ._ext import build_info, extension_available
from . import ops, reference
from .result import LLCResult
from .llc import estimate_llc

__version__ = "0.1.0"

__all__ = ["LLCResult", "estimate_llc", "build_info", "extension_available", "ops", "reference", "__version__"]
