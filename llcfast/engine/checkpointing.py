"""Activation checkpointing for the chains' gradient passes: the chosen
submodules keep only their inputs during the forward pass and recompute
their activations in the backward pass (torch.utils.checkpoint, non-reentrant).

torch.func's grad and vmap reject the saved-tensor hooks checkpointing needs,
so a checkpointed run takes the sequential path: chains one after another,
each with plain autograd. For the models that need checkpointing, one chain's
pass is already large enough to fill the GPU.
"""
from __future__ import annotations

import fnmatch
from typing import Dict, List, Sequence, Union

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

Spec = Union[bool, str, Sequence[str]]
_classes: Dict[type, type] = {}


def _checkpointed(cls: type) -> type:
    """A subclass of ``cls`` whose forward recomputes in the backward pass.
    Swapping a module's class (not its forward attribute) keeps deep copies
    and parameter names as they were."""
    if getattr(cls, "_llcfast_checkpointed", False):
        return cls
    if cls not in _classes:
        def forward(self, *args, **kwargs):
            if not torch.is_grad_enabled() or self.__dict__.get("_llcfast_inner", False):
                return cls.forward(self, *args, **kwargs)
            # The parameters as they are now: the engine swaps each chain's in
            # with functional_call and restores w* before the backward pass,
            # so the recomputation must not read them from the module again.
            params = dict(self.named_parameters())

            def run(*a, **k):
                self.__dict__["_llcfast_inner"] = True
                try:
                    return functional_call(self, params, a, k)
                finally:
                    self.__dict__["_llcfast_inner"] = False

            return checkpoint(run, *args, use_reentrant=False, **kwargs)

        _classes[cls] = type(f"Checkpointed{cls.__name__}", (cls,),
                             {"forward": forward, "_llcfast_checkpointed": True, "__module__": cls.__module__})
    return _classes[cls]


def _repeated_blocks(model: nn.Module) -> List[str]:
    """The children of the nn.ModuleList holding the most parameters: a
    transformer's blocks, a deep MLP's layers."""
    best, best_size = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod):
            size = sum(p.numel() for p in mod.parameters())
            if size > best_size:
                best, best_size = name, size
    if best is None:
        return []
    return [f"{best}.{child}" if best else child for child, _ in model.get_submodule(best).named_children()]


def resolve(model: nn.Module, spec: Spec) -> List[str]:
    """The names of the submodules ``spec`` selects: True picks the repeated
    blocks (see _repeated_blocks); a glob or list of globs picks the modules
    whose names match, the outermost where both a module and one inside it
    match. Raises ValueError, naming what exists, when nothing matches."""
    if spec is True:
        names = _repeated_blocks(model)
        if not names:
            raise ValueError("activation_checkpointing=True looks for an nn.ModuleList of repeated blocks and this "
                             f"{type(model).__name__} has none; pass the names of the modules to recompute as globs, "
                             "e.g. activation_checkpointing=['encoder.*']")
        return names
    globs = [spec] if isinstance(spec, str) else list(spec) if isinstance(spec, (list, tuple)) else None
    if not globs or not all(isinstance(g, str) and g for g in globs):
        raise TypeError(f"activation_checkpointing must be True, False, a module-name glob or a list of them, "
                        f"got {spec!r}")
    matched = [n for n, _ in model.named_modules() if n and any(fnmatch.fnmatchcase(n, g) for g in globs)]
    outer = [n for n in matched if not any(n.startswith(m + ".") for m in matched)]
    if not outer:
        some = [n for n, _ in model.named_modules() if n][:12]
        raise ValueError(f"activation_checkpointing={spec!r} matches no submodule; module names look like {some}")
    return outer


def apply(model: nn.Module, spec: Spec) -> List[str]:
    """Checkpoints the submodules ``spec`` selects, in place (the engine
    calls it on its own copy of the user's model); returns their names, []
    for False or None."""
    if spec is False or spec is None:
        return []
    names = resolve(model, spec)
    for name in names:
        mod = model.get_submodule(name)
        mod.__class__ = _checkpointed(type(mod))
    return names
