"""torch.compile with a safety net, for the engine's batched passes: a
function torch.compile cannot handle, or whose first compiled result is
non-finite where the eager one is finite, runs eagerly after one warning."""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch.utils._pytree import tree_leaves

from .common import first_line

# Modes whose compiled code the whole-step CUDA-graph capture can hold; the
# others ("reduce-overhead", "max-autotune") bring Inductor's own CUDA graphs.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def check_compile(compile) -> Optional[str]:
    """A ``compile`` argument as a torch.compile mode, or None."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return "default"
    if compile in COMPILE_MODES:
        return compile
    raise ValueError(f"compile must be True, False or one of {COMPILE_MODES}, got {compile!r} (modes with "
                     "Inductor's own CUDA graphs clash with llcfast's capture of the whole step)")


class GuardedCompile:
    """Wraps eager functions in torch.compile(mode). ``active`` turns False,
    for every function it wrapped, the first time one cannot be compiled or
    its first compiled result is non-finite where the eager one is finite;
    Inductor's CPU code for bf16 autocast (torch 2.14) gave NaN gradients to
    half the chains of the paper's LR model. The eager pass runs for that
    check only when the compiled result has a non-finite value. Out-of-memory
    propagates: the callers shrink their passes on it."""

    def __init__(self, mode: Optional[str], what: str):
        self.mode, self.what = mode, what
        self.active = mode is not None

    def wrap(self, eager: Callable) -> Callable:
        if self.mode is None:
            return eager
        # Static shapes: a run's passes keep theirs, and the shapes that change
        # between runs (another model, another batch) would otherwise turn
        # symbolic, which functorch's forward-mode ops do not all support
        # (torch 2.14: _new_zeros_with_same_feature_meta under jvp).
        compiled = torch.compile(eager, mode=self.mode, dynamic=False)
        checked = [False]

        def run(*args):
            if not self.active:
                return eager(*args)
            try:
                out = compiled(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # Dynamo and Inductor raise many types
                self.give_up(f"torch.compile could not compile {self.what} "
                             f"({type(exc).__name__}: {first_line(exc)[:200]})")
                return eager(*args)
            if checked[0]:
                return out
            checked[0] = True
            if _all_finite(out):  # finite wherever the eager result could be: no eager pass needed
                return out
            want = eager(*args)
            if not finite_where(out, want):
                self.give_up(f"torch.compile's code for {self.what} gave non-finite values where the eager "
                             "code gave finite ones, on its first call")
                return want
            return out

        return run

    def give_up(self, why: str) -> None:
        self.active = False
        warnings.warn(f"llcfast: {why}; continuing without compiling", RuntimeWarning, stacklevel=4)


def _all_finite(tree) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tree_leaves(tree)
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def finite_where(got, want) -> bool:
    """Whether every tensor in ``got`` is finite wherever its twin in ``want`` is."""
    return all(bool(torch.isfinite(a)[torch.isfinite(b)].all()) for a, b in zip(tree_leaves(got), tree_leaves(want)))
