"""Aligning the hidden units of one network to another's (weight matching).

Transformers of llcfast.pipeline.models (blocks with ``attn.qkv``,
``attn.out`` and an MLP): each block's heads, and its MLP's hidden units,
are matched to the other model's by one linear assignment each (the
residual stream's basis is left as it is, so the blocks are independent).

Permuting the hidden units of a layer, and the inputs of the next layer the
same way, leaves the function unchanged. For a stack of linear layers with
elementwise activations between them (an nn.Sequential MLP), weight
matching picks each hidden layer's permutation P_l to maximise

    sum_l <W_l^a, P_l W_l^b P_(l-1)^T> + <b_l^a, P_l b_l^b>

one layer at a time (a linear assignment, the other layers held), sweeping
the layers until no permutation changes. With a loader, activation
matching picks each P_l from the correlation of the two networks' hidden
units on the data instead, layer by layer, in one pass.
"""
from __future__ import annotations

import copy
from typing import List

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..engine.common import resolve_device, to_device
from ..engine.loaders import check_loader, loader_batches

ELEMENTWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Identity,
               nn.Dropout)
MAX_SWEEPS = 100


def linear_layers(model: nn.Module) -> List[nn.Linear]:
    """The model's linear layers in order, checked to be a stack the
    permutations leave unchanged: nn.Sequential of nn.Linear layers with
    elementwise activations between them."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"align_permutation aligns an nn.Sequential MLP (linear layers with elementwise "
                        f"activations between them) or a transformer of llcfast.pipeline.models (its heads and MLP "
                        f"units); got {type(model).__name__}")
    layers = []
    for i, module in enumerate(model):
        if isinstance(module, nn.Linear):
            layers.append(module)
        elif not isinstance(module, ELEMENTWISE):
            raise TypeError(f"module {i} ({type(module).__name__}) is neither nn.Linear nor an elementwise "
                            f"activation ({', '.join(m.__name__ for m in ELEMENTWISE)}); its units cannot be "
                            "permuted with the linear layers'")
    if len(layers) < 2:
        raise ValueError("the model has fewer than two linear layers: no hidden units to permute")
    for first, second in zip(layers, layers[1:]):
        if first.out_features != second.in_features:
            raise ValueError(f"a linear layer of {first.out_features} outputs feeds one of {second.in_features} "
                             "inputs: not a plain stack")
    return layers


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


def _activation_matching(model_a, model_b, a, b, loader, device) -> List[np.ndarray]:
    acts = {"a": [[] for _ in a[:-1]], "b": [[] for _ in b[:-1]]}
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k, key=key: acts[key][k].append(o.detach().double()))
             for key, layers in (("a", a), ("b", b)) for k, layer in enumerate(layers[:-1])]
    try:
        with torch.no_grad():
            for batch in loader_batches(loader, 0, endless=False):
                x = to_device(batch[0] if isinstance(batch, (tuple, list)) else batch, device)
                model_a(x)
                model_b(x)
    finally:
        for h in hooks:
            h.remove()
    perms = []
    for xa, xb in zip(acts["a"], acts["b"]):
        xa, xb = torch.cat(xa).flatten(0, -2), torch.cat(xb).flatten(0, -2)
        xa = (xa - xa.mean(0)) / (xa.std(0) + 1e-12)
        xb = (xb - xb.mean(0)) / (xb.std(0) + 1e-12)
        _, cols = linear_sum_assignment((xa.T @ xb).cpu().numpy(), maximize=True)
        perms.append(cols)
    return perms


def _blocks(model: nn.Module):
    """The residual blocks of a transformer of llcfast.pipeline.models (each
    with ``attn.qkv``, ``attn.out``, ``attn.heads`` and an optional
    ``mlp`` of Linear, activation, Linear), or None."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        return None
    for block in blocks:
        attn = getattr(block, "attn", None)
        if not (isinstance(getattr(attn, "qkv", None), nn.Linear) and isinstance(getattr(attn, "out", None), nn.Linear)
                and isinstance(getattr(attn, "heads", None), int)):
            return None
    return list(blocks)


def _assign(score: torch.Tensor) -> torch.Tensor:
    _, cols = linear_sum_assignment(score.detach().double().cpu().numpy(), maximize=True)
    return torch.as_tensor(cols)


