"""Linear layers over stacked chains with the bias added inside the matmul.

Under the fast engine's vmap over chains each chain has its own weight and
bias, and torch's batching rule for ``F.linear`` (and for ``torch.addmm``,
Hugging Face's Conv1D) runs a batched matmul and then a broadcast add: the
output is written, read and written again. For a single weight torch runs
``addmm``, whose CUDA path adds a 1-D bias in cuBLASLt's epilogue, so the
output is written once. Here each chain's output is one such ``addmm``,
written into its slice of the stacked output.

Per-chain products are smaller than the batched one, and a product of too
few output tiles leaves streaming multiprocessors idle; the fold takes only
layers whose output per chain fills about one wave of an H100 (132 SMs at
128 x 128 tiles, MIN_OUTPUTS_PER_CHAIN). An H100 model of the paper's LM
step (bf16, SDPA; benchmarks/bench_traffic.py) counts the unembedding's and
the two qkv projections' bias adds at 0.86 of the step's 7.3 GB.

The backward is torch's (two batched matmuls and a sum), written in torch
ops, so reverse mode can differentiate it again; the fold runs inside
``fused_loss.first_order`` with the other folds (chain_fold.ChainFold).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import settings
from .attention import AUTOCAST_CASTS, autocast_dtype, chain_first, fold_batch, one_float_dtype, unfold_batch

# Off on CPU (fastpath.settings): there addmm copies the bias into the
# output before the product, the same bytes as the add it replaces.
# 2^21 outputs a chain: 128 tiles of 128 x 128, about one wave on 132 SMs.
MIN_OUTPUTS_PER_CHAIN = 1 << 21


def addmm_per_chain(x: torch.Tensor, m: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [C, R, I] @ m [C, I, O] + bias [C, O] -> [C, R, O], contiguous: one
    addmm a chain, with the bias in the matmul's epilogue."""
    out = x.new_empty((x.shape[0], x.shape[1], m.shape[2]))
    for c in range(x.shape[0]):
        torch.addmm(bias[c], x[c], m[c], out=out[c])
    return out


class _ChainAddmm(torch.autograd.Function):
    """x [C, R, I] @ m [C, I, O] + bias [C, O] -> [C, R, O], one addmm a
    chain; ``m_is_weight_t``: m is a linear layer's weight [C, O, I]
    transposed, whose gradient is then computed in the weight's layout."""

    @staticmethod
    def forward(x, m, bias, m_is_weight_t):
        return addmm_per_chain(x, m, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, m, _, ctx.m_is_weight_t = inputs
        ctx.save_for_backward(x, m)

    @staticmethod
    def backward(ctx, grad):
        x, m = ctx.saved_tensors
        # autocast chose the forward's dtype; the backward keeps it, as torch's linear does
        with torch.autocast(grad.device.type, enabled=False):
            dx = grad @ m.transpose(-1, -2) if ctx.needs_input_grad[0] else None
            dm = None
            if ctx.needs_input_grad[1]:
                dm = (grad.transpose(-1, -2) @ x).transpose(-1, -2) if ctx.m_is_weight_t else x.transpose(-1, -2) @ grad
            dbias = grad.sum(1) if ctx.needs_input_grad[2] else None
        return dx, dm, dbias, None

    @staticmethod
    def vmap(info, in_dims, x, m, bias, m_is_weight_t):
        n = info.batch_size
        x_dim, m_dim, bias_dim, _ = in_dims
        if m_dim is None and bias_dim is None:  # one weight for all chains: one addmm over all their rows
            if x_dim is None:
                return torch.addmm(bias[0], x[0], m[0]).unsqueeze(0), None
            rows = chain_first(x, x_dim, n)
            out = torch.addmm(bias[0], rows.reshape(-1, rows.shape[-1]), m[0])
            return out.reshape(rows.shape[:-1] + (m.shape[-1],)), 0
        out = _ChainAddmm.apply(*(fold_batch(t, d, n) for t, d in zip((x, m, bias), in_dims)), m_is_weight_t)
        return unfold_batch(out, n), 0


def folded_addmm(x: torch.Tensor, m: torch.Tensor, bias: torch.Tensor, m_is_weight_t: bool = False) -> torch.Tensor:
    """x [..., I] @ m [I, O] + bias [O] of one dtype, whose vmap runs one
    addmm per mapped index, each with the bias inside the matmul."""
    shape = x.shape
    with torch.autocast(x.device.type, enabled=False):
        y = _ChainAddmm.apply(x.reshape(1, -1, shape[-1]), m.unsqueeze(0), bias.unsqueeze(0), m_is_weight_t)
    return y.reshape(shape[:-1] + (m.shape[-1],))


def _fold(x, m, bias, m_is_weight_t):
    """folded_addmm where it serves the call exactly and pays, else
    NotImplemented."""
    if not all(isinstance(t, torch.Tensor) for t in (x, m, bias)):
        return NotImplemented
    if (not settings.current().on("linear", x.device) or x.dim() < 1 or m.dim() != 2 or bias.shape != (m.shape[1],)
            or x.shape[-1] != m.shape[0] or x.numel() // max(x.shape[-1], 1) * m.shape[1] < MIN_OUTPUTS_PER_CHAIN):
        return NotImplemented
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:  # autocast's cast of a matmul's operands, done here
        x, m, bias = (t.to(dtype) if t.dtype in AUTOCAST_CASTS else t for t in (x, m, bias))
    if not one_float_dtype(x, m, bias):
        return NotImplemented
    return folded_addmm(x, m, bias, m_is_weight_t)


def try_fold_linear(args, kwargs):
    """The folded F.linear(input, weight, bias) of a call with a bias (without
    one torch's batched matmul is the whole layer already)."""
    call = dict({"bias": None}, **dict(zip(("input", "weight", "bias"), args)), **kwargs)
    weight = call["weight"]
    if len(call) != 3 or call["bias"] is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return NotImplemented
    return _fold(call["input"], weight.transpose(0, 1), call["bias"], True)


def try_fold_addmm(args, kwargs):
    """The folded torch.addmm(input, mat1, mat2) of a call with a 1-D bias
    as ``input`` and no scaling (Hugging Face's Conv1D)."""
    call = dict({"beta": 1, "alpha": 1, "out": None}, **dict(zip(("input", "mat1", "mat2"), args)), **kwargs)
    if (len(call) != 6 or call["out"] is not None or call["beta"] != 1 or call["alpha"] != 1
            or not isinstance(call["mat1"], torch.Tensor) or call["mat1"].dim() != 2):
        return NotImplemented
    return _fold(call["mat1"], call["mat2"], call["input"], False)


LINEAR = F.linear
ADDMM = torch.addmm
