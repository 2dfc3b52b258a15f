"""Aligning the heads and MLP units of a transformer of
llcfast.pipeline.models (blocks with ``attn.qkv``, ``attn.out``,
``attn.heads`` and an optional ``mlp`` of Linear, activation, Linear) to
another's.

The residual stream's coordinates can be permuted too: the embeddings'
outputs, every read of the stream (q, k, v, the MLP's first layer, the
unembedding), every write (the attention's and MLP's output projections)
and every LayerNorm's weight and bias, all the same way, leave the function
unchanged, since a LayerNorm's mean and variance do not depend on the
order. ``residual=True`` aligns that basis as well.

Weight matching compares everything a head, a unit or a residual
coordinate owns across the two models and alternates (the residual
permutation with the blocks' held, then each block's heads and units with
the residual held) until nothing changes. Activation matching compares what
the two compute on data: heads by the correlation of their attention
patterns (each query's weights over the keys it may see) and MLP units by
that of their pre-activations, which do not depend on the residual basis,
and the residual coordinates by the correlation of the stream's values
entering and leaving every block.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from ..engine.common import to_device
from ..engine.loaders import loader_batches
from .matching import Correlation, assign, linear_layers, run_forward


def transformer_blocks(model: nn.Module) -> Optional[list]:
    """The model's residual blocks if it is such a transformer, else None."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        return None
    for block in blocks:
        attn = getattr(block, "attn", None)
        if not (isinstance(getattr(attn, "qkv", None), nn.Linear) and isinstance(getattr(attn, "out", None), nn.Linear)
                and isinstance(getattr(attn, "heads", None), int)):
            return None
    return list(blocks)


MAX_SWEEPS = 100


def residual_axes(model: nn.Module) -> List[Tuple[torch.Tensor, int]]:
    """(tensor, axis) for every parameter axis that indexes the residual
    stream's coordinates."""
    found = []

    def linear(layer, axis):
        found.append((layer.weight, axis))
        if axis == 0 and layer.bias is not None:
            found.append((layer.bias, 0))

    def norm(layer):
        found.extend((t, 0) for t in (layer.weight, layer.bias) if t is not None)

    parts = [getattr(model, n, None) for n in ("embed", "pos", "ln_out", "unembed")]
    if not (isinstance(parts[0], (nn.Linear, nn.Embedding)) and isinstance(parts[1], nn.Embedding)
            and isinstance(parts[2], nn.LayerNorm) and isinstance(parts[3], nn.Linear)):
        raise ValueError(f"residual=True permutes the residual stream of a transformer with embed, pos, blocks, ln_out "
                         f"and unembed, as those of llcfast.pipeline.models; {type(model).__name__} lacks them: pass "
                         "residual=False")
    embed, pos, ln_out, unembed = parts
    found.append((embed.weight, 1)) if isinstance(embed, nn.Embedding) else linear(embed, 0)
    found.append((pos.weight, 1))
    for block in transformer_blocks(model):
        norm(block.ln_attn)
        linear(block.attn.qkv, 1)
        linear(block.attn.out, 0)
        if getattr(block, "mlp", None) is not None:
            norm(block.ln_mlp)
            first, last = linear_layers(block.mlp)
            linear(first, 1)
            linear(last, 0)
    norm(ln_out)
    linear(unembed, 1)
    return found


def permute_residual(model: nn.Module, perm: torch.Tensor) -> None:
    """Coordinate i of the stream becomes coordinate perm[i], in place."""
    with torch.no_grad():
        for tensor, axis in residual_axes(model):
            tensor.copy_(tensor.index_select(axis, perm.to(tensor.device)))


