"""Redundancy probes: the loss when one residual block is removed, or two
adjacent blocks swapped. A residual block maps h to h + f(h), so removing it
leaves h; a network whose later blocks can be dropped or reordered at little
cost is redundant in the way the LLC's degeneracy counts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..engine.common import default_loss, resolve_device, to_device
from ..engine.loaders import check_loader, loader_batches


@dataclass
class AblationResult:
    """``loss``: the mean loss over the loader of the intact model ("none")
    and of each variant ("drop 2": block 2 removed; "swap 1-2": blocks 1 and
    2 in each other's place), in that order; ``increase``: each variant's
    loss minus the intact one."""
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


def layer_ablation(model: nn.Module, loader, loss_fn: Optional[Callable] = None, *, blocks: Optional[str] = None,
                   swaps: bool = True, device=None, seed: int = 0) -> AblationResult:
    """The mean loss over one pass of ``loader`` of ``model`` with each
    residual block removed in turn and (``swaps``) each adjacent pair
    swapped. ``blocks``: the name of the model's nn.ModuleList of residual
    blocks (each mapping h to h + f(h)); by default the one called
    "blocks", "layers" or "h". The model is restored before returning."""
    check_loader(loader)
    name, target = residual_blocks(model, blocks)
    device = resolve_device(device, model)
    loss_fn = loss_fn or default_loss
    original: List[nn.Module] = list(target)
    variants = {"none": original}
    for i in range(len(original)):
        variants[f"drop {i}"] = [nn.Identity() if j == i else m for j, m in enumerate(original)]
    if swaps:
        for i in range(len(original) - 1):
            order = list(original)
            order[i], order[i + 1] = order[i + 1], order[i]
            variants[f"swap {i}-{i + 1}"] = order
    batches = [to_device(b, device) for b in loader_batches(loader, seed, endless=False)]
    if not batches:
        raise ValueError("the loader yielded no batches; pass a non-empty loader")
    was_training = model.training
    model.eval()
    losses = {}
    try:
        with torch.no_grad():
            for key, modules in variants.items():
                for j, m in enumerate(modules):
                    target[j] = m
                losses[key] = float(np.mean([float(loss_fn(model, b)) for b in batches]))
    finally:
        for j, m in enumerate(original):
            target[j] = m
        model.train(was_training)
    return AblationResult(loss=losses, blocks=name, config={"swaps": swaps, "device": str(device)})
