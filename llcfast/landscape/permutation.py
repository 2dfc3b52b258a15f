"""Aligning the hidden units of one network to another's.

Permuting the hidden units of a layer, and the inputs of the next layer the
same way, leaves the function unchanged. For a stack of linear layers with
elementwise activations between them (an nn.Sequential MLP), weight
matching picks each hidden layer's permutation P_l to maximise

    sum_l <W_l^a, P_l W_l^b P_(l-1)^T> + <b_l^a, P_l b_l^b>

one layer at a time (a linear assignment, the other layers held), sweeping
the layers until no permutation changes. With a loader, activation
matching picks each P_l from the correlation of the two networks' hidden
units on the data instead, layer by layer, in one pass. Transformers of
llcfast.pipeline.models have their heads and MLP units aligned block by
block (landscape/transformer_alignment.py).
"""
from __future__ import annotations

import copy
from typing import Callable, List, Optional

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..engine.common import resolve_device, to_device
from ..engine.loaders import check_loader, loader_batches
from .matching import Correlation, linear_layers, run_forward
from .transformer_alignment import align_transformer, transformer_blocks

MAX_SWEEPS = 100


def _weight_matching(a: List[nn.Linear], b: List[nn.Linear]) -> List[np.ndarray]:
    wa = [layer.weight.detach().double().cpu().numpy() for layer in a]
    wb = [layer.weight.detach().double().cpu().numpy() for layer in b]
    ba = [layer.bias.detach().double().cpu().numpy() if layer.bias is not None else None for layer in a]
    bb = [layer.bias.detach().double().cpu().numpy() if layer.bias is not None else None for layer in b]
    hidden = len(a) - 1
    perms = [np.arange(a[l].out_features) for l in range(hidden)]
    for _ in range(MAX_SWEEPS):
        changed = False
        for l in range(hidden):
            # score[i, j]: gain of sending b's unit j to a's unit i, the other layers' permutations held
            incoming = wb[l] if l == 0 else wb[l][:, perms[l - 1]]
            score = wa[l] @ incoming.T
            if ba[l] is not None:
                score += np.outer(ba[l], bb[l])
            outgoing = wb[l + 1] if l + 1 == hidden else wb[l + 1][perms[l + 1]]
            score += wa[l + 1].T @ outgoing
            _, cols = linear_sum_assignment(score, maximize=True)
            if not np.array_equal(cols, perms[l]):
                perms[l], changed = cols, True
        if not changed:
            break
    return perms


def _activation_matching(model_a, model_b, a, b, loader, loss_fn, device) -> List[np.ndarray]:
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k, key=key: seen.__setitem__((key, k), o))
             for key, layers in (("a", a), ("b", b)) for k, layer in enumerate(layers[:-1])]
    stats = [Correlation() for _ in a[:-1]]
    try:
        with torch.no_grad():
            for batch in loader_batches(loader, 0, endless=False):
                batch = to_device(batch, device)
                if loss_fn is None:  # an MLP is called on the batch's first element
                    batch = batch[0] if isinstance(batch, (tuple, list)) else batch
                    model_a(batch), model_b(batch)
                else:
                    run_forward(model_a, batch, loss_fn), run_forward(model_b, batch, loss_fn)
                for k, corr in enumerate(stats):
                    corr.add(seen[("a", k)], seen[("b", k)])
    finally:
        for h in hooks:
            h.remove()
    if not stats[0].n:
        raise ValueError("the loader yielded no batches; pass a non-empty loader")
    return [linear_sum_assignment(corr.matrix().cpu().numpy(), maximize=True)[1] for corr in stats]


def align_permutation(model_a: nn.Module, model_b: nn.Module, loader=None, loss_fn: Optional[Callable] = None, *,
                      residual: bool = True, device=None) -> nn.Module:
    """A copy of ``model_b`` whose hidden units are permuted to match
    ``model_a``'s; it computes the same function as ``model_b``. Weight
    matching, or activation matching over one pass of ``loader`` where one
    is given: each batch goes through ``loss_fn(model, batch)``, or without
    one an MLP is called on the batch's first element and a transformer on
    the batch's parts. ``aligned_permutations`` of the returned model lists
    each hidden layer's permutation (unit i of the result is unit perm[i] of
    model_b; for a transformer, {"residual": the stream's permutation, or
    None with ``residual=False``, "blocks": each block's "heads" and
    "mlp_units"})."""
    if loader is not None:
        check_loader(loader)
        device = resolve_device(device, model_a)
    if not isinstance(model_a, nn.Sequential) and transformer_blocks(model_a) is not None:
        shapes = lambda m: [tuple(p.shape) for p in m.parameters()]  # noqa: E731
        if transformer_blocks(model_b) is None or shapes(model_a) != shapes(model_b):
            raise ValueError("model_a and model_b must be the same transformer shape")
        aligned = copy.deepcopy(model_b)
        aligned.aligned_permutations = align_transformer(model_a, aligned, residual, loader, loss_fn, device)
        return aligned
    la, lb = linear_layers(model_a), linear_layers(model_b)
    if [(l.in_features, l.out_features) for l in la] != [(l.in_features, l.out_features) for l in lb]:
        raise ValueError("model_a and model_b have linear layers of different sizes")
    if loader is None:
        perms = _weight_matching(la, lb)
    else:
        perms = _activation_matching(model_a, model_b, la, lb, loader, loss_fn, device)
    aligned = copy.deepcopy(model_b)
    layers = linear_layers(aligned)
    with torch.no_grad():
        for l, perm in enumerate(perms):
            index = torch.as_tensor(perm, device=layers[l].weight.device)
            layers[l].weight.copy_(layers[l].weight[index])
            if layers[l].bias is not None:
                layers[l].bias.copy_(layers[l].bias[index])
            layers[l + 1].weight.copy_(layers[l + 1].weight[:, index])
    aligned.aligned_permutations = [p.tolist() for p in perms]
    return aligned
