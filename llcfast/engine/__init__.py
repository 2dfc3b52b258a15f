"""The multi-chain sampler behind llcfast.estimate_llc."""
from .sampler import SamplerConfig, SamplerRun, run_chains

__all__ = ["SamplerConfig", "SamplerRun", "run_chains"]
