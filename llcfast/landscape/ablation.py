"""Redundancy probes: the loss when one residual block is removed, two
adjacent blocks swapped, or (heads=True) one attention head silenced. A
residual block maps h to h + f(h), so removing it leaves h; a network whose
later blocks can be dropped or reordered at little cost is redundant in the
way the LLC's degeneracy counts.

Every variant is the intact model with some tensors replaced (a swap
exchanges two blocks' parameters and buffers; a silenced head is its
columns of the attention's output projection set to zero) and some blocks
passed over (a hook returns a dropped block's input as its output), so the
variants are stacked like chains and vmap evaluates a group of them on each
batch in one pass (on a CPU, one at a time where one variant's activations
are large: landscape/passes.py).
``batched=False`` is the plain twin: one variant at a time, built by
editing the model (an nn.Identity in the dropped block's place, the block
list reordered, the head's columns zeroed in place).
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .._checks import check_int
from ..engine.common import default_loss, resolve_device, to_device
from ..engine.functional import chain_loss
from ..engine.loaders import check_loader, loader_batches
from ..engine.progress import progress_bar
from .passes import mean_over_loader, points_per_pass

GROUP = 16  # variants whose replaced tensors are stacked at once, bounding their memory


@dataclass
class AblationResult:
    """``loss``: the mean loss over the loader of the intact model ("none")
    and of each variant ("drop 2": block 2 removed; "swap 1-2": blocks 1 and
    2 in each other's place; "head 1.3": head 3 of block 1 silenced), in
    that order; ``increase``: each variant's loss minus the intact one."""
    loss: Dict[str, float]
    blocks: str
    config: Dict = field(default_factory=dict)

    @property
    def increase(self) -> Dict[str, float]:
        base = self.loss["none"]
        return {k: v - base for k, v in self.loss.items() if k != "none"}

    def to_frame(self):
        import pandas as pd
        return pd.DataFrame({"variant": list(self.loss), "loss": list(self.loss.values()),
                             "increase": [0.0] + list(self.increase.values())})

    def plot(self, path: Optional[str] = None, ax=None):
        """Each variant's increase of the loss over the intact model's, a bar
        per variant, coloured by kind."""
        import matplotlib
        if ax is None and path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        fig = None
        names, values = list(self.increase), list(self.increase.values())
        if ax is None:
            fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(names) + 1.5), 3.5))
        colours = {"drop": "C0", "swap": "C1", "head": "C2"}
        ax.bar(range(len(names)), values, color=[colours[n.split()[0]] for n in names])
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.axhline(0, color="k", lw=0.6)
        ax.set(ylabel="loss increase", title=f"ablations (intact loss {self.loss['none']:.4g})")
        if fig is not None and path is not None:
            fig.savefig(path, dpi=120, bbox_inches="tight")
            plt.close(fig)
        return ax


@dataclass
class Variant:
    """The intact model with ``tensors`` (state-dict name -> value) in place
    of its own and block ``dropped`` (if any) passed over."""
    name: str
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    dropped: Optional[int] = None


def residual_blocks(model: nn.Module, blocks: Optional[str]) -> tuple:
    """(name, the nn.ModuleList of residual blocks): ``blocks`` names it, or
    the model's only attribute called "blocks", "layers" or "h"."""
    if blocks is None:
        found = [n for n in ("blocks", "layers", "h") if isinstance(getattr(model, n, None), nn.ModuleList)]
        if not found:
            raise ValueError(f"{type(model).__name__} has no nn.ModuleList named blocks, layers or h; pass blocks= "
                             "the name of the list of residual blocks")
        blocks = found[0]
    target = model.get_submodule(blocks) if blocks else None
    if not isinstance(target, nn.ModuleList) or len(target) < 1:
        raise ValueError(f"blocks={blocks!r} is not a non-empty nn.ModuleList of {type(model).__name__}")
    return blocks, target


def _tensors(block: nn.Module) -> Dict[str, torch.Tensor]:
    return {**dict(block.named_parameters()), **dict(block.named_buffers())}


def _attention(block: nn.Module, i: int):
    attn = getattr(block, "attn", None)
    if not (isinstance(getattr(attn, "out", None), nn.Linear) and isinstance(getattr(attn, "heads", None), int)):
        raise ValueError(f"heads=True silences the heads of blocks whose attention has an output projection attn.out "
                         f"(nn.Linear) and a head count attn.heads, as the transformers of llcfast.pipeline.models "
                         f"do; block {i} ({type(block).__name__}) has none")
    return attn


def head_columns(attn, head: int) -> slice:
    """The columns of attn.out's weight that read head ``head``'s output."""
    e = attn.out.in_features // attn.heads
    return slice(head * e, (head + 1) * e)


def variants_of(name: str, target: nn.ModuleList, swaps: bool, heads: bool) -> List[Variant]:
    found = [Variant("none")] + [Variant(f"drop {i}", dropped=i) for i in range(len(target))]
    if swaps:
        for i in range(len(target) - 1):
            first, second = _tensors(target[i]), _tensors(target[i + 1])
            if [(k, v.shape) for k, v in first.items()] != [(k, v.shape) for k, v in second.items()]:
                raise ValueError(f"blocks {i} and {i + 1} of {name} hold different parameters, so they cannot be "
                                 "swapped; pass swaps=False")
            tensors = {f"{name}.{i}.{k}": second[k] for k in first}
            tensors.update({f"{name}.{i + 1}.{k}": first[k] for k in first})
            found.append(Variant(f"swap {i}-{i + 1}", tensors))
    if heads:
        for i, block in enumerate(target):
            attn = _attention(block, i)
            for h in range(attn.heads):
                weight = attn.out.weight.detach().clone()
                weight[:, head_columns(attn, h)] = 0
                found.append(Variant(f"head {i}.{h}", {f"{name}.{i}.attn.out.weight": weight}))
    return found


