"""The exact finite-n value SGLD targets for a two-parameter model, by
quadrature: the mean of nbeta * (L(w) - L(w*)) under the localized tempered
posterior  p(w) ~ exp(-nbeta * L(w) - gamma/2 * |w - w*|^2).

This is the known answer estimate_llc is tested against for singular models,
where no closed form exists at finite n."""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch


def localized_llc_2d(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], w_star: Tuple[float, float], *,
                     nbeta: float, gamma: float, half_width: Optional[float] = None,
                     points: int = 2001, stretch: float = 0.0) -> float:
    """``loss(a, b)`` evaluates L on float64 grids of the two parameters
    (broadcasting). The grid is centred on w* and spans ``half_width`` each
    way: by default 8 standard deviations of the localizing Gaussian
    (8 / sqrt(gamma)), which holds all but ~1e-15 of the mass whatever L does.
    The integrand is smooth, so the trapezoid rule on ``points`` x ``points``
    nodes converges fast; double ``points`` to check. ``stretch`` > 0 packs
    the nodes towards w* (node = half * sinh(stretch * u) / sinh(stretch) for
    u uniform in [-1, 1]) for large nbeta, where the mass sits in a thin cross
    along the singular axes."""
    if gamma <= 0 and half_width is None:
        raise ValueError("gamma must be > 0 to bound the integral, or pass half_width")
    if nbeta <= 0:
        raise ValueError(f"nbeta must be > 0, got {nbeta}")
    half = half_width if half_width is not None else 8.0 / math.sqrt(gamma)
    offsets, weights = _nodes(half, points, stretch)
    aa, bb = torch.meshgrid(w_star[0] + offsets, w_star[1] + offsets, indexing="ij")
    l0 = loss(torch.tensor(w_star[0], dtype=torch.float64), torch.tensor(w_star[1], dtype=torch.float64))
    energy = nbeta * (loss(aa, bb) - l0)
    log_p = -energy - gamma / 2 * ((aa - w_star[0]) ** 2 + (bb - w_star[1]) ** 2)
    weight = torch.exp(log_p - log_p.max())
    weight = weight * weights[:, None] * weights[None, :]
    return float((weight * energy).sum() / weight.sum())


def _nodes(half: float, points: int, stretch: float):
    """Trapezoid nodes and weights in u, mapped to offsets with the Jacobian."""
    u = torch.linspace(-1.0, 1.0, points, dtype=torch.float64)
    trap = torch.ones(points, dtype=torch.float64)
    trap[0] = trap[-1] = 0.5
    if stretch <= 0:
        return half * u, trap
    scale = half / math.sinh(stretch)
    return scale * torch.sinh(stretch * u), trap * scale * stretch * torch.cosh(stretch * u)
