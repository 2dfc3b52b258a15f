"""The next-token loss as one fused kernel per direction, where only first
derivatives are needed.

``log_softmax`` then ``gather`` makes, per direction, several passes over the
logits, which are the largest tensors of a language model: forward a
log-softmax written out in full; backward a zero-filled tensor, a scatter
into it and softmax's backward (under bf16 autocast, a cast each way too).
``llcfast::token_nll`` reads each row once forward and once backward, and
writes the gradient once, in the logits' dtype.

Its backward is not itself differentiable, so the kernel runs only inside
:func:`first_order`, which the fast engine enters around its batched
loss-and-gradient pass. Everywhere else (Hessian statistics, training, any
torch.func transform of a user's own) ``token_nll`` is the pure-torch twin
in llcfast.reference, twice differentiable. Under torch.compile, which
cannot trace the kernel's vmap rule, it is the twin's numbers in a form
Inductor fuses (:func:`token_nll_for_inductor`).
"""
from __future__ import annotations

import contextlib

import torch

from .. import _ext
from .. import twins as reference
from .._checks import check_token_nll_args
from ..ops import VMAP_RULES
from . import settings
from .fold import ChainFold

_first_order_depth = 0
_fold_modes = []  # the ChainFold modes of the first_order() contexts entered, innermost last

# Off on CPU (fastpath.settings): torch's vectorised log_softmax beats the
# scalar kernel there; the tests turn it on to hold the CUDA kernel's semantics.



@contextlib.contextmanager
def first_order(fold: bool = True):
    """Inside: ``token_nll`` may use its fused kernel and
    ``fused_head.linear_token_nll_mean`` its fused form, and with ``fold``
    SDPA, layer-norm and linear calls fold stacked chains (chain_fold); the
    fused loss's, SDPA's and layer norm's backwards have no derivative of
    their own. Yields the fold's mode (its ``calls`` counts the calls it
    folded by kind, and the fused heads as "head"), or None. The kernel flag is process-wide, like torch's backend
    flags; the mode is this thread's."""
    global _first_order_depth
    _first_order_depth += 1
    try:
        if fold:
            with ChainFold() as mode:
                _fold_modes.append(mode)
                try:
                    yield mode
                finally:
                    _fold_modes.pop()
        else:
            yield None
    finally:
        _first_order_depth -= 1


def note_first_order_call(kind: str) -> None:
    """Counts a call that took a first-order-only path of ``kind`` (e.g.
    the fused head) with the innermost first_order()'s folded calls."""
    if _fold_modes:
        _fold_modes[-1].calls[kind] += 1


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[..., target] for every row: logits [..., V] (float32,
    float64, bf16 or fp16), integer targets [...] in [0, V). Returns [...] in
    float32 (float64 for float64 logits). A target outside [0, V) gives NaN
    from the kernel (a check on the GPU would stall it) and an error from the
    twin."""
    if torch.compiler.is_compiling():
        return token_nll_for_inductor(logits, targets)
    if (VMAP_RULES and _first_order_depth and isinstance(logits, torch.Tensor)
            and settings.current().on("token_loss", logits.device) and _ext.kernels_for(logits.device)):
        targets = check_token_nll_args(logits, targets)
        return _TokenNLL.apply(logits.contiguous(), targets.contiguous())
    return reference.token_nll(logits, targets)  # which checks its arguments itself


def token_nll_for_inductor(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The twin's numbers, log-sum-exp minus the target's logit, with the
    target's logit picked by comparing each column with the target instead
    of by gather. Inductor folds that comparison into the log-sum-exp's pass
    over the logits, and its backward into softmax's: one pass each way.
    gather's backward would scatter into a zero-filled tensor the size of
    the logits, two more passes (an H100 model of the paper's LM step in
    bf16: 6.18 GB of non-matmul traffic with gather, 4.86 GB like this;
    benchmarks/bench_traffic.py). A target outside [0, V) gives NaN, as
    the kernel does."""
    targets = check_token_nll_args(logits, targets)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    vocab = x.shape[-1]
    hit = torch.arange(vocab, device=x.device) == targets.unsqueeze(-1)
    picked = torch.where(hit, x, 0.0).sum(-1)
    valid = (targets >= 0) & (targets < vocab)
    return torch.where(valid, torch.logsumexp(x, -1) - picked, float("nan"))


class _TokenNLL(torch.autograd.Function):
    """The kernel pair as one differentiable function. torch.func needs an
    autograd.Function with setup_context (torch.library's own autograd
    registration is not one); its vmap rule comes from the ops' own."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, targets):
        return torch.ops.llcfast.token_nll(logits, targets)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, targets = inputs
        ctx.save_for_backward(logits, output[1], targets)
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_nll, grad_lse):
        logits, lse, targets = ctx.saved_tensors
        if grad_nll is None:
            return None, None
        return torch.ops.llcfast.token_nll_backward(grad_nll.contiguous(), logits, lse, targets), None

    @classmethod
    def apply(cls, logits, targets):
        return super().apply(logits, targets)[0]
