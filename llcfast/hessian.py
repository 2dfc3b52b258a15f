"""Hessian statistics at a checkpoint (or at many points at once): trace by
Hutchinson's estimator, extreme eigenvalues by Lanczos (or power iteration),
and the spectral density by stochastic Lanczos quadrature. All use batched
Hessian-vector products (llcfast.engine.hvp) and the loss conventions of
estimate_llc: ``loss_fn(model, batch)``, or the output's ``.loss``."""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from . import ops
from ._checks import check_int, group_offsets_for_sizes
from ._llc_common import (check_precision, checked_loss, default_loss, progress_bar, restriction_masks, to_device,
                          trainable)
from .engine.compiled import check_compile
from .engine.hvp import HVP, check_hvp_mode, finite_difference_gap
from .engine.lanczos import lanczos, ritz
from .engine.planner import free_device_bytes, items_per_pass, measure_activation_bytes


# A central difference in float32 agrees with H v to ~1e-3 on smooth losses;
# a wrong second derivative is off by order one.
FD_GAP_WARN = 0.05


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


class _Problem:
    """The model's parameters as flat [R, N] rows and back, with the HVP."""

    def __init__(self, model, loss_fn, batches, points, restrict, device, precision, compile=False,
                 hvp_mode="reverse-over-reverse"):
        check_precision(precision)
        check_hvp_mode(hvp_mode)
        self.compile_mode = check_compile(compile)
        if isinstance(batches, (str, bytes)) or not hasattr(batches, "__iter__"):
            raise TypeError(f"batches must be a list (or iterable) of batches, got {type(batches).__name__}")
        batches = list(batches)
        if not batches:
            raise ValueError("batches is empty; pass at least one batch")
        loss_fn = loss_fn or default_loss
        device = torch.device(device) if device is not None else next(model.parameters()).device
        model = model.to(device)
        named = trainable(model)
        if not named:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.numel = sum(self.sizes)
        self.device = device
        centers = [p.detach().float().contiguous() for _, p in named]
        masks = restriction_masks(named, restrict)
        self.mask_flat = None if masks is None else torch.cat([m.reshape(-1) for m in masks]).float()
        self.free = self.numel if masks is None else int(self.mask_flat.sum())
        with torch.no_grad():
            checked_loss(loss_fn(model, to_device(batches[0], device)), "at the given weights")
        self.points = None
        if points is not None:
            self.points = [torch.as_tensor(points[n]).to(device, torch.float32).contiguous() for n in self.names]
            c = self.points[0].shape[0]
            for n, p, s in zip(self.names, self.points, self.shapes):
                if tuple(p.shape) != (c,) + s:
                    raise ValueError(f"points[{n!r}] has shape {tuple(p.shape)}; expected {(c,) + s}")
        self.num_points = 1 if self.points is None else self.points[0].shape[0]
        self.hvp = HVP(model, loss_fn, batches, self.names, centers, precision=precision, compile=self.compile_mode,
                       mode=hvp_mode)
        gap = finite_difference_gap(self.hvp, self.probes(1, 0, stream=2**62), enough=FD_GAP_WARN / 10)
        if gap > FD_GAP_WARN:
            warnings.warn(f"llcfast: Hessian-vector products disagree with a finite difference of gradients "
                          f"(relative gap {gap:.2g}); the loss may not be twice differentiable (a custom "
                          "autograd.Function marked once_differentiable, or ops whose second derivative is "
                          "not defined), so these statistics may be wrong", RuntimeWarning, stacklevel=3)

    def unflatten(self, flat: torch.Tensor) -> List[torch.Tensor]:  # [R, N] -> [R, *shape] views
        out, off = [], 0
        for s, n in zip(self.shapes, self.sizes):
            out.append(flat[:, off:off + n].view((flat.shape[0],) + s))
            off += n
        return out

    def matvec(self, flat: torch.Tensor) -> torch.Tensor:  # [R, N] -> [R, N], rows grouped by point
        if self.mask_flat is not None:
            flat = flat * self.mask_flat
        out = self.hvp(self.unflatten(flat), self.points)
        result = torch.cat([o.reshape(flat.shape[0], -1) for o in out], dim=1)
        return result * self.mask_flat if self.mask_flat is not None else result

    def probes(self, rows: int, seed: int, stream: int, row_offset: int = 0) -> List[torch.Tensor]:
        """Rademacher probes row_offset.. of ``stream``, as [R, *shape] tensors (masked)."""
        offsets = group_offsets_for_sizes(self.sizes)
        out = []
        for i, (s, n) in enumerate(zip(self.shapes, self.sizes)):
            v = ops.rademacher(rows, n, seed=seed, stream=stream, row_offset=row_offset, group_offset=offsets[i],
                               device=self.device)
            out.append(v.view((rows,) + s))
        if self.mask_flat is not None:
            masks = self.unflatten(self.mask_flat[None])
            out = [v * m for v, m in zip(out, masks)]
        return out


