"""Pure-torch reference estimate_llc: chains one after another, a deep copy of
the model per chain, exactly DESIGN.md's SGLD with devinterp 1.x's semantics
(draw loss = the minibatch loss whose gradient drives the step; loss at w*
averaged over num_init_batches batches, default num_chains; nbeta default
m/log m). Noise is keyed by (seed, step, chain), so the fast engine, which
runs the chains stacked, draws the same noise for the same chain and step."""
from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .._llc_common import (check_llc_args, checked_loss, cycle_batches, default_loss, default_nbeta, init_loss,
                           restriction_masks, to_device, trainable)
from ..result import LLCResult
from .sgld import sgld_step_


def estimate_llc(model: torch.nn.Module, loader, loss_fn: Optional[Callable] = None, *, num_chains: int = 4,
                 num_draws: int = 200, num_burnin: int = 0, steps_between_draws: int = 1, epsilon: float = 1e-4,
                 gamma: float = 100.0, nbeta: Optional[float] = None, weight_decay: float = 0.0,
                 noise_scale: float = 1.0, num_init_batches: Optional[int] = None, restrict=None, seed: int = 0,
                 device=None, progress: bool = True, callbacks: Sequence[Callable] = ()) -> LLCResult:
    """The LLC of ``model`` at its current weights w*. ``callbacks`` are
    called as cb(chain=c, step=t, loss=float, model=chain_model) after each step."""
    check_llc_args(num_chains=num_chains, num_draws=num_draws, num_burnin=num_burnin,
                   steps_between_draws=steps_between_draws, epsilon=epsilon, gamma=gamma, nbeta=nbeta,
                   weight_decay=weight_decay, noise_scale=noise_scale, num_init_batches=num_init_batches, seed=seed)
    loss_fn = loss_fn or default_loss
    device = torch.device(device) if device is not None else next(model.parameters()).device
    started = time.perf_counter()
    nbeta = float(nbeta) if nbeta is not None else default_nbeta(loader)
    base = copy.deepcopy(model).to(device)
    l0 = init_loss(base, loader, loss_fn, num_init_batches or num_chains, device)
    masks = restriction_masks(trainable(base), restrict)
    total_steps = num_burnin + num_draws * steps_between_draws
    trace = np.full((num_chains, num_draws), np.nan)
    stats = torch.zeros(num_chains, 3, dtype=torch.float64, device=device)
    diverged_at = {}
    bar = _progress(progress, num_chains * total_steps)
    for c in range(num_chains):
        chain_model = copy.deepcopy(base)
        params = [p for _, p in trainable(chain_model)]
        centers = [p.detach().clone() for p in params]
        batches = cycle_batches(loader)
        for t in range(total_steps):
            chain_model.zero_grad(set_to_none=True)
            loss = checked_loss(loss_fn(chain_model, to_device(next(batches), device)), f"(chain {c}, step {t})")
            value = float(loss.detach())
            if not math.isfinite(value):
                diverged_at[c] = t
                break
            loss.backward()
            if t >= num_burnin and (t - num_burnin) % steps_between_draws == 0:
                trace[c, (t - num_burnin) // steps_between_draws] = value
            with torch.no_grad():
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                sgld_step_([p.detach().view((1,) + tuple(p.shape)) for p in params],
                           [g.view((1,) + tuple(g.shape)) for g in grads], centers, eps=epsilon, nbeta=nbeta,
                           gamma=gamma, weight_decay=weight_decay, noise_scale=noise_scale, seed=seed, step=t,
                           chain_offset=c, masks=masks, stats=stats[c:c + 1])
            for cb in callbacks:
                cb(chain=c, step=t, loss=value, model=chain_model)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - started
    steps_run = stats.new_tensor([diverged_at.get(c, total_steps) for c in range(num_chains)])
    per_step = (stats / steps_run.clamp(min=1)[:, None]).cpu().numpy()
    config = dict(backend="reference", num_chains=num_chains, num_draws=num_draws, num_burnin=num_burnin,
                  steps_between_draws=steps_between_draws, epsilon=epsilon, gamma=gamma, nbeta=nbeta,
                  weight_decay=weight_decay, noise_scale=noise_scale, num_init_batches=num_init_batches or num_chains,
                  seed=seed, device=str(device))
    diagnostics = {"grad_norm_sq_mean": per_step[:, 0], "distance_sq_mean": per_step[:, 1],
                   "noise_norm_sq_mean": per_step[:, 2]}
    result = LLCResult.from_traces(trace, l0, nbeta, config=config, diagnostics=diagnostics,
                                   timings={"total_s": elapsed,
                                            "ms_per_chain_step": 1e3 * elapsed / (num_chains * total_steps)})
    if diverged_at:
        warnings.warn(f"chains {sorted(diverged_at)} diverged (non-finite loss) and were left out of the estimate; "
                      "lower epsilon or raise gamma", RuntimeWarning, stacklevel=2)
    if math.isfinite(result.llc_mean) and result.llc_mean < 0:
        warnings.warn(f"the LLC estimate is negative ({result.llc_mean:.4g}): the loss fell below its value at w*, "
                      "so w* is not a local minimum of the sampled loss (or the chains have not equilibrated)",
                      RuntimeWarning, stacklevel=2)
    return result


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="SGLD (reference)", unit="step", leave=False)
