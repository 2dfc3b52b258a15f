"""What both alignments share: the stacks of linear layers whose hidden
units can be permuted, one linear assignment, and the correlation of two
networks' units over data, accumulated batch by batch."""
from __future__ import annotations

from typing import List

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..engine.common import call_model

ELEMENTWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Identity,
               nn.Dropout)


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


def assign(score: torch.Tensor) -> torch.Tensor:
    """The permutation (as indices) that maximises the summed score
    score[i, perm[i]]."""
    _, cols = linear_sum_assignment(score.detach().double().cpu().numpy(), maximize=True)
    return torch.as_tensor(cols)


class Correlation:
    """The Pearson correlation of every unit of one network with every unit
    of the other, over the rows of the batches added ([rows, units] each),
    kept as running sums so no activations are stored."""

    def __init__(self):
        self.n = 0
        self.sums = None

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.detach().double().flatten(0, -2), b.detach().double().flatten(0, -2)
        sums = (a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), a.T @ b)
        self.sums = sums if self.sums is None else tuple(s + t for s, t in zip(self.sums, sums))
        self.n += a.shape[0]

    def matrix(self) -> torch.Tensor:
        sa, sb, saa, sbb, sab = self.sums
        n = self.n
        cov = sab / n - torch.outer(sa / n, sb / n)
        sd_a = (saa / n - (sa / n) ** 2).clamp_min(0).sqrt()
        sd_b = (sbb / n - (sb / n) ** 2).clamp_min(0).sqrt()
        return cov / (torch.outer(sd_a, sd_b) + 1e-12)


def run_forward(model: nn.Module, batch, loss_fn=None):
    """One forward pass on ``batch`` for the hooks to see: ``loss_fn(model,
    batch)`` where given, else the model called on the batch's parts."""
    return call_model(model, batch) if loss_fn is None else loss_fn(model, batch)