def _head_rows(attn, order: torch.Tensor) -> torch.Tensor:
    """qkv's rows with the heads in ``order`` (rows are (q|k|v, head, dim))."""
    d = attn.out.in_features
    e = d // attn.heads
    heads = torch.arange(d).view(attn.heads, e)
    return torch.cat([s * d + heads[order].reshape(-1) for s in range(3)])


def _align_transformer(model_a, model_b) -> List[dict]:
    """Heads and MLP units of each block of ``model_b`` permuted in place to
    match ``model_a``'s (weight matching within each block: the residual
    stream's basis is shared, so blocks are independent)."""
    found = []
    with torch.no_grad():
        for ba, bb in zip(_blocks(model_a), _blocks(model_b)):
            qa, qb, oa, ob = ba.attn.qkv, bb.attn.qkv, ba.attn.out, bb.attn.out
            h, d = ba.attn.heads, oa.in_features
            e = d // h

            def per_head(w_qkv, bias, w_out):  # [H, 3 E (D + 1) + D E]: everything of one head
                rows = w_qkv.view(3, h, e, d).transpose(0, 1).reshape(h, -1)
                extra = bias.view(3, h, e).transpose(0, 1).reshape(h, -1) if bias is not None else rows[:, :0]
                cols = w_out.view(w_out.shape[0], h, e).transpose(0, 1).reshape(h, -1)
                return torch.cat([rows, extra, cols], dim=1).double()

            heads = _assign(per_head(qa.weight, qa.bias, oa.weight) @ per_head(qb.weight, qb.bias, ob.weight).T)
            rows = _head_rows(bb.attn, heads)
            qb.weight.copy_(qb.weight[rows])
            if qb.bias is not None:
                qb.bias.copy_(qb.bias[rows])
            ob.weight.copy_(ob.weight[:, heads.view(-1, 1).mul(e).add(torch.arange(e)).reshape(-1)])
            record = {"heads": heads.tolist()}
            if getattr(ba, "mlp", None) is not None:
                (ia, pa), (ib, pb) = linear_layers(ba.mlp), linear_layers(bb.mlp)
                score = ia.weight.double() @ ib.weight.double().T + pa.weight.double().T @ pb.weight.double()
                if ia.bias is not None:
                    score += torch.outer(ia.bias.double(), ib.bias.double())
                units = _assign(score)
                ib.weight.copy_(ib.weight[units])
                if ib.bias is not None:
                    ib.bias.copy_(ib.bias[units])
                pb.weight.copy_(pb.weight[:, units])
                record["mlp_units"] = units.tolist()
            found.append(record)
    return found


def align_permutation(model_a: nn.Module, model_b: nn.Module, loader=None, *, device=None) -> nn.Module:
    """A copy of ``model_b`` whose hidden units are permuted to match
    ``model_a``'s; it computes the same function as ``model_b``. Weight
    matching, or activation matching on the first element of each batch of
    ``loader`` where one is given. ``config`` of the returned model:
    ``model.aligned_permutations`` lists each hidden layer's permutation
    (unit i of the result is unit perm[i] of model_b)."""
    if not isinstance(model_a, nn.Sequential) and _blocks(model_a) is not None:
        if loader is not None:
            raise ValueError("activation matching (a loader) aligns nn.Sequential MLPs; a transformer's heads and "
                             "MLP units are aligned by weight matching (pass no loader)")
        shapes = lambda m: [tuple(p.shape) for p in m.parameters()]  # noqa: E731
        if _blocks(model_b) is None or shapes(model_a) != shapes(model_b):
            raise ValueError("model_a and model_b must be the same transformer shape")
        aligned = copy.deepcopy(model_b)
        aligned.aligned_permutations = _align_transformer(model_a, aligned)
        return aligned
    la, lb = linear_layers(model_a), linear_layers(model_b)
    if [(l.in_features, l.out_features) for l in la] != [(l.in_features, l.out_features) for l in lb]:
        raise ValueError("model_a and model_b have linear layers of different sizes")
    if loader is None:
        perms = _weight_matching(la, lb)
    else:
        check_loader(loader)
        device = resolve_device(device, model_a)
        perms = _activation_matching(model_a.to(device), model_b.to(device), la, lb, loader, device)
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
