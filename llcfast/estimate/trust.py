"""What an LLC estimate's trust rests on beyond its traces: the step size
checked where the chains went (not only at w*), and the slope of the loss at
w*. Both are measured by estimate_llc and read by LLCResult.checks().

The step-size rule: SGLD on a quadratic potential of curvature
a = nbeta * lambda + gamma (lambda an eigenvalue of the loss's Hessian) is
stable for epsilon * a / 2 < 2, and its stationary variance is off by a
relative epsilon * a / 4; keeping epsilon * (nbeta * lambda_max + gamma) / 2
<= STEP_RULE holds that bias to a few percent in the stiffest direction.
The chains drift along flat directions of a singular loss into regions more
curved than w*, so lambda_max is taken at their end points.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..engine.common import first_line, precision_context, restriction_masks, to_device, trainable
from ..engine.loaders import loader_batches
from .hessian import hessian_eigs

STEP_RULE = 0.1  # epsilon * (nbeta * lambda_max + gamma) / 2 at the chains' end points
STEP_CHECK_CHAINS = 4  # end points whose top eigenvalue is measured (the cost grows with them)
STEP_CHECK_ITERS = 20  # Lanczos steps: the top eigenvalue converges first
CHECK_SHARE = 0.1  # by default the checks cost at most this share of the sampling's gradient passes
HVP_PASSES = 2  # a Hessian-vector product costs about two gradient passes
GRADIENT_BATCHES = 16
GRADIENT_SHARE = 0.5  # the slope may move the estimate by at most this share of its size


def step_rule(epsilon: float, nbeta: float, gamma: float, lambda_max: float) -> float:
    return epsilon * (nbeta * max(lambda_max, 0.0) + gamma) / 2


def safe_epsilon(nbeta: float, gamma: float, lambda_max: float) -> float:
    """The largest epsilon the rule allows at curvature lambda_max."""
    return 2 * STEP_RULE / (nbeta * max(lambda_max, 0.0) + gamma)


def relaxation_steps(epsilon: float, gamma: float) -> int:
    """The slow modes' relaxation time in steps: along a flat direction only
    the prior's pull gamma acts, and each step keeps 1 - epsilon * gamma / 2
    of the distance from equilibrium."""
    if not gamma > 0:
        raise ValueError("num_burnin='auto' needs gamma > 0: with no prior's pull the flat directions never relax; "
                         "pass a number of burn-in steps")
    return int(math.ceil(2 / (epsilon * gamma)))


def first_batches(loader, seed: int, count: int = 1) -> list:
    """The loader's first ``count`` batches, on the init loss's stream."""
    out = []
    for batch in loader_batches(loader, seed, endless=False):
        out.append(batch)
        if len(out) == count:
            break
    return out


def top_eigenvalues(model: torch.nn.Module, loss_fn: Callable, batches: list, points: Optional[dict], *,
                    restrict, precision: str, device, seed: int = 0, max_iter: int = STEP_CHECK_ITERS):
    """(lambda_max [P], Ritz residuals [P]) of the loss's Hessian on
    ``batches`` at each stacked point ({name: [P, ...]}, None: the model's
    own weights), by a short batched Lanczos run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unconverged Ritz value is reported here, with its residual
        eigs = hessian_eigs(model, loss_fn, batches, k=1, max_iter=max_iter, tol=1e-3, points=points,
                            restrict=restrict, seed=seed, device=device, precision=precision, progress=False)
    return eigs.values[:, 0], eigs.residuals[:, 0]


def step_size_check(model: torch.nn.Module, loss_fn: Callable, loader, final: Sequence[torch.Tensor], *,
                    epsilon: float, nbeta: float, gamma: float, restrict, precision: str, device,
                    seed: int = 0, limit: int = STEP_CHECK_CHAINS) -> dict:
    """The rule's value at the end points of up to ``limit`` (at most
    STEP_CHECK_CHAINS) chains that did not diverge
    (``final``: the stacked parameters [C, ...] in trainable order), with the
    largest epsilon it allows there and the seconds it took; {"skipped":
    reason} where the Hessian cannot be taken (a loss that is not twice
    differentiable, say)."""
    started = time.perf_counter()
    names = [n for n, _ in trainable(model)]
    finite = torch.stack([p.detach().reshape(p.shape[0], -1).isfinite().all(1) for p in final]).all(0).nonzero()[:, 0]
    if len(finite) == 0:
        return {"skipped": "every chain diverged, so no end point is left to check"}
    keep = finite[:min(limit, STEP_CHECK_CHAINS)]  # a diverged chain's end point has no Hessian
    count = len(keep)
    points = {n: p.detach()[keep] for n, p in zip(names, final)}
    try:
        lams, resid = top_eigenvalues(model, loss_fn, first_batches(loader, seed), points, restrict=restrict,
                                      precision=precision, device=device, seed=seed)
    except Exception as exc:  # the Hessian's failures are many; the estimate stands without this check
        return {"skipped": f"{type(exc).__name__}: {first_line(exc)}"}
    worst = float(np.max(lams))
    return {"lambda_max_at_chains": lams, "lambda_max_residuals": resid, "chains_checked": count,
            "step_rule": step_rule(epsilon, nbeta, gamma, worst), "step_rule_limit": STEP_RULE,
            "safe_epsilon": safe_epsilon(nbeta, gamma, worst), "seconds": time.perf_counter() - started}