CPU_PROBES_PER_PASS = 4
PLAN_STREAM = 2**62 + 1  # the measuring passes' probes: a stream no statistic draws from


def _pass_peak_bytes(prob: _Problem, probes: int) -> Optional[int]:
    """Device memory one trace pass of ``probes`` probes per point takes
    above what is allocated before it (CUDA); None where it is not measured."""
    if prob.device.type != "cuda":
        return None
    vecs = prob.probes(probes * prob.num_points, 0, stream=PLAN_STREAM)
    counted = prob.hvp.count
    try:
        return measure_activation_bytes(lambda: prob.hvp(vecs, prob.points, eager=True), prob.device)
    finally:
        prob.hvp.count = counted  # measuring is not the caller's work


def _plan_probes(prob: _Problem, num_probes: int):
    """(probes per pass, the plan or None). On a GPU, two measured passes
    (1 and 2 probes per point) split a pass's memory into what every probe
    adds and what the pass shares (the primal forward and backward), and
    the pass takes as many probes as fit: trying all of them and halving on
    out-of-memory would repeat the work each failed pass had done. Elsewhere
    CPU_PROBES_PER_PASS."""
    one = _pass_peak_bytes(prob, 1) if num_probes > 1 else None
    if one is None:
        return min(num_probes, CPU_PROBES_PER_PASS) if prob.device.type == "cpu" else num_probes, None
    two = _pass_peak_bytes(prob, 2)
    added = max(two - one, 0)
    # The trace loop also holds each probe, and its copy stacked by point.
    per_probe = added + 2 * 4 * prob.numel * prob.num_points
    shared = max(one - added, 0)
    free = free_device_bytes(prob.device)
    n = items_per_pass(num_probes, shared, per_probe, free, item="Hutchinson probe", what=str(prob.device),
                       lower="use fewer or smaller batches, precision='bf16', restrict= to fewer parameters, or "
                             "fewer points")
    return n, dict(probes_per_pass=n, bytes_per_probe=per_probe, shared_bytes=shared, free_bytes=free)


def _compiled(prob: _Problem) -> dict:
    """config["compile"]: whether the passes ran compiled to the end, where asked for."""
    return {} if prob.compile_mode is None else {"compile": prob.hvp.compiled}


def hessian_trace(model: torch.nn.Module, loss_fn: Optional[Callable], batches, *, num_probes: int = 100,
                  probes_per_pass: Optional[int] = None, points: Optional[Dict[str, torch.Tensor]] = None,
                  restrict=None, seed: int = 0, device=None, precision: str = "fp32",
                  compile=False, hvp_mode: str = "reverse-over-reverse", progress: bool = True) -> HessianTrace:
    """Hutchinson's estimate tr(H) = E[v^T H v] over Rademacher probes v, of
    the Hessian of the mean loss over ``batches`` at the model's weights, or
    at each of the stacked ``points`` ({name: [C, *shape]}). Returns the
    estimate, its standard error (std of v^T H v / sqrt(num_probes)) and the
    per-probe values. ``restrict`` limits H to the selected parameters.
    ``probes_per_pass``: probes whose HVPs share one batched pass; default
    on GPUs as many as the free memory holds (measured; config["memory_plan"]
    records it), and CPU_PROBES_PER_PASS on CPUs, where big passes overflow
    the caches (32 probes of the 5e4-parameter LR transformer took 16.7 s
    in one pass, 6.0 s in passes of 4). ``precision``: "fp32",
    "tf32" (TF32 matmuls on CUDA) or "bf16" (the passes under bf16
    autocast), as in estimate_llc; probes, products and sums stay fp32 or
    float64. Its rounding moves each v^T H v by about 1e-3 relative, far
    below the probes' own spread (README, Hessian statistics).
    ``compile``: True (or a torch.compile mode) runs the passes through
    torch.compile, which fuses the elementwise work of the tangents; it pays
    its compilation once per call, so it suits many probes. Every pass then
    has the same number of probes (the last is filled up with probes whose
    values are dropped), so one compilation serves them all. ``hvp_mode``:
    "reverse-over-reverse" (a backward through the gradient's graph per
    probe) or "forward-over-reverse" (a tangent forward-and-backward per
    probe), the other taken, with a warning, where an op lacks the first's
    derivative; config["hvp_mode"] records which ran. ``progress``: a
    progress bar over the probes (tqdm; gone when done)."""
    check_int("num_probes", num_probes, minimum=1)
    if probes_per_pass is not None:
        check_int("probes_per_pass", probes_per_pass, minimum=1)
    check_int("seed", seed)
    started = time.perf_counter()
    prob = _Problem(model, loss_fn, batches, points, restrict, device, precision, compile, hvp_mode)
    c = prob.num_points
    plan = None
    per_pass = probes_per_pass
    if per_pass is None:
        per_pass, plan = _plan_probes(prob, num_probes)
    values = torch.zeros(c, num_probes, dtype=torch.float64, device=prob.device)
    counted = prob.hvp.count
    bar = progress_bar(progress, num_probes, "Hessian trace", unit="probe")
    for start in range(0, num_probes, per_pass):
        count = min(per_pass, num_probes - start)
        drawn = per_pass if prob.hvp.compiled else count
        # Point p draws probe stream p, rows start..start+drawn-1 of it.
        per_point = [prob.probes(drawn, seed, stream=p, row_offset=start) for p in range(c)]
        vecs = [torch.stack([pp[i] for pp in per_point]).reshape((c * drawn,) + s) if c > 1 else per_point[0][i]
                for i, s in enumerate(prob.shapes)]
        hv = prob.hvp(vecs, prob.points)
        out = torch.zeros(c * drawn, dtype=torch.float64, device=prob.device)
        ops.multi_dot_(out, [v.contiguous() for v in vecs], [h.contiguous() for h in hv])
        values[:, start:start + count] = out.view(c, drawn)[:, :count]
        if bar is not None:
            bar.update(count)
    if bar is not None:
        bar.close()
    prob.hvp.count = counted + c * num_probes  # the filling probes are not the caller's work
    per_probe = values.cpu().numpy()
    se = per_probe.std(axis=1, ddof=1) / math.sqrt(num_probes) if num_probes > 1 else np.full(c, np.nan)
    return HessianTrace(per_probe.mean(axis=1), se, per_probe, prob.hvp.count,
                        config=dict(num_probes=num_probes, seed=seed, hvp_mode=prob.hvp.mode,
                                    parameters=prob.free, points=c, precision=precision,
                                    probes_per_pass=per_pass, memory_plan=plan, **_compiled(prob)),
                        timings={"total_s": time.perf_counter() - started})


