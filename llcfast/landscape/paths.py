"""The loss along a path between two weight sets (two checkpoints of a run,
or two seeds). The points are stacked as the sampler stacks chains, and
vmap evaluates them together on each batch (on a CPU, one at a time where
one point's activations are large: landscape/passes.py).

Paths: "linear", w(t) = (1 - t) a + t b; "bezier", the quadratic Bezier
curve (1 - t)^2 a + 2 t (1 - t) theta + t^2 b whose midpoint theta is
trained to lower the mean loss along the curve (from (a + b) / 2, Adam on
the loss at a uniformly random t per step). The barrier is the largest
excess of the loss over the straight line between the end losses.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .._checks import check_int
from ..engine.common import default_loss, resolve_device, to_device, trainable
from ..engine.functional import chain_loss
from ..engine.loaders import check_loader, loader_batches
from ..engine.progress import progress_bar
from . import passes

PATHS = ("linear", "bezier")


@dataclass
class PathResult:
    """``t`` [P] in [0, 1]; ``loss`` [P] the mean loss over the loader at
    each point (``test_loss`` likewise over a test loader, or None);
    ``barrier`` (and ``test_barrier``) max_t [loss(t) - ((1 - t) loss(0) +
    t loss(1))], at ``barrier_t``."""
    t: np.ndarray
    loss: np.ndarray
    barrier: float
    barrier_t: float
    path: str
    test_loss: Optional[np.ndarray] = None
    test_barrier: Optional[float] = None
    config: Dict = field(default_factory=dict)

    def plot(self, path: Optional[str] = None, ax=None, label: Optional[str] = None):
        """The loss along the path with the straight line between its ends."""
        import matplotlib
        if ax is None and path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 4))
        curves = [("train", self.loss, self.barrier)] + (
            [("test", self.test_loss, self.test_barrier)] if self.test_loss is not None else [])
        for name, loss, barrier in curves:
            line, = ax.plot(self.t, loss, marker=".", label=f"{label or name} (barrier {barrier:.3g})")
            ax.plot([0, 1], [loss[0], loss[-1]], ls="--", lw=0.8, color=line.get_color())
        ax.set(title=f"loss along the {self.path} path", xlabel="t (0: a, 1: b)", ylabel="loss")
        ax.legend(fontsize=8)
        if fig is not None and path is not None:
            fig.savefig(path, dpi=120, bbox_inches="tight")
            plt.close(fig)
        return ax


def barrier(t: np.ndarray, loss: np.ndarray):
    """(max_t [loss(t) - chord(t)], the t where it is largest)."""
    excess = loss - ((1 - t) * loss[0] + t * loss[-1])
    k = int(np.nanargmax(excess))
    return float(excess[k]), float(t[k])


def endpoints(model_a, model_b) -> List[str]:
    """The trainable parameters both models hold, checked to match in name
    and shape."""
    a, b = dict(trainable(model_a)), dict(trainable(model_b))
    if list(a) != list(b):
        missing = sorted(set(a) ^ set(b))
        raise ValueError(f"model_a and model_b must have the same trainable parameters; they differ in {missing[:5]}")
    for name in a:
        if a[name].shape != b[name].shape:
            raise ValueError(f"parameter {name!r} has shape {tuple(a[name].shape)} in model_a but "
                             f"{tuple(b[name].shape)} in model_b")
    return list(a)


def points_on(path: str, t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, theta: Optional[torch.Tensor]):
    """The path's points at ``t`` [P] for one parameter: [P, *shape]."""
    shape = (-1,) + (1,) * a.dim()
    t = t.to(a.dtype).reshape(shape)
    if path == "linear":
        return (1 - t) * a + t * b
    return (1 - t) ** 2 * a + 2 * t * (1 - t) * theta + t ** 2 * b


def loss_along_path(model_a: torch.nn.Module, model_b: torch.nn.Module, loader, loss_fn: Optional[Callable] = None,
                    *, points: int = 33, path: str = "linear", test_loader=None, bend_steps: int = 200,
                    bend_lr: float = 1e-2, seed: int = 0, device=None, points_per_pass: Optional[int] = None,
                    progress: bool = True) -> PathResult:
    """The loss at ``points`` evenly spaced points of the path from model_a's
    weights (t = 0) to model_b's (t = 1), averaged over one pass of
    ``loader`` (and of ``test_loader`` where given); buffers are model_a's.
    ``path="bezier"`` first trains the curve's midpoint for ``bend_steps``
    Adam steps of rate ``bend_lr`` on the loader's batches.
    ``points_per_pass``: points to a batched pass; by default all of them on
    a GPU, and on a CPU one at a time where one point's activations are
    large (landscape/passes.py)."""
    points = check_int("points", points, minimum=2)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    check_loader(loader)
    if test_loader is not None:
        check_loader(test_loader, "test_loader")
    names = endpoints(model_a, model_b)
    device = resolve_device(device, model_a)
    base = copy.deepcopy(model_a).to(device)
    loss = chain_loss(base, loss_fn or default_loss, names)
    a = [p.detach().to(device) for _, p in trainable(model_a)]
    b = [p.detach().to(device) for _, p in trainable(model_b)]
    theta = None
    if path == "bezier":
        theta = _bend(loss, a, b, loader, device, check_int("bend_steps", bend_steps, minimum=0), bend_lr, seed,
                      progress)
    t = torch.linspace(0, 1, points, dtype=torch.float64)
    stacked = tuple(points_on(path, t, pa, pb, None if theta is None else theta[i]).to(pa.dtype)
                    for i, (pa, pb) in enumerate(zip(a, b)))
    per_pass = passes.points_per_pass(points_per_pass, loss, stacked, loader, device, seed, "points_per_pass")
    train = _evaluated(loss, stacked, loader, device, seed, per_pass, progress, "the path")
    found, at = barrier(t.numpy(), train)
    result = PathResult(t=t.numpy(), loss=train, barrier=found, barrier_t=at, path=path,
                        config={"points": points, "path": path, "device": str(device), "seed": seed,
                                "points_per_pass": per_pass})
    if test_loader is not None:
        result.test_loss = _evaluated(loss, stacked, test_loader, device, seed, per_pass, progress, "the path (test)")
        result.test_barrier = barrier(result.t, result.test_loss)[0]
    if theta is not None:
        result.config.update(bend_steps=bend_steps, bend_lr=bend_lr)
    return result


def _evaluated(loss, stacked, loader, device, seed: int, per_pass: int, progress: bool, what: str) -> np.ndarray:
    bar = progress_bar(progress, len(loader) if hasattr(loader, "__len__") else None, what, unit="batch")
    try:
        return passes.mean_over_loader(loss, stacked, loader, device, seed, per_pass, on_batch=lambda: bar.update(1))
    finally:
        bar.close()


def _bend(loss, a, b, loader, device, steps: int, lr: float, seed: int, progress: bool) -> List[torch.Tensor]:
    """The Bezier midpoint: from (a + b) / 2, Adam on the loss at a random t."""
    theta = [((pa + pb) / 2).clone().requires_grad_() for pa, pb in zip(a, b)]
    optimizer = torch.optim.Adam(theta, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    batches = loader_batches(loader, seed, endless=True)
    bar = progress_bar(progress, steps, "Bezier midpoint")
    for _ in range(steps):
        t = torch.rand(1, generator=gen, dtype=torch.float64)
        point = tuple(points_on("bezier", t, pa, pb, th)[0] for pa, pb, th in zip(a, b, theta))
        value = loss(point, to_device(next(batches), device))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        bar.update(1)
    bar.close()
    return [th.detach() for th in theta]
