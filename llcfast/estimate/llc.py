"""llcfast.estimate_llc: the LLC at a checkpoint, all chains at once."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch.func import grad

from .._checks import check_int
from ..engine import SamplerConfig, checkpointing, run_chains
from ..engine.common import (check_differentiable, check_precision, cool_accumulation, default_loss, draw_slice,
                             finite_batches, first_nonfinite, loss_at_w_star, precision_context, resolve_device,
                             resolve_nbeta, to_device, trainable, warn_if_dropout)
from ..engine.compiled import check_compile
from ..engine.distributed import current_split, gather_rows
from ..engine.functional import chain_loss
from ..engine.interrupt import ChainsInterrupted, LLCInterrupted, partial_plan, raise_interrupted
from ..engine.loaders import loader_batches, warn_if_cycled
from ..engine.planner import (cpu_out_of_memory, free_device_bytes, measure_activation_bytes, out_of_memory_message,
                              plan_memory, state_bytes)
from ..engine.sampler import loss_context
from ..fastpath import fold as chain_fold
from ..fastpath import settings as fastpath_settings
from ..fastpath.settings import FastPath
from . import sequential
from .arguments import check_arguments
from .auto import auto_epsilon, auto_gamma
from .checks import finish, init_loss_diagnostics, mala_diagnostics, paired_spread
from .result import LLCResult
from .trust import relaxation_steps, trust_diagnostics

BACKENDS = ("auto", "fast", "reference")


def estimate_llc(model: torch.nn.Module, loader, loss_fn: Optional[Callable] = None, *, num_chains: int = 8,
                 num_draws: int = 200, num_burnin: Union[int, str] = "auto", steps_between_draws: int = 1,
                 epsilon: Union[float, str] = "auto",
                 gamma: Union[float, str] = 100.0, nbeta: Optional[float] = None, weight_decay: float = 0.0,
                 noise_scale: float = 1.0, init_loss: str = "auto", num_init_batches: Union[int, str, None] = None,
                 restrict=None, seed: int = 0,
                 device=None, progress: bool = True, callbacks: Sequence[Callable] = (), backend: str = "auto",
                 precision: str = "fp32", cuda_graphs: bool = True, chain_chunk: Optional[int] = None,
                 sampler: str = "sgld", sampler_kwargs: Optional[dict] = None,
                 bounding_box: Optional[float] = None, split_chains: bool = True,
                 grad_accum_steps: int = 1, chain_group: Optional[int] = None,
                 activation_checkpointing=False, mala: bool = False, compile=False,
                 trust_checks: Union[bool, str] = "auto", draw_batches: str = "independent",
                 fastpath=None) -> LLCResult:
    """The local learning coefficient of ``model`` at its current weights w*.

    Runs ``num_chains`` SGLD chains of ``num_burnin + num_draws *
    steps_between_draws`` steps from w* (docs/design.md's update) and returns
    ``nbeta * (mean draw loss - loss at w*)`` per chain, with diagnostics.
    A draw is the loss of the last step of each interval of
    ``steps_between_draws`` after burn-in, as in devinterp 1.x.
    ``model`` is not changed.

    loader: any re-iterable of batches (a DataLoader, a list); each chain makes
        its own passes over it, cycling when it runs out.
    loss_fn: ``loss_fn(model, batch) -> scalar tensor``; default: the model's
        output ``.loss`` (Hugging Face models), called as model(**batch) for a
        dict, model(*batch) for a tuple, else model(batch).
    num_burnin: steps before the first draw; "auto" (default): the slow
        modes' relaxation time 2 / (epsilon * gamma), the steps the prior's
        pull takes to forget the start along flat directions.
    epsilon: the SGLD step size. "auto" (default) sets it from the step-size rule
        epsilon * (nbeta * lambda_max + gamma) / 2 <= 0.1 with lambda_max
        the Hessian's top eigenvalue where short pilot runs' chains end,
        repeated until it is stable (``config["epsilon_auto"]`` lists the
        pilots, ``timings["epsilon_auto_s"]`` their cost).
    gamma: the prior's pull towards w*, a setting of the estimate: compare
        checkpoints at one gamma. "auto" halves it from 100 until the
        estimates at gamma and gamma / 2 agree within their combined
        standard error, and returns the one at the larger gamma
        (``config["gamma_auto"]`` lists the ladder; each rung is a full run).
    init_loss: how the loss at w* is found (``diagnostics["init_loss_method"]``
        says which ran). "exact": the mean over every batch of a loader that
        is one fixed set (a list, a DataLoader over a map-style dataset
        without replacement). "paired": at every draw, the loss at w* on that
        draw's own batch, subtracted draw by draw, so no fixed set is needed
        and the error shows in the chains' spread. "batches": the mean over
        ``num_init_batches`` batches (default one per chain: devinterp 1.x),
        whose error, times nbeta, moves every chain alike
        (``diagnostics["llc_se_from_init_loss"]``). "auto" (default): exact
        where the loader is a fixed set of at most chains x draws batches,
        else paired.
    num_init_batches: batches init_loss="batches" averages, each once (an int
        here implies it); "all" is init_loss="exact".
    restrict: parameter-name globs or {name: bool mask}; only those elements move.
    backend: "fast" runs all chains stacked in one batched pass (torch.func.vmap)
        with the fused update; "auto" does the same but falls back, with a
        warning, to running the chains one after another where vmap cannot
        handle the model; "reference" runs llcfast.reference.estimate_llc.
    precision: "fp32", "tf32" (TF32 matmuls on CUDA) or "bf16" (forward pass
        under bf16 autocast); the SGLD update is always fp32.
    cuda_graphs: on CUDA, replay each step from a captured CUDA graph.
    compile: True runs the batched loss-and-gradient pass through
        torch.compile (the first steps pay the compilation, tens of
        seconds); "max-autotune-no-cudagraphs" also lets Inductor time
        alternative matmul kernels (split-K among them) for each shape. A
        model it cannot compile runs eagerly after a warning.
        ``config["compile"]`` says whether it was used.
    chain_chunk: how many chains each batched pass holds. Default: on CUDA
        as many as fit in the free memory (``config["memory_plan"]``). On a
        CPU, from the activations one chain's forward pass saves
        (``config["pass_plan"]``): chain by chain with plain autograd where
        the largest reaches 1 MiB (one chain's ops already use every core,
        and batching only adds vmap's costs), else stacked in passes whose
        largest activation stays under 16 MiB (bigger tensors are
        page-faulted in afresh at every step).
    sampler: "sgld" (docs/design.md's update), "rmsprop_sgld" (gradient and prior
        terms scaled per element by G = 1/(sqrt(V) + rms_eps), the noise by
        sqrt(G), V the running mean of g^2; sampler_kwargs alpha=0.99,
        rms_eps=0.1) or "sgnht" (Nose-Hoover thermostat with momentum;
        sampler_kwargs diffusion=0.01; its noise is sqrt(2 diffusion eps), so
        noise_scale must stay 1). Each is one fused kernel per step.
    bounding_box: b > 0 keeps every element within [w* - b, w* + b] (SGLD and
        RMSprop-SGLD clamp; SGNHT reflects the momentum); None: no box.
    chain_group: chains stacked in memory at once; groups run one after
        another. Default: all of them, or on CUDA as many as fit in the free
        memory (the plan is stored in ``config["memory_plan"]``).
    grad_accum_steps: each step's gradient (and draw loss) is the mean over
        this many consecutive micro-batches of the loader, for models whose
        activations at the wanted batch size do not fit; the default nbeta
        uses the effective batch (micro-batch size x steps).
    activation_checkpointing: True recomputes each block of the model's
        largest nn.ModuleList (a transformer's layers) in the backward pass
        instead of storing its activations; module-name globs choose other
        modules. torch.func cannot batch checkpointed passes, so the chains
        then run one after another (config["activation_checkpointing"]
        lists the modules).
    mala: record each step's MALA acceptance probability (SGLD only):
        ``diagnostics["mala_acceptance"]`` (mean), ``[..._per_chain]`` and
        ``[..._trace]`` [C, steps - 1]. Well below 1 means epsilon is large
        for this loss surface. Costs two extra copies of the parameters.
    split_chains: inside a torch.distributed job (torchrun), each rank runs
        its share of the chains and all ranks get the gathered result, equal
        to a one-process run's; False runs every chain in this process.
    trust_checks: "auto" (default), True or False. After sampling, measure
        the Hessian's top eigenvalue at
        the end points of a few chains (a short batched Lanczos run) to check
        the step-size rule epsilon * (nbeta * lambda_max + gamma) / 2 <= 0.1
        where the chains went, and the loss's gradient at w* (the slope that
        can pull the estimate down); ``diagnostics["step_check"]``,
        ``["grad_norm_sq_at_w_star"]``, ``["slope_shift_bound"]``, read by
        ``result.checks()``. Their seconds are in ``timings``. "auto" does
        as much of them as costs at most a tenth of the sampling's gradient
        passes; True all of them.
    draw_batches: "independent" (default): each draw is the loss at the
        chain's weights on a batch of its own, drawn uniformly from the data
        apart from the batches that drive the chain, so its expected value is
        the full-data loss there; one more forward pass per draw. "step":
        the loss of the batch that drives the step (devinterp 1.x), which
        within a shuffled epoch the chain has not yet fitted, so it reads
        high, the more so the larger nbeta is against m / log m. Full-batch
        sampling has one batch, and both are the same.
    fastpath: which GPU-only rewrites of the step run (llcfast.fastpath):
        None (the settings in force, by default the paths a GPU run has
        measured to help), "off", "all" (every path on CUDA), a
        ``llcfast.fastpath.FastPath``, or {path name: True/False}. Each path
        computes what the plain path computes; ``config["fastpath"]`` records
        the choice.
    callbacks: called after every step as ``cb(step=t, chains=range(C),
        loss=<[C] tensor>, params={name: <[C, ...] tensor>})`` (the loss that
        drove step t, the parameters after it; live tensors, clone to keep).
    """
    settings = {k: v for k, v in locals().items() if k not in ("model", "loader", "loss_fn")}
    run = _validate(SimpleNamespace(**settings), loader)
    if "gamma" in run.auto:
        return auto_gamma(estimate_llc, model, loader, loss_fn, {k: v for k, v in settings.items() if k != "gamma"})
    if "epsilon" in run.auto:
        return auto_epsilon(estimate_llc, model, loader, loss_fn, {k: v for k, v in settings.items() if k != "epsilon"})
    if "num_burnin" in run.auto:
        run.args["num_burnin"] = run.a.num_burnin = relaxation_steps(epsilon, gamma)
    device = resolve_device(device, model)
    split = current_split(num_chains) if split_chains else None
    if backend == "reference":
        return _run_reference(model, loader, loss_fn, run, device, split)
    with fastpath_settings.using(run.fastpath):
        started = time.perf_counter()
        _prepare(run, model, loader, loss_fn or default_loss, device, split)
        runs, steps, interrupted = _sample(run, loader)
        return _summarise(run, loader, runs, steps, interrupted, started)


@dataclass
class _Run:
    """One estimate_llc call as it goes from validate to plan, sample and
    summarise: the caller's arguments (``a``) and what each stage adds."""
    a: SimpleNamespace
    auto: set
    args: dict  # the estimator's numeric arguments, as both backends take them
    init_method: str
    init_batches: Optional[int]
    init_chosen: bool
    sampling: dict
    compile_mode: object
    callbacks: tuple
    fastpath: FastPath
    # set by _prepare
    device: Optional[torch.device] = None
    split: object = None
    base: Optional[torch.nn.Module] = None
    loss_fn: Optional[Callable] = None
    nbeta: float = math.nan
    l0: float = math.nan
    l0_spread: Optional[dict] = None
    checkpointed: object = None
    cfg: Optional[SamplerConfig] = None
    plan: object = None
    group: int = 0


def _validate(a: SimpleNamespace, loader) -> _Run:
    """Every argument checked before any work (the auto values' pilots
    included): the fast engine's own, then those both backends share."""
    if a.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {a.backend!r}")
    check_precision(a.precision)  # fail before copying the model; precision_context shares the check
    if not isinstance(a.cuda_graphs, bool):
        raise TypeError(f"cuda_graphs must be True or False, got {a.cuda_graphs!r}")
    compile_mode = check_compile(a.compile)
    if a.chain_chunk is not None:
        check_int("chain_chunk", a.chain_chunk, minimum=1)
    if a.chain_group is not None:
        check_int("chain_group", a.chain_group, minimum=1)
    fastpath = fastpath_settings.resolve(a.fastpath)
    shared = check_arguments(a, loader)
    a.sampler, a.sampler_kwargs, a.bounding_box = shared.sampler, shared.sampler_kwargs, shared.bounding_box
    return _Run(a=a, auto=shared.auto, args=shared.args, init_method=shared.init_method,
                init_batches=shared.init_batches, init_chosen=shared.init_chosen, sampling=shared.sampling,
                compile_mode=compile_mode, callbacks=shared.callbacks, fastpath=fastpath)


def _run_reference(model, loader, loss_fn, run: _Run, device, split) -> LLCResult:
    """backend="reference": the sequential estimator, in this process."""
    a = run.a
    if split is not None:
        raise ValueError("backend='reference' runs its chains in one process; inside a torch.distributed job "
                         "use backend='auto' or 'fast', which split the chains across ranks")
    try:
        with precision_context(a.precision, device):
            result = sequential.estimate_llc(model, loader, loss_fn, init_loss=a.init_loss, restrict=a.restrict,
                                             device=device, trust_checks=a.trust_checks, progress=a.progress,
                                             callbacks=run.callbacks,
                                             activation_checkpointing=a.activation_checkpointing, mala=a.mala,
                                             draw_batches=a.draw_batches, **run.args, **run.sampling)
    except LLCInterrupted as stop:
        if stop.result is not None:
            stop.result.config["precision"] = a.precision
        raise
    result.config["precision"] = a.precision
    return result


def _prepare(run: _Run, model, loader, loss_fn, device, split) -> None:
    """The model's copy on the device, the loss at w*, the sampler's
    configuration and (on CUDA) the memory plan."""
    a = run.a
    warn_if_dropout(model, stacklevel=4)
    run.device, run.split, run.loss_fn = device, split, loss_fn
    run.nbeta = resolve_nbeta(a.nbeta, loader, a.grad_accum_steps, stacklevel=4)
    run.base = base = copy.deepcopy(model).to(device)
    run.checkpointed = checkpointing.apply(base, a.activation_checkpointing)
    check_differentiable(base, loss_fn, loader, device, seed=a.seed)
    run.l0, run.l0_spread = math.nan, paired_spread(loader)
    if run.init_method != "paired":
        with precision_context(a.precision, device):
            run.l0, run.l0_spread = loss_at_w_star(base, loader, loss_fn, run.init_batches, device, seed=a.seed,
                                                   requested=run.init_chosen, stacklevel=4)
    steps = a.num_burnin + a.num_draws * a.steps_between_draws
    warn_if_cycled(loader, steps, a.grad_accum_steps, stacklevel=4)
    local_chains, offset = (a.num_chains, 0) if split is None else (split.count, split.start)
    cfg = SamplerConfig(num_chains=local_chains, chain_offset=offset, steps=steps, epsilon=float(a.epsilon),
                        nbeta=run.nbeta, gamma=float(a.gamma), weight_decay=float(a.weight_decay),
                        noise_scale=float(a.noise_scale), seed=a.seed, backend=a.backend, precision=a.precision,
                        cuda_graphs=a.cuda_graphs, progress=a.progress and (split is None or split.rank == 0),
                        chain_chunk=a.chain_chunk, sampler=a.sampler, sampler_kwargs=a.sampler_kwargs,
                        bounding_box=a.bounding_box, grad_accum_steps=a.grad_accum_steps,
                        sequential=bool(run.checkpointed), mala=a.mala, compile=run.compile_mode,
                        paired=run.init_method == "paired",
                        independent_draws=a.draw_batches == "independent" and finite_batches(loader) != 1,
                        draw_start=a.num_burnin, draw_every=a.steps_between_draws)
    run.group = a.chain_group or local_chains
    if device.type == "cuda" and a.chain_group is None:
        run.plan = _plan(base, loader, loss_fn, cfg, device)
        run.group, cfg = run.plan.chains_per_group, replace(cfg, chain_chunk=run.plan.chain_chunk)
    run.cfg = cfg


def _sample(run: _Run, loader):
    """The chains, group by group: (the runs, the steps kept, the
    interrupted run's config or None)."""
    a, cfg = run.a, run.cfg
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    runs, interrupted, steps = [], None, cfg.steps
    try:
        for first in range(0, cfg.num_chains, run.group):
            part = replace(cfg, num_chains=min(run.group, cfg.num_chains - first), chain_offset=cfg.chain_offset + first)
            runs.append(run_chains(run.base, loader, run.loss_fn, part, restrict=a.restrict, callbacks=run.callbacks))
    except torch.OutOfMemoryError as exc:
        raise MemoryError(out_of_memory_message(exc, run.plan, a.num_chains)) from exc
    except RuntimeError as exc:
        if not cpu_out_of_memory(exc):
            raise
        raise MemoryError(out_of_memory_message(exc, run.plan, a.num_chains)) from exc
    except ChainsInterrupted as stop:
        if run.split is not None:  # the other ranks cannot be gathered from: stop plainly
            raise KeyboardInterrupt from None
        finished = sum(len(r.losses) for r in runs)
        keep = partial_plan(finished, finished + len(stop.run.losses), stop.steps_done, a.num_burnin,
                            a.steps_between_draws, a.num_draws)
        if keep is None:
            raise_interrupted(None, "estimate_llc")
        if keep.chains > finished:  # every started chain, cut to the draws it reached
            runs = runs + [stop.run]
        steps, interrupted = keep.steps, keep.config
    return runs, steps, interrupted


def _summarise(run: _Run, loader, runs, steps: int, interrupted, started: float) -> LLCResult:
    """The draws, config, timings and trust checks of the runs, as one result."""
    a, cfg, split, device = run.a, run.cfg, run.split, run.device
    last = runs[-1]
    losses = np.concatenate([r.losses[:, :steps] for r in runs])
    stars = np.concatenate([r.star[:, :steps] for r in runs]) if run.init_method == "paired" else None
    stats = np.concatenate([r.stats for r in runs])
    accept = np.concatenate([r.mala[:, :max(steps - 1, 0)] for r in runs]) if a.mala else None
    if split is not None:  # every rank gets all chains, in global order
        losses, stats = gather_rows(split, losses), gather_rows(split, stats)
        accept = gather_rows(split, accept) if a.mala else None
        stars = gather_rows(split, stars) if stars is not None else None
    diverged_at = first_nonfinite(losses)
    # The steps each chain ran (its stats sum over them); more than `steps` for
    # chains that finished when an interrupted estimate keeps fewer.
    steps_run = np.full(a.num_chains, steps) if split is not None else \
        np.concatenate([np.full(len(r.losses), r.losses.shape[1]) for r in runs])
    for c, t in diverged_at.items():
        losses[c, t:] = np.nan  # a diverged chain stops counting where its loss first went non-finite
        steps_run[c] = t
    kept = draw_slice(a.num_burnin, a.steps_between_draws)
    draws = losses[:, kept][:, :a.num_draws]
    init_trace = stars[:, kept][:, :a.num_draws] if stars is not None else None
    config = dict(run.args, init_loss=run.init_method, backend="fast" if last.mode == "vmap" else "fast-sequential",
                  nbeta=run.nbeta, num_init_batches=len(run.l0_spread["init_loss_per_batch"]), device=str(device),
                  precision=a.precision, cuda_graphs=all(r.cuda_graphs for r in runs),
                  chain_chunk=last.pass_plan["chain_chunk"] if last.pass_plan else cfg.chain_chunk,
                  chain_group=run.group, draw_batches="independent" if cfg.independent_draws else "step",
                  fastpath=run.fastpath.as_config(), **run.sampling)
    if run.checkpointed:
        config["activation_checkpointing"] = run.checkpointed
    if run.compile_mode:  # whether every run's batched pass stayed compiled
        config["compile"] = all(r.compiled for r in runs)
    if run.plan is not None:
        config["memory_plan"] = run.plan.to_dict()
    if last.pass_plan is not None:
        config["pass_plan"] = last.pass_plan
    # SDPA, layer norm and linear layers folded over chains (llcfast.fastpath.fold)
    for kind, key in chain_fold.CONFIG_KEYS.items():
        if any(r.folds.get(kind) for r in runs):
            config[key] = all(r.folds.get(kind) for r in runs)
    if last.bf16_copies is not None:  # weights the pass took as bf16 copies (the same in every chain group)
        config["bf16_copies"] = last.bf16_copies
    timings = dict(last.timings, total_s=time.perf_counter() - started)
    for key in ("capture_s", "sampling_s"):
        timings[key] = sum(r.timings.get(key, 0.0) for r in runs)
    timings["ms_per_chain_step"] = 1e3 * timings["sampling_s"] / max(sum(r.losses.size for r in runs), 1)
    if device.type == "cuda":
        timings["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    if split is not None:
        config["world_size"] = split.world_size
    if interrupted is not None:
        config["interrupted"] = interrupted
    trust = {}
    if a.trust_checks and interrupted is None:
        trust = trust_diagnostics(run.base, run.loss_fn, loader, last.final if split is None else None,
                                  epsilon=a.epsilon, nbeta=run.nbeta, gamma=a.gamma, restrict=a.restrict,
                                  precision=a.precision, device=device, seed=a.seed, sampler=a.sampler,
                                  mode=a.trust_checks, chain_steps=a.num_chains * steps * a.grad_accum_steps)
        timings["trust_checks_s"] = trust["gradient_check_s"] + trust["step_check"].get("seconds", 0.0)
        timings["total_s"] = time.perf_counter() - started
    result = finish(draws, run.l0, run.nbeta, stats, steps_run, config=config, timings=timings,
                    diagnostics={**init_loss_diagnostics(run.l0_spread, run.nbeta, run.init_method),
                                 **mala_diagnostics(accept, diverged_at), **trust},
                    stacklevel=4, init_trace=init_trace)
    if interrupted is not None:
        raise_interrupted(result, "estimate_llc")
    return result


def _plan(base, loader, loss_fn, cfg: SamplerConfig, device):
    """The memory plan for ``cfg`` on a CUDA device, with the activations of
    one chain's loss and gradient measured on the loader's first batch."""
    named = trainable(base)
    loss = chain_loss(base, loss_fn, [n for n, _ in named])
    point = tuple(p.detach() for _, p in named)
    batch = to_device(next(loader_batches(loader, cfg.seed, endless=False)), device)

    # Under the steps' loss context, whose fused loss saves less than torch's. One chain needs no chain fold,
    # and torch's SDPA and layer norm save more than the folds do, so the plan errs safe.
    def one_chain():
        with precision_context(cfg.precision, device), loss_context(cfg, fold=False):
            if cfg.sequential:  # plain autograd, as the sequential path runs it
                mine = tuple(p.clone().requires_grad_() for p in point)
                return torch.autograd.grad(loss(mine, batch), mine, allow_unused=True)
            return grad(lambda p: loss(p, batch))(point)

    activations = measure_activation_bytes(one_chain, device)
    return plan_memory(cfg.num_chains, state_bytes(sum(p.numel() for p in point), cfg.sampler, cfg.mala),
                       activations, free_device_bytes(device),
                       1 if cfg.sequential else cfg.chain_chunk, what=str(device), precision=cfg.precision,
                       checkpointing=cfg.sequential)


def estimate_wbic(model: torch.nn.Module, loader, loss_fn: Optional[Callable] = None, *, num_samples: int,
                  **kwargs) -> LLCResult:
    """WBIC (Watanabe's widely applicable BIC): n times the mean loss under
    the localized posterior tempered to beta = 1/log n. Runs estimate_llc at
    nbeta = n / log n (any other estimate_llc argument passes through) and
    stores the value and its standard error across chains in
    ``result.diagnostics["wbic"]`` and ``["wbic_se"]``; the result's LLC is
    the LLC at that temperature.

    n / log n is far above m / log m for minibatches of m, where minibatch
    noise heats the chains; unless grad_accum_steps is given, each step
    therefore averages the gradient over as many micro-batches as keep nbeta
    within 4 x M / log M for the effective batch M (the whole set of a fixed
    loader at most)."""
    n = check_int("num_samples", num_samples, minimum=2)
    if kwargs.get("nbeta") is not None:
        raise ValueError("estimate_wbic sets nbeta = num_samples / log(num_samples); do not pass nbeta")
    nbeta = n / math.log(n)
    if kwargs.get("grad_accum_steps") is None:
        kwargs["grad_accum_steps"] = cool_accumulation(nbeta, loader)
    result = estimate_llc(model, loader, loss_fn, nbeta=nbeta, **kwargs)
    result.diagnostics["wbic"], result.diagnostics["wbic_se"] = result.wbic(n)
    return result
