"""Scaled dot-product attention over stacked chains in one call each way,
where only first derivatives are needed.

torch has batching rules for SDPA's fused forward kernels but not for their
backward, so under the fast engine's vmap over chains the backward ran once
per chain, with a copy of the results into a stacked tensor (on CPUs both
directions did, behind torch's "performance drop" warning). Here the chain
dimension is folded into SDPA's batch dimension instead, so each direction
is one call of the fused kernel for all chains, and the T x T scores are
still never written.

The backward recomputes the forward from the saved q, k and v (as the fused
kernels' own backward does block by block) and asks autograd for the three
gradients. It has no derivative of its own, so the fold applies only inside
``fused_loss.first_order``, which the fast engine enters around its batched
loss-and-gradient pass; Hessian statistics and training see torch's SDPA.

Models call ``torch.nn.functional.scaled_dot_product_attention`` themselves
(llcfast's models and Hugging Face's alike), so the fold takes over, through
chain_fold.ChainFold's torch-function mode, the calls it can serve exactly:
no attention mask, no dropout, no grouped-query broadcasting, and q, k, v
with the same leading dimensions. Every other call goes to torch unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import chain_first
from . import settings

SDPA = F.scaled_dot_product_attention

# Off on CPU by default (fastpath.settings): there the chain-by-chain path
# gains nothing from batching and the fold's recomputation costs more than the
# loop saves; the tests turn it on to hold the CUDA path's semantics.
_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)
_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _attend(q, k, v, is_causal, scale):
    return SDPA(q, k, v, is_causal=is_causal, scale=scale)


def fold_batch(x: torch.Tensor, dim, size: int) -> torch.Tensor:
    """A vmap rule's operand [..., B, ...] mapped at ``dim`` as [size * B, ...]."""
    x = chain_first(x, dim, size)
    return x.reshape((-1,) + tuple(x.shape[2:]))


def unfold_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """[size * B, ...] back to [size, B, ...]."""
    return x.reshape((size, -1) + tuple(x.shape[1:]))


class FirstOrderBackward(torch.autograd.Function):
    """Base of a fold's backward, a function of its own so that vmap can
    fold it too; it has no derivative."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("llcfast: a chain fold's backward (SDPA or layer norm) has no derivative of its own; the "
                           "folds run only inside llcfast.fastpath.token_loss.first_order()")


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, is_causal, scale):
        return _attend(q, k, v, is_causal, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, is_causal, scale = inputs
        ctx.save_for_backward(q, k, v)
        ctx.is_causal, ctx.scale = is_causal, scale

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        return _AttentionBackward.apply(grad, q, k, v, ctx.is_causal, ctx.scale) + (None, None)

    @staticmethod
    def vmap(info, in_dims, q, k, v, is_causal, scale):
        n = info.batch_size
        out = _Attention.apply(*(fold_batch(x, d, n) for x, d in zip((q, k, v), in_dims)), is_causal, scale)
        return unfold_batch(out, n), 0


class _AttentionBackward(FirstOrderBackward):
    @staticmethod
    def forward(grad, q, k, v, is_causal, scale):
        with torch.enable_grad(), torch.autocast(q.device.type, enabled=False):
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            out = _attend(*leaves, is_causal, scale)
            return tuple(torch.autograd.grad(out, leaves, grad))

    @staticmethod
    def vmap(info, in_dims, grad, q, k, v, is_causal, scale):
        n = info.batch_size
        grads = _AttentionBackward.apply(*(fold_batch(x, d, n) for x, d in zip((grad, q, k, v), in_dims)),
                                         is_causal, scale)
        return tuple(unfold_batch(g, n) for g in grads), (0, 0, 0)


def autocast_dtype(device_type: str):
    """The dtype autocast would run SDPA in here, or None where it is off.
    The fold casts q, k, v itself and runs with autocast off, so that the
    backward's recomputation, which runs outside the forward's autocast
    region, repeats the forward exactly."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch before the device-generic autocast queries
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def one_float_dtype(*tensors) -> bool:
    """Whether the tensors given (None skipped; a dtype stands for a tensor
    of it) share one floating dtype, as a fold's single-dtype kernel or
    product needs."""
    dtypes = {t if isinstance(t, torch.dtype) else t.dtype for t in tensors if t is not None}
    return len(dtypes) == 1 and next(iter(dtypes)) in _FLOATS


def _foldable(call: dict) -> bool:
    q, k, v = call["query"], call["key"], call["value"]
    return (all(isinstance(x, torch.Tensor) and x.dim() >= 3 for x in (q, k, v)) and settings.current().on("attention", q.device)
            and call["attn_mask"] is None and call["dropout_p"] == 0 and not call["enable_gqa"]
            and isinstance(call["is_causal"], bool)
            and q.shape[:-2] == k.shape[:-2] == v.shape[:-2] and q.dtype == k.dtype == v.dtype)


def folded_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = False, scale=None):
    """SDPA whose vmap folds the mapped dimension into the batch dimension,
    both ways; first derivatives only. q, k, v: [B, ..., T, E] with the same
    leading dimensions."""
    dtype = autocast_dtype(q.device.type)
    if dtype is not None:  # autocast's cast of SDPA's operands, done here
        q, k, v = (x.to(dtype) if x.dtype in AUTOCAST_CASTS else x for x in (q, k, v))
    with torch.autocast(q.device.type, enabled=False):
        return _Attention.apply(q, k, v, is_causal, scale)


def try_fold(args, kwargs):
    """The folded SDPA of a call it can serve exactly, else NotImplemented."""
    call = dict(_DEFAULTS, **dict(zip(_ARGS, args)), **kwargs)
    if len(call) != len(_ARGS) or not _foldable(call):
        return NotImplemented
    return folded_sdpa(call["query"], call["key"], call["value"], is_causal=call["is_causal"], scale=call["scale"])
