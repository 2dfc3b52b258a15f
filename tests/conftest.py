import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import llcfast
from llcfast import _ext
from fastpaths import set_fastpath

# Deterministic example generation: a failure is reproducible from the log.
settings.register_profile("llcfast", derandomize=True, deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "llcfast"))

HAS_CUDA = torch.cuda.is_available() and _ext.cuda_kernels_built()
CUDA_SKIP_REASON = (
    "no CUDA GPU visible" if not torch.cuda.is_available() else "llcfast was built without CUDA kernels")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=f"CUDA kernel tests need a GPU: {CUDA_SKIP_REASON}")
requires_extension = pytest.mark.skipif(
    not llcfast.extension_available(),
    reason=f"compiled extension not loaded ({_ext._load_error}); kernel tests need it")


def pytest_report_header(config):
    info = llcfast.build_info()
    return (f"llcfast: extension={info['extension_loaded']} cpu_kernels={info['cpu_kernels']} "
            f"cuda_kernels={info['cuda_kernels']} archs={info['cuda_archs']!r} torch={info['torch']} "
            f"gpus={info['gpus']}")


@pytest.fixture
def fold_as_on_cuda(monkeypatch):
    """The engine's pass as it runs on CUDA, on a CPU: SDPA, layer norm and
    linear layers folded over chains, the LM's unembedding and loss fused (chain_fold runs them on CUDA only;
    here the linear fold takes layers of any size, as it takes large ones on
    CUDA) and the chains stacked (a CPU's pass plan may run them chain by
    chain, which needs no fold)."""
    from llcfast.fastpath import (linear as chain_linear)
    from llcfast.engine import planner, sampler
    set_fastpath(monkeypatch, head={"cpu", "cuda"})
    set_fastpath(monkeypatch, attention={"cpu", "cuda"})
    set_fastpath(monkeypatch, layer_norm={"cpu", "cuda"})
    set_fastpath(monkeypatch, linear={"cpu", "cuda"})
    monkeypatch.setattr(chain_linear, "MIN_OUTPUTS_PER_CHAIN", 0)
    monkeypatch.setattr(sampler, "cpu_pass_plan", lambda n, total, largest, stack=False:
                        planner.cpu_pass_plan(n, total, largest, stack=True))


def pytest_collection_modifyitems(config, items):
    """Every test that needs a CUDA GPU carries the ``cuda`` marker, so that
    ``pytest -m cuda`` is a GPU run's whole list: those under requires_cuda
    and those whose ``device`` parameter is "cuda" (tests that skip on their
    own terms carry the marker themselves)."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("device") == "cuda" or any(m == requires_cuda.mark for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)
