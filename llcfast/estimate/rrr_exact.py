"""Known answers for reduced-rank regression f(x) = B A x (A: H x M, B: N x H):
Aoyagi's asymptotic learning coefficient, and the exact finite-nbeta value
SGLD targets, by a blocked Gibbs sampler in float64.

The empirical mean squared error is exactly quadratic in the product W = BA:
L(W) = L(W0) + tr((W - W0) S (W - W0)^T), with S = X^T X / n and W0 the
least-squares map. So under the localized tempered posterior
p(A, B) ~ exp(-nbeta L(BA) - gamma/2 (|A - A*|^2 + |B - B*|^2)) each factor
given the other is Gaussian, and alternating exact draws of A | B and B | A
samples it with no step-size error at all. The estimate is the posterior
mean of nbeta (L(BA) - L(B* A*)), with a standard error from independent
chains."""
from __future__ import annotations

from typing import Tuple

import torch


def aoyagi_rrr(m: int, h: int, n: int, r: int) -> float:
    """The learning coefficient of reduced-rank regression with m inputs, h
    hidden units, n outputs at a true map of rank r <= h (Aoyagi and
    Watanabe, 2005)."""
    if not 0 <= r <= h:
        raise ValueError(f"the true rank r must be in [0, h] = [0, {h}], got {r}")
    if m + h < n + r:
        return (h * m - h * r + n * r) / 2
    if n + h < m + r:
        return (h * n - h * r + m * r) / 2
    if m + n < h + r:
        return m * n / 2
    odd = (m + h + n + r) % 2
    return (2 * (h + r) * (m + n) - (m - n) ** 2 - (h + r) ** 2 + odd) / 8


def rrr_exact_llc(x: torch.Tensor, y: torch.Tensor, a_star: torch.Tensor, b_star: torch.Tensor, *, nbeta: float,
                  gamma: float, chains: int = 8, sweeps: int = 4000, burnin: int = 500,
                  seed: int = 0) -> Tuple[float, float]:
    """(mean, standard error) of nbeta (L(BA) - L(B* A*)) under the localized
    tempered posterior of f(x) = B A x with the mean squared error summed
    over outputs (``((x @ A.T @ B.T - y) ** 2).sum(-1).mean()``; for a loss
    that also averages over the outputs, pass nbeta / outputs), by
    ``chains`` independent blocked Gibbs chains of ``sweeps`` sweeps after
    ``burnin``, started at w* = (A*, B*). Everything runs in float64."""
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0 for the localized posterior to be proper, got {gamma}")
    x, y = x.double(), y.double()
    a_star, b_star = a_star.double(), b_star.double()
    hidden, m = a_star.shape
    n_out = b_star.shape[0]
    s = x.T @ x / x.shape[0]
    w0 = torch.linalg.lstsq(x, y).solution.T  # n_out x m
    g = torch.Generator().manual_seed(seed)

    def excess(a, b):  # L(BA) - L(W0), exactly
        d = b @ a - w0
        return torch.einsum("ij,jk,ik->", d, s, d)

    base = excess(a_star, b_star)
    eye_n = torch.eye(n_out, dtype=torch.float64)
    means = []
    for _ in range(chains):
        a, b = a_star.clone(), b_star.clone()
        total, count = 0.0, 0
        for sweep in range(burnin + sweeps):
            # A | B: precision 2 nbeta (S kron B^T B) + gamma I on vec(A) (columns stacked)
            prec = 2 * nbeta * torch.kron(s, b.T @ b) + gamma * torch.eye(hidden * m, dtype=torch.float64)
            lin = 2 * nbeta * (b.T @ w0 @ s).T.reshape(-1) + gamma * a_star.T.reshape(-1)
            a = _gaussian(prec, lin, g).reshape(m, hidden).T
            # B | A: precision 2 nbeta (A S A^T kron I) + gamma I on vec(B)
            prec = 2 * nbeta * torch.kron(a @ s @ a.T, eye_n) + gamma * torch.eye(n_out * hidden, dtype=torch.float64)
            lin = 2 * nbeta * (w0 @ s @ a.T).T.reshape(-1) + gamma * b_star.T.reshape(-1)
            b = _gaussian(prec, lin, g).reshape(hidden, n_out).T
            if sweep >= burnin:
                total += float(excess(a, b) - base)
                count += 1
        means.append(nbeta * total / count)
    values = torch.tensor(means, dtype=torch.float64)
    return float(values.mean()), float(values.std() / chains ** 0.5)


def _gaussian(precision: torch.Tensor, linear: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A draw from N(P^-1 h, P^-1) through the Cholesky factor of P."""
    chol = torch.linalg.cholesky(precision)
    mean = torch.cholesky_solve(linear[:, None], chol)[:, 0]
    z = torch.randn(linear.shape[0], generator=g, dtype=torch.float64)
    return mean + torch.linalg.solve_triangular(chol.T, z[:, None], upper=True)[:, 0]
