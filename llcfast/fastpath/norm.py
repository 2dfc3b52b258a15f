"""Layer norm over stacked chains in one kernel each way, where only first
derivatives are needed.

Under the fast engine's vmap over chains each chain has its own weight and
bias, which torch's batching rule for layer_norm handles by normalizing
without them and then multiplying and adding: three passes over the
activations forward and seven backward (the weight's gradient recomputes the
normalized input from the saved one), with one more activation saved per
norm. ``llcfast::chain_layer_norm`` takes the weight and bias per chain: one
pass forward, and backward one for the input's gradient and one for the
column sums of the weight's and bias's. An H100 model of the paper's LM
step (bf16, SDPA; benchmarks/bench_traffic.py) counts its three norms at
about 2.0 of the step's 8.6 GB this way, against 0.7 GB with the kernels.

The backward kernel has no derivative of its own, so the fold runs only
inside ``fused_loss.first_order`` (chain_fold.ChainFold takes the calls);
Hessian statistics and training see torch's layer_norm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from . import settings
from .attention import FirstOrderBackward, autocast_dtype, fold_batch, one_float_dtype, unfold_batch

# Off on CPU (fastpath.settings): torch's vectorised kernels beat the scalar
# loops there; the tests turn it on to hold the CUDA path's semantics.
_LOWER = (torch.float16, torch.bfloat16)


class _ChainLayerNorm(torch.autograd.Function):
    """x [C, R, D], weight [C, D], bias [C, D] or None -> (y, mean, rstd)."""

    @staticmethod
    def forward(x, weight, bias, eps):
        return torch.ops.llcfast.chain_layer_norm(x.contiguous(), weight.contiguous(),
                                                  None if bias is None else bias.contiguous(), eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def backward(ctx, grad, _mean, _rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = _ChainLayerNormBackward.apply(grad, x, mean, rstd, weight)
        return dx, dweight, dbias if ctx.has_bias else None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, eps):
        n = info.batch_size
        folded = [None if t is None else fold_batch(t, d, n) for t, d in zip((x, weight, bias), in_dims)]
        out = _ChainLayerNorm.apply(*folded, eps)
        return tuple(unfold_batch(t, n) for t in out), (0, 0, 0)


class _ChainLayerNormBackward(FirstOrderBackward):
    @staticmethod
    def forward(grad, x, mean, rstd, weight):
        return torch.ops.llcfast.chain_layer_norm_backward(grad.contiguous(), x.contiguous(), mean.contiguous(),
                                                           rstd.contiguous(), weight.contiguous())

    @staticmethod
    def vmap(info, in_dims, grad, x, mean, rstd, weight):
        n = info.batch_size
        out = _ChainLayerNormBackward.apply(*(fold_batch(t, d, n) for t, d in zip((grad, x, mean, rstd, weight),
                                                                                   in_dims)))
        return tuple(unfold_batch(t, n) for t in out), (0, 0, 0)


def folded_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias, eps: float) -> torch.Tensor:
    """layer_norm of x [..., D] over D with weight [D] and bias [D] (or None),
    all of one dtype, whose vmap folds the mapped dimension into the kernel's
    chain dimension, both ways; first derivatives only."""
    shape = x.shape
    y, _, _ = _ChainLayerNorm.apply(x.reshape(1, -1, shape[-1]), weight.unsqueeze(0),
                                    None if bias is None else bias.unsqueeze(0), eps)
    return y.reshape(shape)


_ARGS = ("input", "normalized_shape", "weight", "bias", "eps")


def try_fold(args, kwargs):
    """The folded layer norm of an F.layer_norm call it can serve exactly,
    else NotImplemented: one normalized dimension, a weight (without one
    torch's own batching rule is a single kernel already), and one dtype."""
    call = dict({"weight": None, "bias": None, "eps": 1e-5}, **dict(zip(_ARGS, args)), **kwargs)
    if len(call) != len(_ARGS):
        return NotImplemented
    x, shape, weight, bias = call["input"], call["normalized_shape"], call["weight"], call["bias"]
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)
            and (bias is None or isinstance(bias, torch.Tensor))):
        return NotImplemented
    if isinstance(shape, int):
        shape = (shape,)
    if (not settings.current().on("layer_norm", x.device) or x.dim() < 1 or x.numel() == 0 or tuple(shape) != (x.shape[-1],)
            or weight.shape != tuple(shape) or (bias is not None and bias.shape != tuple(shape))
            or not _ext.kernels_for(x.device)):
        return NotImplemented
    if x.device.type == "cuda" and autocast_dtype("cuda") is not None:  # float32, as autocast runs layer_norm
        x, weight, bias = (t.float() if t is not None and t.dtype in _LOWER else t for t in (x, weight, bias))
    if not one_float_dtype(x, weight, bias):
        return NotImplemented
    return folded_layer_norm(x, weight, bias, float(call["eps"]))


LAYER_NORM = F.layer_norm
