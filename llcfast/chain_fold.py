"""The torch-function mode that sends a model's SDPA, layer-norm and linear
calls through their chain folds (chain_attention, chain_norm, chain_linear)
inside the fast engine's first-order passes. Models call these functions
themselves (llcfast's models and Hugging Face's alike), so a mode is where
the calls can be taken over without touching the model."""
from __future__ import annotations

import collections
import contextlib

import torch
from torch.overrides import TorchFunctionMode

from . import chain_attention, chain_linear, chain_norm

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


@contextlib.contextmanager
def folding(devices=None, *, sdpa=None, layer_norm=None, linear=None, head=None):
    """Inside: the SDPA fold serves calls on the devices ``sdpa`` names, the
    layer-norm fold on those ``layer_norm`` names, the linear fold on those
    ``linear`` names and fused_head's fusion on those ``head`` names, each
    by default ``devices``; None leaves a fold's own devices (FOLD_DEVICES,
    fused_head.DEVICES), an empty set turns it off. As when a benchmark or
    a test sets them."""
    from . import fused_head  # which imports this module, through fused_loss
    wanted = [(chain_attention, "FOLD_DEVICES", devices if sdpa is None else sdpa),
              (chain_norm, "FOLD_DEVICES", devices if layer_norm is None else layer_norm),
              (chain_linear, "FOLD_DEVICES", devices if linear is None else linear),
              (fused_head, "DEVICES", devices if head is None else head)]
    saved = [(module, name, getattr(module, name)) for module, name, _ in wanted]
    try:
        for module, name, chosen in wanted:
            if chosen is not None:
                setattr(module, name, set(chosen))
        yield
    finally:
        for module, name, devices_before in saved:
            setattr(module, name, devices_before)
