"""The unembedding and the mean next-token loss as one function, where only
first derivatives are needed.

Written as ``token_nll(F.linear(h, w, b), targets).mean()``, the logits (a
language model's largest tensors) make seven passes a step: the product
writes them, the loss reads them, its backward reads them and writes their
gradient, and the gradients of h, w and b each read that. Autograd also
holds the logits from the forward to the backward, and the backward holds
them and their gradient at once.

Because the loss is a mean, d(loss)/d(nll) is the same number for every
row: the scalar's own gradient over N. So the backward can run inside the
forward: ``llcfast::token_nll_grad_`` turns the logits into their gradient
for a unit scalar gradient in place, in the pass that computes the loss,
the three gradient products follow, and the logits are freed before the
forward returns. Six passes, and no logits-sized tensor is held across the
step. The backward scales the saved gradients (the sizes of h, w and b) by
the scalar's gradient. The products are torch's batched ones, as vmap runs
them; for a unit gradient (the engine's) every number equals the composed
form's.

The kernel's work is not differentiable, so the fusion runs only inside
``fused_loss.first_order`` (the fast engine's batched loss-and-gradient
pass); everywhere else the function is the composed form, twice
differentiable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from . import linear as chain_linear
from . import settings
from . import token_loss as fused_loss
from .attention import AUTOCAST_CASTS, autocast_dtype, fold_batch, one_float_dtype, unfold_batch


def linear_token_nll_mean(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor) -> torch.Tensor:
    """The mean over rows of ``token_nll(F.linear(hidden, weight, bias),
    targets)``: hidden [..., D], weight [V, D], bias [V] or None, integer
    targets [...] in [0, V). A scalar, float32 (float64 for float64
    operands)."""
    if torch.compiler.is_compiling():
        return fused_loss.token_nll_for_inductor(F.linear(hidden, weight, bias), targets).mean()
    fused = _fused(hidden, weight, bias, targets)
    if fused is not None:
        return fused
    return fused_loss.token_nll(F.linear(hidden, weight, bias), targets).mean()


def _fused(hidden, weight, bias, targets):
    """The fused form where it serves the call exactly, else None."""
    if not (fused_loss._first_order_depth and torch.is_grad_enabled()
            and all(isinstance(t, torch.Tensor) for t in (hidden, weight, targets))
            and (bias is None or isinstance(bias, torch.Tensor))):
        return None
    device = hidden.device
    if not settings.current().on("head", device) or not _ext.kernels_for(device):
        return None
    vocab = weight.shape[0] if weight.dim() == 2 else -1
    if (hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1] or hidden.numel() == 0
            or (bias is not None and tuple(bias.shape) != (vocab,)) or tuple(targets.shape) != hidden.shape[:-1]):
        return None
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    if not any(needs):
        return None
    # the dtypes the product runs in: autocast's cast of the operands happens inside the function, so that
    # the backward can return each gradient scaled and in its operand's dtype in one pass, the pass
    # autocast's cast back would make anyway (casting here would copy them for nothing). Under autocast
    # the operands may differ: the engine's bf16 working copy of the weight beside fp32 activations.
    dtype = autocast_dtype(device.type)
    compute = [None if t is None else dtype if dtype is not None and t.dtype in AUTOCAST_CASTS else t.dtype
               for t in (hidden, weight, bias)]
    if not one_float_dtype(*compute):
        return None
    rows, width = hidden.numel() // hidden.shape[-1], hidden.shape[-1]
    if compute[1] == weight.dtype and rows < 2 * width:
        # no cast to fold the scaling into: scaling the weight's gradient (V x D) costs more than the pass
        # over the logits (rows x V) saved
        return None
    if targets.dtype.is_floating_point or targets.dtype in (torch.bool, torch.complex64, torch.complex128) \
            or targets.device != device:
        return None  # the composed form raises its error
    with torch.autocast(device.type, enabled=False):
        loss = _LinearTokenNLLMean.apply(
            hidden.reshape(1, -1, width), weight.unsqueeze(0), None if bias is None else bias.unsqueeze(0),
            targets.long().reshape(1, -1), needs, compute[0])[0]
    fused_loss.note_first_order_call("head")
    return loss[0]


def _logits(x, w, b):
    """x [C, N, D] @ w [C, V, D]^T + b [C, V] -> [C, N, V], contiguous; per
    chain with the bias in the matmul's epilogue where chain_linear's fold
    would do so."""
    if b is None:
        return torch.bmm(x, w.transpose(1, 2))
    if x.shape[1] * w.shape[1] < chain_linear.MIN_OUTPUTS_PER_CHAIN:
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
    return chain_linear.addmm_per_chain(x, w.transpose(1, 2), b)


class _LinearTokenNLLMean(torch.autograd.Function):
    """x [C, N, D], w [C, V, D], b [C, V] or None, targets [C, N], the
    product's dtype -> (loss [C], dx, dw, db): each chain's mean loss and its
    gradients for a unit gradient of it, in the product's dtype (None where
    ``needs`` says no gradient is wanted)."""

    @staticmethod
    def forward(x, w, b, targets, needs, dtype):
        x, w, b = (None if t is None else t.to(dtype) for t in (x, w, b))
        logits = _logits(x, w, b)
        nll, _ = torch.ops.llcfast.token_nll_grad_(logits, targets.contiguous(), 1.0 / x.shape[1])
        grad = logits  # [C, N, V], now d(mean nll)/d(logits)
        dx = torch.bmm(grad, w) if needs[0] else None
        dw = torch.bmm(grad.transpose(1, 2), x) if needs[1] else None
        db = grad.sum(1) if needs[2] else None
        return (nll.mean(1), dx, dw, db)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, dx, dw, db = output
        ctx.save_for_backward(dx, dw, db)
        ctx.mark_non_differentiable(*(g for g in (dx, dw, db) if g is not None))
        ctx.set_materialize_grads(False)
        ctx.dtypes = [None if t is None else t.dtype for t in inputs[:3]]

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if grad_loss is None:
            return None, None, None, None, None, None
        # one pass each: the scale, and the operand's dtype (fp32 under autocast) by type promotion
        scaled = [None if g is None else g * grad_loss.to(dtype).view((-1,) + (1,) * (g.dim() - 1))
                  for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*scaled, None, None, None)

    @staticmethod
    def vmap(info, in_dims, x, w, b, targets, needs, dtype):
        n = info.batch_size
        args = [None if t is None else fold_batch(t, d, n) for t, d in zip((x, w, b, targets), in_dims)]
        out = _LinearTokenNLLMean.apply(*args, needs, dtype)
        return tuple(None if t is None else unfold_batch(t, n) for t in out), tuple(
            None if t is None else 0 for t in out)