def hessian_eigs(model: torch.nn.Module, loss_fn: Optional[Callable], batches, *, k: int = 1,
                 which: str = "largest", method: str = "lanczos", tol: float = 1e-6, max_iter: int = 100,
                 return_vectors: bool = False, points: Optional[Dict[str, torch.Tensor]] = None, restrict=None,
                 seed: int = 0, device=None, precision: str = "fp32", compile=False,
                 hvp_mode: str = "reverse-over-reverse", progress: bool = True) -> HessianEigs:
    """The k largest (``which="largest"``) or smallest eigenvalues of the
    Hessian, by Lanczos with full reorthogonalization (default) or by power
    iteration with deflation (``method="power"``, largest magnitude, for
    comparison with PyHessian). Stops when every wanted Ritz pair's residual
    is below ``tol`` times the largest |Ritz value|, or after ``max_iter``
    steps (Lanczos) / iterations per eigenvalue (power). ``precision`` as
    in hessian_trace: under "bf16" each product carries rounding of about
    1e-3 relative, so a ``tol`` below that may not be reached. ``compile``,
    ``hvp_mode`` and ``progress`` (over the steps, to at most max_iter) as in
    hessian_trace."""
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    check_int("k", k, minimum=1)
    check_int("max_iter", max_iter, minimum=1)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    prob = _Problem(model, loss_fn, batches, points, restrict, device, precision, compile, hvp_mode)
    if k > prob.free:
        raise ValueError(f"k = {k} exceeds the {prob.free} parameters the Hessian acts on; k must be <= {prob.free}")
    start = torch.cat([v.reshape(prob.num_points, -1) for v in prob.probes(prob.num_points, seed, 1)], dim=1)
    if method == "power":
        bar = progress_bar(progress, k * max_iter, "Hessian eigenvalues (power)", unit="HVP step")
        try:
            return _power(prob, start, k, which, tol, max_iter, return_vectors, bar)
        finally:
            if bar is not None:
                bar.close()
    sign = 1.0 if which == "largest" else -1.0

    def wanted(values):  # [R, m] ascending -> indices of the k wanted
        return torch.arange(values.shape[1] - 1, values.shape[1] - 1 - k, -1) if sign > 0 else torch.arange(k)

    def residuals(run, values, vecs):
        return (run.beta_next[:, None] * vecs[:, -1, :].abs())[:, wanted(values).to(values.device)]

    def converged(run):
        if run.steps < k:
            return False
        values, vecs = ritz(run)
        return bool((residuals(run, values, vecs) <= tol * values.abs().amax(1, keepdim=True)).all())

    bar = progress_bar(progress, max(max_iter, k + 1), "Hessian eigenvalues (Lanczos)", unit="HVP step")
    try:
        run = lanczos(prob.matvec, start, max(max_iter, k + 1), converged=converged, bar=bar,
                      lower="lower max_iter (the top few eigenvalues usually converge within 30-50 steps), "
                            "restrict= fewer parameters, or use method='power', which keeps no basis")
    finally:
        if bar is not None:
            bar.close()
    values, vecs = ritz(run)
    idx = wanted(values).to(values.device)
    resid = residuals(run, values, vecs)
    vectors = None
    if return_vectors:
        flat = torch.bmm(vecs[:, :, idx].transpose(1, 2).float(), run.basis)  # [R, k, N]
        vectors = [dict(zip(prob.names, (t.reshape((k,) + s) for t, s in zip(
            flat[c].split(prob.sizes, dim=1), prob.shapes)))) for c in range(flat.shape[0])]
    return HessianEigs(values[:, idx].cpu().numpy(), vectors, resid.cpu().numpy(), prob.hvp.count,
                       config=dict(method="lanczos", which=which, steps=run.steps, tol=tol, hvp_mode=prob.hvp.mode,
                                   parameters=prob.free, precision=precision, **_compiled(prob)))


