"""One SGLD step (every chain's loss and gradient, the fused update, the loss
record, the step counter) captured as a CUDA graph, so each later step is one
batch copy and one replay with the Python interpreter out of the loop."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten


class GraphStep:
    def __init__(self, step: Callable, batch, dims):
        """Captures ``step(batch, dims)`` on a static copy of ``batch``; the
        capture records kernels without running them, so no step is taken."""
        leaves, self._spec = tree_flatten(batch)
        self._dims = tree_flatten(dims)[0] if dims is not None else None
        self._static = [t.clone() if isinstance(t, torch.Tensor) else t for t in leaves]
        self._signature = [_signature(t) for t in leaves]
        static_batch = tree_unflatten(self._static, self._spec)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            step(static_batch, dims)

    def accepts(self, batch, dims) -> bool:
        """Whether ``batch`` fits the captured shapes (a short last batch does not)."""
        leaves, spec = tree_flatten(batch)
        same_dims = (tree_flatten(dims)[0] if dims is not None else None) == self._dims
        return spec == self._spec and same_dims and [_signature(t) for t in leaves] == self._signature

    def replay(self, batch) -> None:
        for dst, src in zip(self._static, tree_flatten(batch)[0]):
            if isinstance(dst, torch.Tensor) and dst is not src:
                dst.copy_(src, non_blocking=True)
        self._graph.replay()


def _signature(leaf):
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device)
    return ("value", leaf)


@contextlib.contextmanager
def side_stream(enabled: bool):
    """Eager steps before a capture run on a side stream, as CUDA-graph
    capture requires for the lazy set-up (cuBLAS handles, workspaces) they do."""
    if not enabled:
        yield
        return
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)
