"""Pure-torch twin of ``llcfast::lanczos_step_``: same signature as
llcfast.ops.lanczos_step_, the same three reductions in float64 and the
same float32 rounding of w after each update."""
from __future__ import annotations

import torch

from .._checks import check_lanczos_step_args


def lanczos_step_(basis: torch.Tensor,  # [R, m, N] float32; basis[:, j + 1] is written
                  w: torch.Tensor,  # [R, N] float32: H basis[:, j] on entry, the residual on return
                  j: int,
                  out: torch.Tensor,  # [R, 2] float64: (alpha_j, beta_j) per row
                  ) -> None:
    """Mirrors ``llcfast::lanczos_step_``: with V = basis[:, :j+1],
    c1 = V w, alpha = c1[j]; w <- w - V^T c1; c2 = V w; w <- w - V^T c2;
    beta = |w|; basis[:, j+1] = w / beta when j + 1 < m."""
    check_lanczos_step_args(basis, w, j, out)
    m = basis.shape[1]
    v = basis[:, : j + 1].double()  # [R, j+1, N]
    x = w.double()
    c1 = torch.bmm(v, x.unsqueeze(2)).squeeze(2)
    x = (x - torch.bmm(v.transpose(1, 2), c1.unsqueeze(2)).squeeze(2)).float().double()
    c2 = torch.bmm(v, x.unsqueeze(2)).squeeze(2)
    x = (x - torch.bmm(v.transpose(1, 2), c2.unsqueeze(2)).squeeze(2)).float()
    beta = x.double().norm(dim=1)
    w.copy_(x)
    out[:, 0] = c1[:, j]
    out[:, 1] = beta
    if j + 1 < m:
        basis[:, j + 1] = (x.double() * (1.0 / beta.clamp_min(1e-300))[:, None]).float()
