"""Per-chain minibatches for the stacked engine.

Chain c draws from its own pass over the loader, exactly as the reference
does, so a shuffling loader gives each chain its own order. (devinterp 1.3.2
pickles the loader once per chain, so there every chain replays one order.) At
each step the chains' batches are stacked along a new leading dimension; when
every chain got the very same tensors (a list of batches, say) they are passed
once and shared, which saves the copy.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .common import to_device
from .loaders import loader_batches


class ChainBatches:
    def __init__(self, loader, num_chains: int, device: torch.device, seed: int = 0, chain_offset: int = 0,
                 source=loader_batches):
        # Keyed by the global chain index, as the reference's chains are; ``source`` is
        # loaders.draw_batches for the draws' own batches.
        self._iters = [source(loader, seed, chain_offset + c) for c in range(num_chains)]
        self._device = device

    def next_stacked(self):
        """(batch, in_dims, per_chain): the chains' next batches stacked on a
        leading chain dimension (in_dims 0 for each stacked leaf), or shared
        (in_dims None) where all chains got the same objects; per_chain is the
        list of the chains' own batches, or None when they cannot be stacked
        (shapes differ between chains)."""
        raw = [next(it) for it in self._iters]
        leaves0, spec = tree_flatten(raw[0])
        # one object for every chain (a list's batch) is shared without flattening each chain's
        same = all(b is raw[0] for b in raw[1:]) or all(
            s == spec and all(a is b for a, b in zip(leaves0, ls)) for ls, s in map(tree_flatten, raw[1:]))
        if same:
            shared = to_device(raw[0], self._device)
            return shared, tree_unflatten([None] * len(leaves0), spec), [shared] * len(raw)
        per_chain = [to_device(b, self._device) for b in raw]
        stacked = stack_batches(per_chain)
        return (None, None, per_chain) if stacked is None else (*stacked, per_chain)


def stack_batches(batches: List) -> Optional[Tuple[object, object]]:
    """(stacked batch, in_dims) or None when the chains' batches differ in
    structure or shapes."""
    flat = [tree_flatten(b) for b in batches]
    spec = flat[0][1]
    if any(s != spec for _, s in flat):
        return None
    leaves, dims = [], []
    for column in zip(*(ls for ls, _ in flat)):
        first = column[0]
        if isinstance(first, torch.Tensor):
            if any(not isinstance(t, torch.Tensor) or t.shape != first.shape or t.dtype != first.dtype
                   for t in column):
                return None
            leaves.append(torch.stack(column))
            dims.append(0)
        else:
            if any(v != first for v in column):
                return None
            leaves.append(first)
            dims.append(None)
    return tree_unflatten(leaves, spec), tree_unflatten(dims, spec)
