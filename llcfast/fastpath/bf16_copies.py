"""bf16 working copies of the weights, for passes under bf16 autocast.

Under bf16 autocast a matmul casts its float32 weight to bf16 every step, and
autograd casts the weight's bf16 gradient back to float32: two passes over
the weights a chain-step, 12 bytes a weight, which is what a large model's
step spends most on outside its matmuls (GPT-2 774M: 17 of 85 GB a step in
the traffic model, benchmarks/traffic_large.py). A weight whose one use in the
loss is that cast can enter the pass as a bf16 copy instead, written by the
SGLD step in the pass that updates the float32 weight (llcfast.ops.sgld_step_'s
``bf16_copies``); its gradient then arrives in bf16, which the step reads as
it is. The numbers are the same: the copy is the cast (both round to nearest
even) and the bf16 gradient widens to float32 exactly, which is all autograd's
cast back does. Weights with any other use (an embedding, a layer norm, a
weight used twice) stay float32.
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import settings

_TO_COPY = torch.ops.aten._to_copy.default


class _Uses(TorchDispatchMode):
    """For each tracked tensor: how many times it is cast to bf16, and
    whether anything else reads it. Views of a tracked tensor are tracked as
    the tensor itself."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        super().__init__()
        self.owner = {id(t): i for i, t in enumerate(tensors)}
        self.alive = list(tensors)  # ids stay unique while their tensors live
        self.casts = [0] * len(tensors)
        self.other = [False] * len(tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        owners = {self.owner[id(t)] for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and id(t) in self.owner}
        for i in owners:
            if func is _TO_COPY and self.owner.get(id(args[0])) == i and kwargs.get("dtype") == torch.bfloat16 \
                    and len(owners) == 1:
                self.casts[i] += 1
            elif func._schema.is_mutable or not getattr(func, "is_view", False) or len(owners) != 1:
                self.other[i] = True
            else:
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        self.owner[id(t)] = i
                        self.alive.append(t)
        return out


def left_out(off: bool = True):
    """Inside (where ``off``), the engine casts every weight each step, as
    autocast does: the benchmarks' comparison."""
    if not off:
        return contextlib.nullcontext()
    return settings.using(settings.current().replace(bf16_copies=()))


def cast_only(loss: Callable, point: Sequence[torch.Tensor], batch) -> List[bool]:
    """For each parameter of ``loss(point, batch)`` (one chain's parameters,
    float32), whether its one use is a cast to bf16. Call it under the
    autocast the pass runs in; it runs one forward pass without gradients
    (autocast caches no casts then, so a weight used twice is cast twice)."""
    point = [p.detach() for p in point]
    uses = _Uses(point)
    with torch.no_grad(), uses:
        loss(tuple(point), batch)
    return [c == 1 and not o for c, o in zip(uses.casts, uses.other)]


def make_copies(params: Sequence[torch.Tensor], use: Sequence[bool]) -> Optional[List[Optional[torch.Tensor]]]:
    """The bf16 copies of the chain-stacked ``params`` that ``use`` picks
    (None for the others), or None where it picks none."""
    if not any(use):
        return None
    return [p.to(torch.bfloat16) if u else None for p, u in zip(params, use)]


def pass_inputs(params: Sequence[torch.Tensor], copies) -> tuple:
    """What the batched pass takes: each weight's bf16 copy where it has one,
    else the float32 weight."""
    if copies is None:
        return tuple(params)
    return tuple(p if c is None else c for p, c in zip(params, copies))


def summary(params: Sequence[torch.Tensor], copies) -> Optional[dict]:
    """What the result's config records: the tensors and the elements a chain
    that have bf16 copies, or None where none has."""
    if copies is None:
        return None
    kept = [p for p, c in zip(params, copies) if c is not None]
    return {"tensors": len(kept), "elements": sum(p[0].numel() for p in kept)}