def layer_ablation(model: nn.Module, loader, loss_fn: Optional[Callable] = None, *, blocks: Optional[str] = None,
                   swaps: bool = True, heads: bool = False, batched: bool = True,
                   variants_per_pass: Optional[int] = None, device=None, seed: int = 0,
                   progress: bool = True) -> AblationResult:
    """The mean loss over one pass of ``loader`` of ``model`` with each
    residual block removed in turn, (``swaps``) each adjacent pair swapped,
    and (``heads``) each attention head silenced. ``blocks``: the name of
    the model's nn.ModuleList of residual blocks (each called with the
    residual stream as its first argument and returning it, updated); by
    default the one called "blocks", "layers" or "h". ``variants_per_pass``
    variants share each batched pass (by default 16 on a GPU; on a CPU one
    at a time where one variant's activations are large, as the sampler's
    CPU planner runs chains); groups of at least 16 share each pass over
    the loader; ``batched=False`` builds one variant at a time by editing the
    model. The model is left as it was."""
    check_loader(loader)
    name, target = residual_blocks(model, blocks)
    device = resolve_device(device, model)
    loss_fn = loss_fn or default_loss
    variants = variants_of(name, target, swaps, heads)
    if variants_per_pass is not None:
        check_int("variants_per_pass", variants_per_pass, minimum=1)
    was_training = model.training
    model.eval()
    bar = progress_bar(progress, len(variants), "ablations", unit="variant")
    try:
        with torch.no_grad():
            if batched:
                losses = _batched(model, target, loss_fn, variants, loader, device, seed, variants_per_pass, bar)
            else:
                losses = _one_at_a_time(model, target, loss_fn, variants, loader, device, seed, bar)
    finally:
        model.train(was_training)
        bar.close()
    return AblationResult(loss=losses, blocks=name, config={"swaps": swaps, "heads": heads, "batched": batched,
                                                            "device": str(device), "seed": seed})


def _mean_over(loader, seed: int, device, evaluate) -> np.ndarray:
    total, count = None, 0
    for batch in loader_batches(loader, seed, endless=False):
        values = torch.as_tensor(evaluate(to_device(batch, device))).double().reshape(-1)
        total = values if total is None else total + values
        count += 1
    if count == 0:
        raise ValueError("the loader yielded no batches; pass a non-empty loader")
    return (total / count).cpu().numpy()


def _batched(model, target, loss_fn, variants, loader, device, seed, per_pass, bar) -> Dict[str, float]:
    state = types.SimpleNamespace(keep=None)

    def gate(i, module, args, output):  # a dropped block hands its input on
        if state.keep is None:
            return output
        if not args or not isinstance(output, torch.Tensor) or output.shape != args[0].shape:
            raise ValueError(f"block {i} ({type(module).__name__}) must take the residual stream as its first "
                             "argument and return a tensor of its shape to be dropped")
        return torch.where(state.keep[i], output, args[0])

    hooks = [block.register_forward_hook(lambda m, a, o, i=i: gate(i, m, a, o)) for i, block in enumerate(target)]
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    losses = {}
    try:
        size = max(per_pass or 1, GROUP)  # a group's variants share one pass over the loader
        for start in range(0, len(variants), size):
            group = variants[start:start + size]
            names = sorted({k for v in group for k in v.tensors})
            stacked = tuple(torch.stack([v.tensors.get(k, own[k]) for v in group]).to(device) for k in names)
            keep = torch.ones(len(group), len(target), dtype=torch.bool, device=device)
            for row, v in enumerate(group):
                if v.dropped is not None:
                    keep[row, v.dropped] = False
            loss = chain_loss(model, loss_fn, names)

            def one(point, batch):  # the point: the replaced tensors, then which blocks are kept
                state.keep = point[-1]
                return loss(point[:-1], batch)

            point = stacked + (keep,)
            chosen = points_per_pass(per_pass, one, point, loader, device, seed, "variants_per_pass")
            per_pass = per_pass or chosen  # measured once: every group runs the same model on the same batches
            means = mean_over_loader(one, point, loader, device, seed, chosen)
            losses.update({v.name: float(m) for v, m in zip(group, means)})
            bar.update(len(group))
    finally:
        state.keep = None
        for hook in hooks:
            hook.remove()
    return losses


def _one_at_a_time(model, target, loss_fn, variants, loader, device, seed, bar) -> Dict[str, float]:
    original: List[nn.Module] = list(target)
    losses = {}
    for v in variants:
        order = list(original)
        if v.dropped is not None:
            order[v.dropped] = nn.Identity()
        saved = None
        if v.name.startswith("swap"):
            i, j = map(int, v.name.split()[1].split("-"))
            order[i], order[j] = order[j], order[i]
        elif v.name.startswith("head"):
            i, h = map(int, v.name.split()[1].split("."))
            attn = original[i].attn
            saved = attn.out.weight[:, head_columns(attn, h)].clone()
            attn.out.weight[:, head_columns(attn, h)] = 0
        try:
            for j, m in enumerate(order):
                target[j] = m
            losses[v.name] = float(_mean_over(loader, seed, device, lambda batch: loss_fn(model, batch))[0])
        finally:
            for j, m in enumerate(original):
                target[j] = m
            if saved is not None:
                attn.out.weight[:, head_columns(attn, h)] = saved
        bar.update(1)
    return losses
