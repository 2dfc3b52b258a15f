"""Pure-torch reference estimate_llc: chains one after another, a deep copy of
the model per chain, exactly docs/design.md's SGLD with devinterp 1.x's semantics
(draw loss = the minibatch loss whose gradient drives the step; loss at w*
averaged over num_init_batches batches, default num_chains; nbeta default
m/log m). Noise is keyed by (seed, step, chain), so the fast engine, which
runs the chains stacked, draws the same noise for the same chain and step."""
from __future__ import annotations

import copy
import math
import time
from types import SimpleNamespace
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .. import twins as ref_ops
from ..engine import checkpointing
from ..engine.common import (check_differentiable, checked_loss, default_loss, draw_slice, finite_batches,
                             loss_at_w_star, resolve_device, resolve_nbeta, restriction_masks, to_device, trainable,
                             warn_if_dropout)
from ..engine.interrupt import partial_plan, raise_interrupted
from ..engine.loaders import draw_batches as draw_source
from ..engine.loaders import loader_batches, warn_if_cycled
from ..engine.progress import progress_bar
from ..engine.samplers import Stepper
from ..twins.mala import ChainMala
from .arguments import check_arguments
from .auto import auto_epsilon, auto_gamma
from .checks import finish, init_loss_diagnostics, mala_diagnostics, paired_spread
from .result import LLCResult
from .trust import STEP_CHECK_CHAINS, relaxation_steps, trust_diagnostics


