"""Chains split across the ranks of a torch.distributed job (torchrun; gloo
on CPUs, NCCL on GPUs). Noise is keyed by the global chain index and every
chain walks its own pass over the loader, so a rank that runs chains
[start, start + count) reproduces exactly those chains of a one-process run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch


@dataclass
class ChainSplit:
    rank: int
    world_size: int
    counts: List[int]  # chains per rank

    @property
    def start(self) -> int:
        return sum(self.counts[:self.rank])

    @property
    def count(self) -> int:
        return self.counts[self.rank]


def current_split(num_chains: int) -> Optional[ChainSplit]:
    """The chain split of this process, or None outside a multi-process job."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    if num_chains < world:
        raise ValueError(f"num_chains={num_chains} is fewer than the {world} ranks of this torch.distributed job; "
                         f"run at least {world} chains (one per rank) or fewer processes")
    base, extra = divmod(num_chains, world)
    return ChainSplit(rank, world, [base + (r < extra) for r in range(world)])


def gather_rows(split: ChainSplit, local: np.ndarray) -> np.ndarray:
    """Every rank's [count_r, ...] float64 rows, concatenated in rank order,
    on every rank (an all-gather of rows padded to the largest count)."""
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    width = max(split.counts)
    padded = torch.full((width,) + local.shape[1:], float("nan"), dtype=torch.float64, device=device)
    padded[:local.shape[0]] = torch.from_numpy(np.ascontiguousarray(local)).to(device)
    parts = [torch.empty_like(padded) for _ in range(split.world_size)]
    dist.all_gather(parts, padded)
    # gloo's worker thread drops its reference to these tensors after the
    # collective has returned here. Were that the last reference, it would
    # take the GIL to free them; older torch joins that thread holding the
    # GIL in destroy_process_group (released since pytorch/pytorch#154976),
    # and the rank hangs there (2 runs in 19 of tests/engine/test_distributed.py on
    # torch 2.4.1). Held here until the next gather, they are freed by Python
    # instead.
    _LAST_GATHER[:] = [padded, parts]
    return np.concatenate([p[:n].cpu().numpy() for p, n in zip(parts, split.counts)])


_LAST_GATHER: list = []
