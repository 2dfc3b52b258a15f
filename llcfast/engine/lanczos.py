"""Lanczos with full reorthogonalization, run for many rows at once (one
start vector per row; rows may sit at different points), on flat [R, N]
vectors; each step after the matvec is one fused llcfast.ops.lanczos_step_."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import ops
from .common import first_line


@dataclass
class LanczosRun:
    alphas: torch.Tensor  # [R, m] float64
    betas: torch.Tensor  # [R, m - 1] float64
    basis: Optional[torch.Tensor]  # [R, m, N] float32 (kept for eigenvectors)
    steps: int
    beta_next: Optional[torch.Tensor] = None  # [R]: the norm of the residual after the last step

    def tridiagonal(self) -> torch.Tensor:  # [R, m, m] float64
        t = torch.diag_embed(self.alphas)
        if self.betas.shape[1]:
            t = t + torch.diag_embed(self.betas, 1) + torch.diag_embed(self.betas, -1)
        return t


# Basis rows allocated at first, then doubled as steps go on: full
# reorthogonalization keeps every basis vector, so a basis sized for
# max_iter would hold max_iter x N floats per row even when Lanczos
# converges in a few dozen steps (100 x 124M parameters is 46 GiB).
FIRST_BLOCK = 32


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, steps: int, *,
            converged: Optional[Callable[[LanczosRun], bool]] = None, check_every: int = 5,
            reserve_all: bool = False, lower: str = "", bar=None) -> LanczosRun:
    """``matvec``: [R, N] -> [R, N] (a symmetric operator per row);
    ``start``: [R, N]. Stops after ``steps`` steps, at an invariant subspace
    (every row's residual ~ 0), or when ``converged(run)`` says so. The
    basis grows with the steps taken, or holds all ``steps`` from the start
    with ``reserve_all`` (a run that always takes them); where it does not
    fit, a MemoryError says how much it needs and, in ``lower``, what to
    lower. ``bar``: a progress bar, advanced once per step."""
    rows, n = start.shape
    steps = min(steps, n)
    basis = _basis(rows, steps if reserve_all else min(steps, FIRST_BLOCK), n, start.device, steps, lower)
    alphas = torch.zeros(rows, steps, dtype=torch.float64, device=start.device)
    betas = torch.zeros(rows, max(steps - 1, 0), dtype=torch.float64, device=start.device)
    v = start / start.double().norm(dim=1, keepdim=True).clamp_min(1e-300).float()
    basis[:, 0] = v
    ab = torch.empty(rows, 2, dtype=torch.float64, device=start.device)
    taken = steps
    for j in range(steps):
        if j + 1 == basis.shape[1] < steps:  # the step writes basis[:, j + 1]
            grown = _basis(rows, min(steps, 2 * basis.shape[1]), n, start.device, steps, lower)
            grown[:, : j + 1] = basis
            basis = grown
        w = matvec(basis[:, j]).to(torch.float32).contiguous()
        # One fused step: alpha, full reorthogonalization (twice: "twice is
        # enough", and it also removes the alpha and beta terms), beta, and
        # the next basis vector.
        ops.lanczos_step_(basis, w, j, ab)
        if bar is not None:  # callers without a bar
            bar.update(1)
        alphas[:, j] = ab[:, 0]
        beta = ab[:, 1].clone()
        scale = alphas[:, : j + 1].abs().amax(1).clamp_min(1e-30)
        if j == steps - 1 or bool((beta <= 1e-10 * scale).all()):
            taken = j + 1
            break
        betas[:, j] = beta
        if converged is not None and (j + 1) % check_every == 0:
            run = LanczosRun(alphas[:, : j + 1], betas[:, :j], basis[:, : j + 1], j + 1, beta)
            if converged(run):
                taken = j + 1
                break
    return LanczosRun(alphas[:, :taken], betas[:, : taken - 1], basis[:, :taken], taken, beta)


def _basis(rows: int, m: int, n: int, device: torch.device, steps: int, lower: str) -> torch.Tensor:
    """An empty [rows, m, n] float32 basis, or a MemoryError that names it."""
    need = rows * m * n * 4
    try:
        return torch.empty(rows, m, n, dtype=torch.float32, device=device)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not isinstance(exc, torch.OutOfMemoryError) and "memory" not in str(exc):
            raise
        raise MemoryError(
            f"Lanczos with full reorthogonalization keeps every basis vector: {rows} run(s) x {m} steps x {n} "
            f"parameters = {need / 2**30:.2f} GiB (of up to {steps} steps) does not fit on {device} "
            f"({first_line(exc, 'out of memory')})" + (f"; {lower}" if lower else "")) from exc


def ritz(run: LanczosRun):
    """Ritz values [R, m] ascending and the eigenvectors of T [R, m, m]."""
    return torch.linalg.eigh(run.tridiagonal())
