"""Reference MALA acceptance for one chain, in float64 (the fast engine's is
llcfast/engine/mala.py, in float32 on the device with float64 sums): the
Langevin proposal's density ratio and the change of
U = nbeta L + gamma/2 |w - w*|^2 + weight_decay/2 |w|^2 between steps."""
from __future__ import annotations

import math
from typing import List, Optional

import torch


class ChainMala:
    def __init__(self, centers: List[torch.Tensor], masks: Optional[List[torch.Tensor]], *, eps: float, nbeta: float,
                 gamma: float, weight_decay: float, noise_scale: float):
        self.centers = [c.detach().double() for c in centers]
        self.masks = [None] * len(centers) if masks is None else [m.double() for m in masks]
        self.eps, self.nbeta, self.gamma, self.wd = eps, nbeta, gamma, weight_decay
        self.var = eps * noise_scale ** 2
        self.prev = None  # (position, drift, U)
        self.values: List[float] = []  # one per step after the first

    def observe(self, params: List[torch.Tensor], grads: List[torch.Tensor], loss: float) -> None:
        w = [p.detach().double() for p in params]
        drift, u = [], self.nbeta * loss
        for x, g, c, m in zip(w, grads, self.centers, self.masks):
            d = self.nbeta * g.double() + self.gamma * (x - c) + self.wd * x
            m = torch.ones_like(x) if m is None else m
            drift.append(d * m)
            u += 0.5 * self.gamma * float((((x - c) * m) ** 2).sum()) + 0.5 * self.wd * float(((x * m) ** 2).sum())
        if self.prev is not None:
            w0, d0, u0 = self.prev
            log_back = -sum(float(((a - b + 0.5 * self.eps * d) ** 2).sum()) for a, b, d in zip(w0, w, drift))
            log_forth = -sum(float(((b - a + 0.5 * self.eps * d) ** 2).sum()) for a, b, d in zip(w0, w, d0))
            log_a = u0 - u + (log_back - log_forth) / (2 * self.var)
            self.values.append(math.exp(min(log_a, 0.0)))
        self.prev = (w, drift, u)
