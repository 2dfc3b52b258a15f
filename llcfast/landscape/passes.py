"""How the landscape's stacked points (path points, ablation variants) go
through the model: on a GPU, stacked as the sampler stacks chains, all in
one batched pass; on a CPU as the sampler's CPU planner runs chains, one at
a time where one point's largest activation fills the cores, else stacked
in passes that keep the largest activation small (docs/landscape.md gives
the measurements). Either way each point's loss is the same to rounding."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch.func import vmap

from .._checks import check_int
from ..engine.common import to_device
from ..engine.loaders import loader_batches
from ..engine.planner import cpu_pass_plan, measure_saved_tensors


def points_per_pass(per_pass: Optional[int], fn: Callable, stacked: tuple, loader, device: torch.device,
                    seed: int, name: str) -> int:
    """``per_pass`` checked, or its default for the device: every point on a
    GPU; on a CPU what planner.cpu_pass_plan makes of the activations one
    point's forward on the first batch saves."""
    count = stacked[0].shape[0]
    if per_pass is not None:
        return min(check_int(name, per_pass, minimum=1), count)
    if device.type != "cpu":
        return count
    batch = next(loader_batches(loader, seed, endless=False), None)
    if batch is None:
        raise ValueError("the loader yielded no batches; pass a non-empty loader")
    point = tuple(t[0].detach().clone().requires_grad_(t.is_floating_point()) for t in stacked)
    with torch.enable_grad():
        total, largest = measure_saved_tensors(lambda: fn(point, to_device(batch, device)))
    plan = cpu_pass_plan(count, total, largest)
    return 1 if plan["sequential"] else plan["chain_chunk"] or count


def evaluate(fn: Callable, stacked: tuple, batch, per_pass: int) -> torch.Tensor:
    """[P]: fn(point, batch) for each point of ``stacked`` (tensors [P, ...]),
    ``per_pass`` points to a batched pass (1: without vmap)."""
    count = stacked[0].shape[0]
    if per_pass == 1:
        return torch.stack([fn(tuple(t[i] for t in stacked), batch).reshape(()) for i in range(count)])
    batched = vmap(fn, in_dims=(0, None), randomness="different", chunk_size=None if per_pass >= count else per_pass)
    return batched(stacked, batch)


def mean_over_loader(fn: Callable, stacked: tuple, loader, device, seed: int, per_pass: int,
                     on_batch: Optional[Callable] = None) -> np.ndarray:
    """[P]: the mean over one pass of the loader of each point's loss."""
    total, count = None, 0
    with torch.no_grad():
        for batch in loader_batches(loader, seed, endless=False):
            values = evaluate(fn, stacked, to_device(batch, device), per_pass).double()
            total = values if total is None else total + values
            count += 1
            if on_batch is not None:
                on_batch()
    if count == 0:
        raise ValueError("the loader yielded no batches; pass a non-empty loader")
    return (total / count).cpu().numpy()