def _rows(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    return tensor.detach().double().movedim(axis, 0).reshape(tensor.shape[axis], -1)


def align_transformer(model_a: nn.Module, aligned: nn.Module, residual: bool, loader=None, loss_fn=None,
                      device=None) -> dict:
    """Permutes ``aligned`` (a copy of model_b) in place to match model_a:
    weight matching, or activation matching over ``loader``. Returns
    {"residual": perm or None, "blocks": [{"heads": perm, "mlp_units": perm}]}."""
    blocks_a, blocks = transformer_blocks(model_a), transformer_blocks(aligned)
    total = {"residual": torch.arange(blocks[0].attn.out.out_features) if residual else None,
             "blocks": [{"heads": torch.arange(b.attn.heads)} for b in blocks]}
    for b, record in zip(blocks, total["blocks"]):
        if getattr(b, "mlp", None) is not None:
            record["mlp_units"] = torch.arange(linear_layers(b.mlp)[0].out_features)
    if loader is not None:
        _apply(aligned, blocks, activation_matching(model_a, aligned, blocks_a, blocks, loader, loss_fn, device,
                                                    residual), total)
    else:
        for _ in range(MAX_SWEEPS):  # the residual permutation with the blocks' held, then the blocks'
            moved = residual and _apply(aligned, blocks, {"residual": assign(sum(
                _rows(ta, axis) @ _rows(tb, axis).T
                for (ta, axis), (tb, _) in zip(residual_axes(model_a), residual_axes(aligned))))}, total)
            if not _apply(aligned, blocks, {"blocks": weight_matching(blocks_a, blocks)}, total) and not moved:
                break
    return {"residual": None if total["residual"] is None else total["residual"].tolist(),
            "blocks": [{k: v.tolist() for k, v in r.items()} for r in total["blocks"]]}


def _apply(model, blocks, found: dict, total: dict) -> bool:
    """Applies the permutations ``found`` to the model and composes them into
    ``total``; False if every one was the identity."""
    moved = False
    if found.get("residual") is not None:
        perm = found["residual"]
        moved |= not torch.equal(perm, torch.arange(len(perm)))
        permute_residual(model, perm)
        total["residual"] = total["residual"][perm]
    permute_blocks(blocks, found.get("blocks", []))
    for record, composed in zip(found.get("blocks", []), total["blocks"]):
        for kind, perm in record.items():
            moved |= not torch.equal(perm.cpu(), torch.arange(len(perm)))
            composed[kind] = composed[kind][perm.cpu()]
    return moved


def _head_rows(attn, order: torch.Tensor) -> torch.Tensor:
    """qkv's rows with the heads in ``order`` (rows are (q|k|v, head, dim))."""
    d = attn.out.in_features
    e = d // attn.heads
    heads = torch.arange(d).view(attn.heads, e)
    return torch.cat([s * d + heads[order].reshape(-1) for s in range(3)])


def _per_head(attn) -> torch.Tensor:
    """[H, ...]: everything one head owns (its q, k, v rows and biases, its
    columns of the output projection)."""
    h, d = attn.heads, attn.out.in_features
    e = d // h
    rows = attn.qkv.weight.view(3, h, e, d).transpose(0, 1).reshape(h, -1)
    bias = attn.qkv.bias
    extra = bias.view(3, h, e).transpose(0, 1).reshape(h, -1) if bias is not None else rows[:, :0]
    cols = attn.out.weight.view(attn.out.out_features, h, e).transpose(0, 1).reshape(h, -1)
    return torch.cat([rows, extra, cols], dim=1).double()


def weight_matching(blocks_a, blocks_b) -> List[dict]:
    found = []
    for ba, bb in zip(blocks_a, blocks_b):
        record = {"heads": assign(_per_head(ba.attn) @ _per_head(bb.attn).T)}
        if getattr(ba, "mlp", None) is not None:
            (ia, pa), (ib, pb) = linear_layers(ba.mlp), linear_layers(bb.mlp)
            score = ia.weight.double() @ ib.weight.double().T + pa.weight.double().T @ pb.weight.double()
            if ia.bias is not None:
                score += torch.outer(ia.bias.double(), ib.bias.double())
            record["mlp_units"] = assign(score)
        found.append(record)
    return found


def activation_matching(model_a, model_b, blocks_a, blocks_b, loader, loss_fn, device, residual: bool) -> dict:
    """Each block's heads by the correlation of their attention patterns,
    its MLP units by that of their pre-activations and (``residual``) the
    stream's coordinates by that of its values entering and leaving every
    block, over one pass of the loader."""
    seen = {}  # (block, kind, model) -> this batch's activations
    stream_corr = Correlation()
    stats = {(k, kind): Correlation() for k, b in enumerate(blocks_a)
             for kind in (("heads", "mlp_units") if getattr(b, "mlp", None) is not None else ("heads",))}

    def patterns(key):
        def hook(attn, args):
            w = attn.pattern(args[0])  # [B, H, T, T]; only the causal part varies
            keep = torch.tril(torch.ones(w.shape[-2:], dtype=torch.bool, device=w.device))
            seen[key] = w[..., keep].transpose(1, 2).flatten(0, 1)  # [B x entries, H]
        return hook

    def units(key):
        def hook(layer, args, output):
            seen[key] = output.flatten(0, -2)
        return hook

    def stream(key):
        def hook(block, args, output):
            values = [args[0], output] if key[0] == 0 else [output]
            seen[key] = torch.cat([v.flatten(0, -2) for v in values])
        return hook

    hooks = []
    for name, blocks in (("a", blocks_a), ("b", blocks_b)):
        for k, block in enumerate(blocks):
            hooks.append(block.attn.register_forward_pre_hook(patterns((k, "heads", name))))
            if getattr(block, "mlp", None) is not None:
                hooks.append(linear_layers(block.mlp)[0].register_forward_hook(units((k, "mlp_units", name))))
            if residual:
                hooks.append(block.register_forward_hook(stream((k, "residual", name))))
    try:
        with torch.no_grad():
            for batch in loader_batches(loader, 0, endless=False):
                batch = to_device(batch, device)
                run_forward(model_a, batch, loss_fn)
                run_forward(model_b, batch, loss_fn)
                for (k, kind), corr in stats.items():
                    corr.add(seen[(k, kind, "a")], seen[(k, kind, "b")])
                for k in range(len(blocks_a) if residual else 0):
                    stream_corr.add(seen[(k, "residual", "a")], seen[(k, "residual", "b")])
    finally:
        for hook in hooks:
            hook.remove()
    if not stats[(0, "heads")].n:
        raise ValueError("the loader yielded no batches; pass a non-empty loader")
    found = [{} for _ in blocks_a]
    for (k, kind), corr in stats.items():
        found[k][kind] = assign(corr.matrix())
    return {"blocks": found, "residual": assign(stream_corr.matrix()) if residual else None}


def permute_blocks(blocks, found: List[dict]) -> None:
    """Permutes each block's heads and MLP units in place as ``found`` says
    (unit i becomes unit perm[i])."""
    with torch.no_grad():
        for block, record in zip(blocks, found):
            attn = block.attn
            heads = record["heads"].to(attn.qkv.weight.device)
            e = attn.out.in_features // attn.heads
            rows = _head_rows(attn, heads.cpu()).to(heads.device)
            attn.qkv.weight.copy_(attn.qkv.weight[rows])
            if attn.qkv.bias is not None:
                attn.qkv.bias.copy_(attn.qkv.bias[rows])
            attn.out.weight.copy_(attn.out.weight[:, (heads.view(-1, 1) * e + torch.arange(e, device=heads.device))
                                                  .reshape(-1)])
            if "mlp_units" in record:
                first, last = linear_layers(block.mlp)
                units = record["mlp_units"].to(first.weight.device)
                first.weight.copy_(first.weight[units])
                if first.bias is not None:
                    first.bias.copy_(first.bias[units])
                last.weight.copy_(last.weight[:, units])