def gradient_at_w_star(model: torch.nn.Module, loader, loss_fn: Callable, *, restrict, device, precision: str,
                       seed: int = 0, max_batches: int = 16) -> dict:
    """The squared norm of the loss's gradient at w* (the moving parameters
    only), averaged over the loader's first ``max_batches`` batches, with
    the part that is only the batches' noise taken out: |mean g|^2 minus
    trace(Cov g) / k, the unbiased estimate of |grad L|^2."""
    named = trainable(model)
    masks = restriction_masks(named, restrict)
    params = [p for _, p in named]
    per_batch = []
    for batch in first_batches(loader, seed, max_batches):
        with precision_context(precision, device):
            loss = loss_fn(model, to_device(batch, device))
        grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
        flat = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
        if masks is not None:
            flat = [g * m for g, m in zip(flat, masks)]
        per_batch.append(torch.cat([g.reshape(-1).double() for g in flat]))
    g = torch.stack(per_batch)  # [k, N]
    k = g.shape[0]
    mean_sq = float(g.mean(0).square().sum())
    noise = float(g.var(0, unbiased=True).sum()) / k if k > 1 else 0.0
    return {"grad_norm_sq_at_w_star": max(mean_sq - noise, 0.0), "grad_noise_sq_at_w_star": noise,
            "grad_batches": k}


def slope_shift_bound(grad_norm_sq: float, nbeta: float, gamma: float) -> float:
    """How far a slope g at w* can pull the estimate down: on the quadratic
    model of the loss the linear term moves nbeta * E[L - L(w*)] by
    -nbeta^2 g^T (nbeta H + gamma)^-1 g + (a smaller positive part), at
    most nbeta^2 |g|^2 / gamma in magnitude (g along a flat direction)."""
    return nbeta ** 2 * grad_norm_sq / gamma if gamma > 0 else math.inf


def check_budget(mode, chain_steps: int, num_chains: int) -> tuple:
    """(chains whose end points the step check measures, batches the slope
    averages) for trust_checks ``mode``: True, the full checks; "auto", as
    much of them as costs at most CHECK_SHARE of the run's chain-steps
    (gradient passes), so a short run is not doubled by its checks."""
    if mode is True:
        return min(STEP_CHECK_CHAINS, num_chains), GRADIENT_BATCHES
    budget = CHECK_SHARE * chain_steps
    chains = min(STEP_CHECK_CHAINS, num_chains, int(budget // (HVP_PASSES * STEP_CHECK_ITERS)))
    return chains, int(min(GRADIENT_BATCHES, budget))


def check_trust_checks(mode) -> None:
    if mode not in (True, False, "auto"):
        raise ValueError(f"trust_checks must be True, False or 'auto', got {mode!r}")


def trust_diagnostics(model: torch.nn.Module, loss_fn: Callable, loader, final: Optional[Sequence[torch.Tensor]], *,
                      epsilon: float, nbeta: float, gamma: float, restrict, precision: str, device, seed: int,
                      sampler: str, mode="auto", chain_steps: int = 0) -> dict:
    """The step-size check at the chains' end points (``final``; None where
    there are none to check) and the slope at w*, as estimate_llc's
    diagnostics: {"step_check": {...}, "grad_norm_sq_at_w_star": ..., ...},
    within check_budget's share of the run's ``chain_steps``."""
    started = time.perf_counter()
    chains, batches = check_budget(mode, chain_steps, final[0].shape[0] if final is not None else 0)
    out = {}
    if batches >= 1:
        out = gradient_at_w_star(model, loader, loss_fn, restrict=restrict, device=device, precision=precision,
                                 seed=seed, max_batches=batches)
        out["slope_shift_bound"] = slope_shift_bound(out["grad_norm_sq_at_w_star"], nbeta, gamma)
    out["gradient_check_s"] = time.perf_counter() - started
    if sampler != "sgld":
        out["step_check"] = {"skipped": f"the rule is for plain SGLD; sampler={sampler!r} scales its steps"}
    elif final is None:
        out["step_check"] = {"skipped": "no chain end points to check"}
    elif chains == 0:
        out["step_check"] = {"skipped": f"it would cost over {CHECK_SHARE:.0%} of this short run; "
                                        "trust_checks=True runs it anyway"}
    else:
        out["step_check"] = step_size_check(model, loss_fn, loader, final, epsilon=epsilon, nbeta=nbeta,
                                            gamma=gamma, restrict=restrict, precision=precision, device=device,
                                            seed=seed, limit=chains)
    return out
