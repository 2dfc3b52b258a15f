"""Pure-torch twins of the per-chain layer norm kernels
(``llcfast::chain_layer_norm`` and ``llcfast::chain_layer_norm_backward``)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def chain_layer_norm(
    x: torch.Tensor,  # [C, R, D]
    weight: torch.Tensor,  # [C, D]
    bias: Optional[torch.Tensor],  # [C, D] or None
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mirrors ``llcfast::chain_layer_norm``: each row of chain c normalized
    over its last dimension (biased variance, as layer_norm), then scaled by
    weight[c] and shifted by bias[c]. Returns (y [C, R, D] in x's dtype,
    mean [C, R], rstd [C, R] in float32, float64 for float64 x)."""
    acc = _acc(x)
    xf = x.to(acc)
    mean = xf.mean(-1)
    rstd = torch.rsqrt(xf.var(-1, unbiased=False) + eps)
    y = (xf - mean.unsqueeze(-1)) * rstd.unsqueeze(-1) * weight.to(acc).unsqueeze(1)
    if bias is not None:
        y = y + bias.to(acc).unsqueeze(1)
    return y.to(x.dtype), mean, rstd


def chain_layer_norm_backward(
    grad: torch.Tensor,  # [C, R, D]: d(loss)/dy
    x: torch.Tensor,  # [C, R, D]
    mean: torch.Tensor,  # [C, R]
    rstd: torch.Tensor,  # [C, R]
    weight: torch.Tensor,  # [C, D]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mirrors ``llcfast::chain_layer_norm_backward``: (dx [C, R, D],
    dweight [C, D], dbias [C, D]), in x's and weight's dtype."""
    acc = _acc(x)
    g = grad.to(acc)
    xhat = (x.to(acc) - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    gw = g * weight.to(acc).unsqueeze(1)
    dx = rstd.unsqueeze(-1) * (gw - gw.mean(-1, keepdim=True) - xhat * (gw * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), (g * xhat).sum(1).to(weight.dtype), g.sum(1).to(weight.dtype)