def estimate_llc(model: torch.nn.Module, loader, loss_fn: Optional[Callable] = None, *, num_chains: int = 8,
                 num_draws: int = 200, num_burnin: Union[int, str] = "auto", steps_between_draws: int = 1,
                 epsilon: Union[float, str] = "auto", gamma: Union[float, str] = 100.0,
                 nbeta: Optional[float] = None, weight_decay: float = 0.0,
                 noise_scale: float = 1.0, init_loss: str = "auto", num_init_batches: Union[int, str, None] = None,
                 restrict=None, seed: int = 0,
                 device=None, progress: bool = True, callbacks: Sequence[Callable] = (), sampler: str = "sgld",
                 sampler_kwargs: Optional[dict] = None, bounding_box: Optional[float] = None,
                 grad_accum_steps: int = 1, activation_checkpointing=False, mala: bool = False,
                 trust_checks="auto", draw_batches: str = "independent") -> LLCResult:
    """The LLC of ``model`` at its current weights w*; ``model`` is not changed.

    After every SGLD step each callback is called as
    ``cb(step=t, chains=range(c, c + 1), loss=<[1] tensor>, params={name: <[1, ...] tensor>})``:
    the loss whose gradient drove step t and the parameters after it (live
    views: clone to keep). The fast engine calls the same with all chains.
    ``init_loss``, ``activation_checkpointing``, ``mala``, ``trust_checks`` and ``draw_batches`` are as in
    llcfast.estimate_llc; a paired init loss evaluates an unmoved copy of
    the model at w* on each draw's batch. ``epsilon``, ``num_burnin`` and
    ``gamma`` take "auto" as there, through the same procedure (llcfast.estimate.auto).
    """
    settings = {k: v for k, v in locals().items() if k not in ("model", "loader", "loss_fn")}
    shared = check_arguments(SimpleNamespace(**settings), loader)
    auto, callbacks = shared.auto, shared.callbacks
    sampler, sampler_kwargs, box = shared.sampler, shared.sampler_kwargs, shared.bounding_box
    init_method, init_batches, init_chosen = shared.init_method, shared.init_batches, shared.init_chosen
    if "gamma" in auto:
        return auto_gamma(estimate_llc, model, loader, loss_fn, {k: v for k, v in settings.items() if k != "gamma"})
    if "epsilon" in auto:
        return auto_epsilon(estimate_llc, model, loader, loss_fn, {k: v for k, v in settings.items() if k != "epsilon"})
    if "num_burnin" in auto:
        num_burnin = relaxation_steps(epsilon, gamma)
    warn_if_dropout(model)
    loss_fn = loss_fn or default_loss
    device = resolve_device(device, model)
    started = time.perf_counter()
    nbeta = resolve_nbeta(nbeta, loader, grad_accum_steps)
    base = copy.deepcopy(model).to(device)
    checkpointed = checkpointing.apply(base, activation_checkpointing)
    check_differentiable(base, loss_fn, loader, device, seed=seed)
    l0, l0_spread = math.nan, paired_spread(loader)
    if init_method != "paired":
        l0, l0_spread = loss_at_w_star(base, loader, loss_fn, init_batches, device, seed=seed,
                                       requested=init_chosen)
    paired = np.full((num_chains, num_draws), np.nan) if init_method == "paired" else None
    masks = restriction_masks(trainable(base), restrict)
    total_steps = num_burnin + num_draws * steps_between_draws
    draw_steps = range(total_steps)[draw_slice(num_burnin, steps_between_draws)]
    warn_if_cycled(loader, total_steps, grad_accum_steps)
    # One batch is full-batch sampling: the draw's batch is the step's own, with nothing left to fit
    independent = draw_batches == "independent" and finite_batches(loader) != 1
    trace = np.full((num_chains, num_draws), np.nan)
    stats = torch.zeros(num_chains, 3, dtype=torch.float64, device=device)
    steps_run = np.full(num_chains, total_steps)
    accept = np.full((num_chains, max(total_steps - 1, 0)), np.nan) if mala else None
    bar = progress_bar(progress, num_chains * total_steps, "SGLD (reference)")
    sampling_started = time.perf_counter()
    c, step_now, tracker = 0, 0, None  # the chain under way and the steps it finished
    ends = []  # the first chains' end points, for the step-size check
    try:
        for c in range(num_chains):
            step_now, tracker = 0, None
            chain_model = copy.deepcopy(base)
            named = trainable(chain_model)
            params = [p for _, p in named]
            centers = [p.detach().clone() for p in params]
            stacked = [p.detach().view((1,) + tuple(p.shape)) for p in params]
            stepper = Stepper(ref_ops, sampler, sampler_kwargs, box, stacked, epsilon=epsilon, seed=seed,
                              chain_offset=c)
            batches = loader_batches(loader, seed, c)
            draws = draw_source(loader, seed, c) if independent else None
            tracker = ChainMala(centers, masks, eps=epsilon, nbeta=nbeta, gamma=gamma, weight_decay=weight_decay,
                                noise_scale=noise_scale) if mala else None
            for t in range(total_steps):
                chain_model.zero_grad(set_to_none=True)
                where = f"(chain {c}, step {t})"
                micro = [to_device(next(batches), device) for _ in range(grad_accum_steps)]
                loss = sum(checked_loss(loss_fn(chain_model, b), where) for b in micro) / grad_accum_steps
                drawn = micro
                if independent and t in draw_steps:  # the draw's own batches, at the weights before this step
                    drawn = [to_device(next(draws), device) for _ in range(grad_accum_steps)]
                    with torch.no_grad():
                        draw_value = float(sum(checked_loss(loss_fn(chain_model, b), where) for b in drawn)) \
                            / grad_accum_steps
                if paired is not None and t in draw_steps:  # the unmoved model at w* on the draw's batches
                    with torch.no_grad():
                        paired[c, draw_steps.index(t)] = float(sum(
                            checked_loss(loss_fn(base, b), where) for b in drawn)) / grad_accum_steps
                value = float(loss.detach())
                if not math.isfinite(value):
                    steps_run[c] = t
                    break
                loss.backward()
                if t in draw_steps:
                    trace[c, draw_steps.index(t)] = draw_value if independent else value
                with torch.no_grad():
                    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                    if tracker is not None:
                        tracker.observe(params, grads, value)
                    stepper.step(stacked, [g.view((1,) + tuple(g.shape)) for g in grads], centers, eps=epsilon,
                                 nbeta=nbeta, gamma=gamma, weight_decay=weight_decay, noise_scale=noise_scale,
                                 seed=seed, step=t, chain_offset=c, masks=masks, stats=stats[c:c + 1])
                if callbacks:
                    views = {n: p.detach()[None] for n, p in named}
                    for cb in callbacks:
                        cb(step=t, chains=range(c, c + 1), loss=loss.detach().reshape(1), params=views)
                bar.update(1)
                step_now = t + 1
            if tracker is not None:
                accept[c, :len(tracker.values)] = tracker.values
            if c < STEP_CHECK_CHAINS:
                ends.append([p.detach().clone() for p in params])
    except KeyboardInterrupt:
        # The step under way may be half applied; the steps before it are whole.
        if tracker is not None:
            accept[c, :len(tracker.values)] = tracker.values
        stopped, keep = True, partial_plan(c, c + 1, step_now, num_burnin, steps_between_draws, num_draws)
    else:
        stopped, keep = False, None
    bar.close()
    now = time.perf_counter()
    config = dict(backend="reference", init_loss=init_method, num_chains=num_chains, num_draws=num_draws,
                  num_burnin=num_burnin,
                  steps_between_draws=steps_between_draws, epsilon=epsilon, gamma=gamma, nbeta=nbeta,
                  weight_decay=weight_decay, noise_scale=noise_scale,
                  num_init_batches=len(l0_spread["init_loss_per_batch"]),
                  seed=seed, device=str(device), sampler=sampler, sampler_kwargs=sampler_kwargs,
                  bounding_box=box or None, grad_accum_steps=grad_accum_steps,
                  draw_batches="independent" if independent else "step")
    if checkpointed:
        config["activation_checkpointing"] = checkpointed
    chain_steps = num_chains * total_steps
    used = total_steps  # the steps of each kept chain the estimate uses
    stats = stats.cpu().numpy()
    if stopped:
        if keep is None:
            raise_interrupted(None, "estimate_llc")
        chains, used = keep.chains, keep.steps
        steps_run[c] = min(steps_run[c], step_now)
        chain_steps = int(steps_run[:c + 1].sum())
        trace, stats, steps_run = trace[:chains, :keep.draws], stats[:chains], steps_run[:chains]
        paired = paired[:chains, :keep.draws] if paired is not None else None
        accept = accept[:chains, :max(used - 1, 0)] if mala else None
        config["interrupted"] = keep.config
    timings = {"total_s": now - started, "sampling_s": now - sampling_started,
               "ms_per_chain_step": 1e3 * (now - sampling_started) / max(chain_steps, 1)}
    trust = {}
    if trust_checks and not stopped:
        final = [torch.stack(column) for column in zip(*ends)]
        trust = trust_diagnostics(base, loss_fn, loader, final, epsilon=epsilon, nbeta=nbeta, gamma=gamma,
                                  restrict=restrict, precision="fp32", device=device, seed=seed,
                                  sampler=sampler, mode=trust_checks,
                                  chain_steps=num_chains * total_steps * grad_accum_steps)
    result = finish(trace, l0, nbeta, stats, steps_run, config=config, timings=timings,
                    diagnostics={**init_loss_diagnostics(l0_spread, nbeta, init_method),
                                 **mala_diagnostics(accept, {c: int(t) for c, t in enumerate(steps_run) if t < used}),
                                 **trust},
                    init_trace=paired)
    if stopped:
        raise_interrupted(result, "estimate_llc")
    return result

