"""The torch-function mode that sends a model's SDPA, layer-norm and linear
calls through their chain folds (chain_attention, chain_norm, chain_linear)
inside the fast engine's first-order passes. Models call these functions
themselves (llcfast's models and Hugging Face's alike), so a mode is where
the calls can be taken over without touching the model."""
from __future__ import annotations

import collections

import torch
from torch.overrides import TorchFunctionMode

from . import attention as chain_attention
from . import linear as chain_linear
from . import norm as chain_norm
from . import settings

# estimate_llc's config key for each kind of fold: whether every run's batched pass folded such calls
# (and "head": fused_head's unembedding-and-loss, which the models call themselves)
CONFIG_KEYS = {"sdpa": "attention_fold", "layer_norm": "layer_norm_fold", "linear": "linear_fold",
               "head": "head_fusion"}

_FOLDS = {chain_attention.SDPA: ("sdpa", chain_attention.try_fold),
          chain_norm.LAYER_NORM: ("layer_norm", chain_norm.try_fold),
          chain_linear.LINEAR: ("linear", chain_linear.try_fold_linear),
          chain_linear.ADDMM: ("linear", chain_linear.try_fold_addmm)}


class ChainFold(TorchFunctionMode):
    """Sends eligible calls through their folds; ``calls`` counts the folded
    calls by kind ("sdpa", "layer_norm", "linear"), so that a caller can
    leave the mode (whose Python hook costs about 1.5 us a torch call) out
    of passes that have none."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    @property
    def folded(self) -> int:
        return sum(self.calls.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fold = _FOLDS.get(func)
        if fold is not None and not torch.compiler.is_compiling():
            out = fold[1](args, kwargs)
            if out is not NotImplemented:
                self.calls[fold[0]] += 1
                return out
        return func(*args, **kwargs)



def folding(devices=None, *, sdpa=None, layer_norm=None, linear=None, head=None):
    """Settings in force with the SDPA fold on the device types ``sdpa``
    names, the layer-norm fold on ``layer_norm``'s, the linear fold on
    ``linear``'s and the fused head on ``head``'s, each by default
    ``devices``; None leaves a path as it is, an empty set turns it off. For
    benchmarks and tests that compare the folds."""
    chosen = {"attention": sdpa, "layer_norm": layer_norm, "linear": linear, "head": head}
    changes = {path: tuple(devices if value is None else value) for path, value in chosen.items()
               if (devices if value is None else value) is not None}
    return settings.using(settings.current().replace(**changes))
