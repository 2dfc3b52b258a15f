"""Hessian statistics at a checkpoint (or at many points at once): trace by
Hutchinson's estimator, extreme eigenvalues by Lanczos (or power iteration),
and the spectral density by stochastic Lanczos quadrature. All use batched
Hessian-vector products (llcfast.engine.hvp) and the loss conventions of
estimate_llc: ``loss_fn(model, batch)``, or the output's ``.loss``."""
from __future__ import annotations

import functools
import inspect
import math
import time
import warnings
from typing import Callable, Dict, Optional

import numpy as np
import torch

from .. import ops
from .._checks import check_int
from ..engine.hessian_problem import Problem, compiled_config, plan_probes
from ..engine.lanczos import lanczos, ritz
from ..engine.progress import progress_bar
from ..fastpath import settings as fastpath_settings
from .hessian_results import HessianEigs, HessianSpectrum, HessianTrace

__all__ = ["HessianEigs", "HessianSpectrum", "HessianTrace", "hessian_eigs", "hessian_spectrum", "hessian_trace"]


def _with_fastpath(fn):
    """Adds estimate_llc's ``fastpath`` argument: the settings the passes run
    under, recorded in the result's ``config["fastpath"]``. The Hessian's
    passes are second order, which none of today's fast paths serves, so
    the choice is recorded for the run's record and changes no pass."""
    @functools.wraps(fn)
    def wrapped(*args, fastpath=None, **kwargs):
        chosen = fastpath_settings.resolve(fastpath)
        with fastpath_settings.using(chosen):
            result = fn(*args, **kwargs)
        result.config["fastpath"] = chosen.as_config()
        return result

    signature = inspect.signature(fn)
    extra = inspect.Parameter("fastpath", inspect.Parameter.KEYWORD_ONLY, default=None)
    wrapped.__signature__ = signature.replace(parameters=list(signature.parameters.values()) + [extra])
    wrapped.__doc__ = (fn.__doc__ or "") + "\n\n    fastpath: as in estimate_llc (recorded in config[\"fastpath\"]).\n"
    return wrapped


@_with_fastpath
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
    in one pass, 6.0 s in passes of 4). On CPUs the default reverse-over-
    reverse products, uncompiled, go one at a time through the gradient's
    retained graph instead (engine/hvp.py), and a pass only groups them.
    ``precision``: "fp32",
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
    prob = Problem(model, loss_fn, batches, points, restrict, device, precision, compile, hvp_mode)
    c = prob.num_points
    plan = None
    per_pass = probes_per_pass
    if per_pass is None:
        per_pass, plan = plan_probes(prob, num_probes)
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
        bar.update(count)
    bar.close()
    prob.hvp.count = counted + c * num_probes  # the filling probes are not the caller's work
    per_probe = values.cpu().numpy()
    se = per_probe.std(axis=1, ddof=1) / math.sqrt(num_probes) if num_probes > 1 else np.full(c, np.nan)
    return HessianTrace(per_probe.mean(axis=1), se, per_probe, prob.hvp.count,
                        config=dict(num_probes=num_probes, seed=seed, hvp_mode=prob.hvp.mode,
                                    parameters=prob.free, points=c, precision=precision,
                                    probes_per_pass=per_pass, memory_plan=plan, **compiled_config(prob)),
                        timings={"total_s": time.perf_counter() - started})


@_with_fastpath
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
    prob = Problem(model, loss_fn, batches, points, restrict, device, precision, compile, hvp_mode)
    if k > prob.free:
        raise ValueError(f"k = {k} exceeds the {prob.free} parameters the Hessian acts on; k must be <= {prob.free}")
    start = torch.cat([v.reshape(prob.num_points, -1) for v in prob.probes(prob.num_points, seed, 1)], dim=1)
    if method == "power":
        bar = progress_bar(progress, k * max_iter, "Hessian eigenvalues (power)", unit="HVP step")
        try:
            return _power(prob, start, k, which, tol, max_iter, return_vectors, bar)
        finally:
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
        bar.close()
    values, vecs = ritz(run)
    idx = wanted(values).to(values.device)
    resid = residuals(run, values, vecs)
    scale = values.abs().amax(1, keepdim=True)
    loose = resid > tol * scale
    if bool(loose.any()):
        worst = float((resid / scale.clamp_min(1e-30)).max())
        warnings.warn(f"hessian_eigs: Lanczos stopped at max_iter={max_iter} before every wanted eigenvalue "
                      f"converged (largest residual {worst:.2g} of the largest |eigenvalue|, tol {tol:g}); the "
                      "values may be off by about that much: raise max_iter", RuntimeWarning, stacklevel=2)
    vectors = None
    if return_vectors:
        flat = torch.bmm(vecs[:, :, idx].transpose(1, 2).float(), run.basis)  # [R, k, N]
        vectors = [dict(zip(prob.names, (t.reshape((k,) + s) for t, s in zip(
            flat[c].split(prob.sizes, dim=1), prob.shapes)))) for c in range(flat.shape[0])]
    return HessianEigs(values[:, idx].cpu().numpy(), vectors, resid.cpu().numpy(), prob.hvp.count,
                       config=dict(method="lanczos", which=which, steps=run.steps, tol=tol, hvp_mode=prob.hvp.mode,
                                   parameters=prob.free, precision=precision, **compiled_config(prob)))


def _power(prob, start, k, which, tol, max_iter, return_vectors, bar):
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
                                   parameters=prob.free, precision=prob.hvp.precision, **compiled_config(prob)))


@_with_fastpath
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
    prob = Problem(model, loss_fn, batches, points, restrict, device, precision, compile, hvp_mode)
    c = prob.num_points
    starts = torch.cat([v.reshape(num_runs, -1) for v in prob.probes(num_runs, seed, 2)], dim=1)
    start = starts.repeat(c, 1)  # rows grouped by point: point p holds rows p*V .. p*V + V-1
    bar = progress_bar(progress, num_steps, "Hessian spectrum", unit="HVP step")
    try:
        run = lanczos(prob.matvec, start, num_steps, reserve_all=True, bar=bar,
                      lower="lower num_steps, or num_runs (average the densities of several calls with different "
                            "seeds), or restrict= fewer parameters")
    finally:
        bar.close()
    values, vecs = ritz(run)
    weights = vecs[:, 0, :] ** 2
    return HessianSpectrum(values.view(c, num_runs, -1).cpu().numpy(), weights.view(c, num_runs, -1).cpu().numpy(),
                           prob.hvp.count, config=dict(num_runs=num_runs, steps=run.steps, seed=seed,
                                                       parameters=prob.free, precision=precision,
                                                       **compiled_config(prob)))