def _power(prob, start, k, which, tol, max_iter, return_vectors, bar=None):
    """Power iteration with deflation (PyHessian's method): largest |eigenvalue|."""
    if which != "largest":
        raise ValueError("method='power' finds the largest-magnitude eigenvalues only; use method='lanczos'")
    found_vals, found_vecs = [], []
    for _ in range(k):
        v = start / start.norm(dim=1, keepdim=True)
        lam = torch.zeros(v.shape[0], dtype=torch.float64, device=v.device)
        for _ in range(max_iter):
            for u in found_vecs:
                v = v - (v * u).sum(1, keepdim=True) * u
            v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
            w = prob.matvec(v)
            if bar is not None:
                bar.update(1)
            new = (w.double() * v.double()).sum(1)
            done = bool(((new - lam).abs() <= tol * new.abs().clamp_min(1e-30)).all())
            lam, v = new, w
            if done:
                break
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
        found_vals.append(lam)
        found_vecs.append(v)
    values = torch.stack(found_vals, 1)
    vectors = None
    if return_vectors:
        flat = torch.stack(found_vecs, 1)
        vectors = [dict(zip(prob.names, (t.reshape((k,) + s) for t, s in zip(
            flat[c].split(prob.sizes, dim=1), prob.shapes)))) for c in range(flat.shape[0])]
    return HessianEigs(values.cpu().numpy(), vectors, np.full(tuple(values.shape), np.nan), prob.hvp.count,
                       config=dict(method="power", which=which, tol=tol, hvp_mode=prob.hvp.mode,
                                   parameters=prob.free, precision=prob.hvp.precision, **_compiled(prob)))


def hessian_spectrum(model: torch.nn.Module, loss_fn: Optional[Callable], batches, *, num_runs: int = 4,
                     num_steps: int = 80, points: Optional[Dict[str, torch.Tensor]] = None, restrict=None,
                     seed: int = 0, device=None, precision: str = "fp32", compile=False,
                     hvp_mode: str = "reverse-over-reverse", progress: bool = True) -> HessianSpectrum:
    """Spectral density by stochastic Lanczos quadrature: ``num_runs``
    Lanczos runs of ``num_steps`` steps from Rademacher starts, all in one
    batched pass per step; Ritz values are the nodes, squared first
    eigenvector components the weights. ``precision``, ``compile``,
    ``hvp_mode`` and ``progress`` (over the steps) as in hessian_trace."""
    check_int("num_runs", num_runs, minimum=1)
    check_int("num_steps", num_steps, minimum=1)
    prob = _Problem(model, loss_fn, batches, points, restrict, device, precision, compile, hvp_mode)
    c = prob.num_points
    starts = torch.cat([v.reshape(num_runs, -1) for v in prob.probes(num_runs, seed, 2)], dim=1)
    start = starts.repeat(c, 1)  # rows grouped by point: point p holds rows p*V .. p*V + V-1
    bar = progress_bar(progress, num_steps, "Hessian spectrum", unit="HVP step")
    try:
        run = lanczos(prob.matvec, start, num_steps, reserve_all=True, bar=bar,
                      lower="lower num_steps, or num_runs (average the densities of several calls with different "
                            "seeds), or restrict= fewer parameters")
    finally:
        if bar is not None:
            bar.close()
    values, vecs = ritz(run)
    weights = vecs[:, 0, :] ** 2
    return HessianSpectrum(values.view(c, num_runs, -1).cpu().numpy(), weights.view(c, num_runs, -1).cpu().numpy(),
                           prob.hvp.count, config=dict(num_runs=num_runs, steps=run.steps, seed=seed,
                                                       parameters=prob.free, precision=precision,
                                                       **_compiled(prob)))
