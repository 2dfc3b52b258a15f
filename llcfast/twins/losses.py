"""Pure-torch twin of the fused next-token loss (``llcfast::token_nll``).
Twice differentiable, so Hessian statistics and any torch.func transform run
through it."""
from __future__ import annotations

import torch

from .._checks import check_token_nll_args


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mirrors ``llcfast::token_nll``: -log softmax(logits)[..., target] per
    row, in float32 (float64 for float64 logits), the softmax taken in that
    precision as bf16 autocast does for log_softmax."""
    targets = check_token_nll_args(logits, targets)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = logits.to(acc).log_softmax(-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_nll_grad_(logits: torch.Tensor, targets: torch.Tensor, scale: float):
    """Mirrors ``llcfast::token_nll_grad_``: returns (nll, lse) as token_nll
    and its log-sum-exp, and overwrites ``logits`` with their gradient for
    d(loss)/d(nll) = ``scale`` on every row, scale * (softmax - onehot)."""
    targets = check_token_nll_args(logits, targets)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.detach().to(acc)
    lse = torch.logsumexp(x, -1)
    nll = lse - x.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    grad = torch.exp(x - lse.unsqueeze(-1))
    grad.scatter_add_(-1, targets.unsqueeze(-1), torch.full_like(lse, -1.0).unsqueeze(-1))
    with torch.no_grad():
        logits.copy_(grad * scale)
    return nll, lse
