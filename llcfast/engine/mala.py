"""The MALA acceptance probability of each SGLD step, as a diagnostic of the
step size (devinterp reports the same): were the step a Metropolis-adjusted
Langevin proposal for the tempered, localized posterior, how likely would it
be accepted? Values well below 1 mean epsilon is large for this loss surface.

With U(w) = nbeta L(w) + gamma/2 |w - w*|^2 + weight_decay/2 |w|^2 and the
drift D(w) = grad U(w), the SGLD step w -> w' proposes
N(w - eps/2 D(w), eps s^2 I) (s = noise_scale), and

    log a = U(w) - U(w') - |w - w' + eps/2 D(w')|^2 / (2 eps s^2)
                         + |w' - w + eps/2 D(w)|^2 / (2 eps s^2),

acceptance = min(1, exp(log a)). L is the minibatch loss each step drew, so
consecutive steps see different batches: a heuristic, as in devinterp.
Everything stays on the device, so a captured CUDA graph holds it.
"""
from __future__ import annotations

from typing import List, Optional

import torch


class MalaTracker:
    def __init__(self, params: List[torch.Tensor], centers: List[torch.Tensor],
                 masks: Optional[List[torch.Tensor]], *, steps: int, eps: float, nbeta: float, gamma: float,
                 weight_decay: float, noise_scale: float):
        chains, device = params[0].shape[0], params[0].device
        self.centers, self.eps, self.nbeta, self.gamma, self.wd = centers, eps, nbeta, gamma, weight_decay
        self.masks = [None] * len(params) if masks is None else [m.to(torch.float32) for m in masks]
        self.inv_two_var = 1.0 / (2.0 * eps * noise_scale ** 2)
        self.prev = [p.detach().clone() for p in params]
        self.prev_drift = [torch.zeros_like(p) for p in params]
        self.prev_u = torch.zeros(chains, dtype=torch.float64, device=device)
        # row t: the step t-1 -> t; row 0 has no step before it and is dropped
        self.trace = torch.full((steps, chains), float("nan"), dtype=torch.float32, device=device)

    def observe(self, params, grads, losses: torch.Tensor, step_tensor: torch.Tensor) -> None:
        """Called at every step before the update, with the chains' current
        position, their loss gradients and losses."""
        chains = losses.shape[0]
        back = torch.zeros(chains, dtype=torch.float64, device=losses.device)  # |w - w' + eps/2 D(w')|^2
        forth = torch.zeros_like(back)  # |w' - w + eps/2 D(w)|^2
        u = self.nbeta * losses.detach().to(torch.float64)
        half = 0.5 * self.eps
        for i, (w, g) in enumerate(zip(params, grads)):
            mask, c = self.masks[i], self.centers[i]
            drift = self.nbeta * g + self.gamma * (w - c)
            if self.wd:
                drift = drift + self.wd * w
            if mask is not None:
                drift = drift * mask
            step = w - self.prev[i]
            back += _per_chain_sq(half * drift - step)
            forth += _per_chain_sq(step + half * self.prev_drift[i])
            away = w - c if mask is None else (w - c) * mask
            u += 0.5 * self.gamma * _per_chain_sq(away)
            if self.wd:
                u += 0.5 * self.wd * _per_chain_sq(w if mask is None else w * mask)
            self.prev[i].copy_(w)
            self.prev_drift[i].copy_(drift)
        log_a = (self.prev_u - u) - (back - forth) * self.inv_two_var
        self.trace.index_copy_(0, step_tensor, log_a.clamp(max=0.0).exp().to(torch.float32).reshape(1, -1))
        self.prev_u.copy_(u)

    def result(self, steps: Optional[int] = None):
        """[C, steps - 1] acceptance probabilities on the host (of the first
        ``steps`` steps; default all)."""
        return self.trace[1:steps].t().double().cpu().numpy()


def _per_chain_sq(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(torch.float64).square().sum(1)
