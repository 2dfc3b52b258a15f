"""What the Hessian statistics return: trace, eigenvalues, spectral density."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch


@dataclass
class HessianTrace:
    trace: np.ndarray  # [C] (C = 1 at the model's own weights)
    std_error: np.ndarray  # [C]
    per_probe: np.ndarray  # [C, P]: v^T H v for each Rademacher probe v
    num_hvps: int
    config: Dict = field(default_factory=dict)
    timings: Dict = field(default_factory=dict)


@dataclass
class HessianEigs:
    values: np.ndarray  # [C, k], largest first (or smallest first for which="smallest")
    vectors: Optional[List[Dict[str, torch.Tensor]]]  # per point: {name: [k, *shape]}, when asked for
    residuals: np.ndarray  # [C, k] Ritz residual norms |beta * s_last|
    num_hvps: int
    config: Dict = field(default_factory=dict)


@dataclass
class HessianSpectrum:
    nodes: np.ndarray  # [C, V, m] Ritz values of each start vector's Lanczos run
    weights: np.ndarray  # [C, V, m] squared first components; each run's sum to 1
    num_hvps: int
    config: Dict = field(default_factory=dict)

    def density(self, grid, sigma: Optional[float] = None, point: int = 0) -> np.ndarray:
        """Gaussian-smoothed spectral density on ``grid`` (integrates to 1),
        averaged over the start vectors: PyHessian's density."""
        grid = np.asarray(grid, dtype=np.float64)
        nodes, weights = self.nodes[point], self.weights[point]
        if sigma is None:
            sigma = 0.01 * max(float(nodes.max() - nodes.min()), 1e-12)
        z = (grid[None, None, :] - nodes[..., None]) / sigma
        dens = (weights[..., None] * np.exp(-0.5 * z ** 2)).sum(1) / (sigma * math.sqrt(2 * math.pi))
        return dens.mean(0)

    def plot(self, path: Optional[str] = None, ax=None, sigma: Optional[float] = None, point: int = 0):
        """The density on a log scale, as PyHessian draws it."""
        import matplotlib
        if ax is None and path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        lo, hi = float(self.nodes[point].min()), float(self.nodes[point].max())
        pad = 0.05 * max(hi - lo, 1e-12)
        grid = np.linspace(lo - pad, hi + pad, 1000)
        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(7, 4))
        ax.semilogy(grid, self.density(grid, sigma, point) + 1e-12)
        ax.set(xlabel="eigenvalue", ylabel="density", title=f"Hessian spectral density ({self.nodes.shape[1]} runs "
                                                              f"x {self.nodes.shape[2]} Lanczos steps)")
        fig = fig or ax.figure
        if path is not None:
            fig.savefig(path, dpi=120, bbox_inches="tight")
        return fig
