"""Every chain's loss and gradient from one model.

The model's trainable parameters are swapped for one chain's slice of the
stacked parameters (torch.func.functional_call), so a user's
``loss_fn(model, batch)`` keeps calling ``model(...)`` unchanged. vmap runs
all chains in one batched pass; the sequential path runs them one by one for
models vmap cannot handle.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from ..fastpath import settings
from .common import checked_loss, first_line


class _LossOf(nn.Module):
    """Holds the model as a submodule so functional_call can swap its
    parameters while loss_fn calls it."""

    def __init__(self, model: nn.Module, loss_fn: Callable, scalar: bool = True):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.scalar = scalar

    def forward(self, batch):
        out = self.loss_fn(self.model, batch)
        return checked_loss(out, "during sampling") if self.scalar else out


def chain_loss(model: nn.Module, loss_fn: Callable, names: Sequence[str], scalar: bool = True) -> Callable:
    """loss(params, batch) for one chain; ``params`` is a tuple in ``names``
    order. ``scalar`` False lets the function return any tensor (per-sample
    losses)."""
    wrapper = _LossOf(model, settings.substitute(loss_fn), scalar)  # the seam: a loss's fast-path form
    keys = ["model." + n for n in names]

    def loss(params: Tuple[torch.Tensor, ...], batch) -> torch.Tensor:
        return functional_call(wrapper, dict(zip(keys, params)), (batch,))

    return loss


def vmapped_grads(loss: Callable, batch_dims, chain_chunk: Optional[int] = None) -> Callable:
    """(params [C, ...] each, batch) -> (grads [C, ...] each, losses [C]).
    ``batch_dims`` is vmap's in_dims for the batch: 0 where each chain has its
    own minibatch, None where all chains share one. ``chain_chunk`` chains
    go through each batched pass (None: all). Dropout and other random ops
    draw independently per chain."""
    return vmap(grad_and_value(loss), in_dims=(0, batch_dims), randomness="different", chunk_size=chain_chunk)


def sequential_grads(loss: Callable, params: Sequence[torch.Tensor], batches: List,
                     grads_out: Sequence[torch.Tensor]) -> torch.Tensor:
    """Chain by chain: writes chain c's gradient into grads_out[i][c] and
    returns the losses [C]."""
    losses = []
    for c, batch in enumerate(batches):
        mine = tuple(p[c].detach().requires_grad_() for p in params)
        value = loss(mine, batch)
        grads = torch.autograd.grad(value, mine, allow_unused=True)
        for out, g in zip(grads_out, grads):
            if g is None:
                out[c].zero_()
            else:
                out[c].copy_(g)
        losses.append(value.detach())
    return torch.stack(losses)


def vmap_failure(loss: Callable, params: Sequence[torch.Tensor], batch, batch_dims, chain_chunk=None):
    """None if the batched pass runs on this model and batch, else the reason
    (the first line of vmap's error)."""
    try:
        vmapped_grads(loss, batch_dims, chain_chunk)(tuple(params), batch)
    except Exception as exc:  # vmap raises many types for unsupported models
        return f"{type(exc).__name__}: {first_line(exc)}"
    return None
