"""The multi-chain SGLD loop: all chains' parameters stacked on a leading
chain dimension, one batched loss-and-gradient pass per step, one fused
update launch per step, losses kept on the device until the end, and on CUDA
the whole step replayed from a CUDA graph."""
from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from .. import ops
from ..fastpath import bf16_copies, settings
from ..fastpath.token_loss import first_order
from .batches import ChainBatches
from .common import first_line, is_draw_step, precision_context, restriction_masks, trainable
from .compiled import GuardedCompile
from .functional import chain_loss, sequential_grads, vmap_failure, vmapped_grads
from .graphs import GraphStep, side_stream
from .interrupt import ChainsInterrupted
from .loaders import draw_batches
from .mala import MalaTracker
from .planner import cpu_pass_plan, measure_saved_tensors
from .progress import progress_bar
from .samplers import Stepper

# Eager steps before capture: the first allocates and sets up the libraries,
# the second checks the steady state; both are real steps of the chains.
WARMUP_STEPS = 2


@dataclass
class SamplerRun:
    losses: np.ndarray  # [C, steps] float64, the loss that drove each step
    stats: np.ndarray  # [C, 3] float64 sums of g^2, (w - w*)^2, noise^2 over the steps
    mode: str  # "vmap" or "sequential"
    cuda_graphs: bool  # whether steps were replayed from a captured graph
    timings: Dict[str, float] = field(default_factory=dict)
    mala: Optional[np.ndarray] = None  # [C, steps - 1] MALA acceptance probabilities, when asked for
    compiled: bool = False  # whether the batched pass ran through torch.compile to the end
    pass_plan: Optional[dict] = None  # on CPUs: stacked passes (how many chains each) or chain by chain
    folds: Dict[str, int] = field(default_factory=dict)  # calls per batched pass folded over chains, by kind
    bf16_copies: Optional[dict] = None  # the weights the pass took as bf16 copies (bf16_copies.summary)
    star: Optional[np.ndarray] = None  # [C, steps] with cfg.paired: the loss at w* on each step's batches
    final: Optional[List[torch.Tensor]] = None  # the chains' parameters after their last step, [C, ...] each


@dataclass
class SamplerConfig:
    num_chains: int
    steps: int
    epsilon: float
    nbeta: float
    gamma: float
    weight_decay: float
    noise_scale: float
    seed: int
    backend: str = "auto"  # "auto": fall back to sequential with a warning; "fast": raise instead
    precision: str = "fp32"
    cuda_graphs: bool = True
    progress: bool = True
    chain_chunk: Optional[int] = None  # chains per batched pass; None: all
    sampler: str = "sgld"
    sampler_kwargs: Dict[str, float] = field(default_factory=dict)
    bounding_box: float = 0.0  # 0: none
    chain_offset: int = 0  # global index of the first chain (noise is keyed by it)
    grad_accum_steps: int = 1  # micro-batches whose mean loss drives each step
    sequential: bool = False  # chains one after another by request (activation checkpointing needs it)
    mala: bool = False  # record each step's MALA acceptance probability (engine/mala.py)
    compile: Optional[str] = None  # torch.compile mode for the batched loss-and-gradient pass; None: eager
    paired: bool = False  # also record the loss at w* on every step's batches (init_loss="paired")
    independent_draws: bool = False  # draws on batches of their own (loaders.draw_batches), not the step's
    draw_start: int = 0  # the first draw is step draw_start + draw_every - 1 (draw_slice)
    draw_every: int = 1


def run_chains(model: torch.nn.Module, loader, loss_fn: Callable, cfg: SamplerConfig, *, restrict=None,
               callbacks: Sequence[Callable] = ()) -> SamplerRun:
    """Runs cfg.num_chains chains from the model's weights (w*) for cfg.steps
    steps. ``model`` must already be on its device; its parameters are read,
    never written."""
    started = time.perf_counter()
    named = trainable(model)
    if not named:
        raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to sample")
    for n, p in named:
        if p.dtype != torch.float32:
            raise TypeError(f"parameter {n!r} is {p.dtype}; the sampler keeps parameters in torch.float32 "
                            "(call model.float() first; precision='bf16' runs the forward passes in bf16)")
    device = named[0][1].device
    names = [n for n, _ in named]
    centers = [p.detach().contiguous() for _, p in named]
    params = [c.unsqueeze(0).repeat((cfg.num_chains,) + (1,) * c.dim()) for c in centers]
    masks = restriction_masks(named, restrict)
    loss = chain_loss(model, loss_fn, names)
    feed = ChainBatches(loader, cfg.num_chains, device, cfg.seed, cfg.chain_offset)
    draw_feed = ChainBatches(loader, cfg.num_chains, device, cfg.seed, cfg.chain_offset, source=draw_batches) \
        if cfg.independent_draws else None
    accum = cfg.grad_accum_steps

    def next_batches():
        """One step's input: (batch, dims, per_chain) of one micro-batch, or
        with accumulation a tuple of them as the batch (None if any cannot
        be stacked) and the list of per-chain lists."""
        if accum == 1:
            return feed.next_stacked()
        micro = [feed.next_stacked() for _ in range(accum)]
        stackable = all(m[0] is not None for m in micro)
        return (tuple(m[0] for m in micro) if stackable else None, tuple(m[1] for m in micro) if stackable else None,
                [m[2] for m in micro])

    first = next_batches()
    probe = first if accum == 1 else (first[0][0] if first[0] is not None else None,
                                      first[1][0] if first[1] is not None else None, first[2][0])
    pass_plan = None
    if device.type == "cpu" and cfg.chain_chunk is None and not cfg.sequential:
        pass_plan = _cpu_pass_plan(loss, params, probe[2][0], cfg)
        cfg = replace(cfg, chain_chunk=pass_plan["chain_chunk"], sequential=pass_plan["sequential"])
    mode, folds = _choose_mode(loss, params, probe, cfg, device)
    copies = _bf16_copies(loss, params, probe[2][0], cfg, device, mode)
    working = bf16_copies.pass_inputs(params, copies)
    use_graphs = cfg.cuda_graphs and device.type == "cuda" and mode == "vmap"
    grad_buf: List[torch.Tensor] = []  # filled on first use: steps whose batches cannot be stacked need it too
    trace = torch.full((cfg.steps, cfg.num_chains), float("nan"), dtype=torch.float32, device=device)
    star = torch.full_like(trace, float("nan")) if cfg.paired else None
    star_pass = _Losses(loss, cfg.num_chains, cfg.chain_chunk, mode == "vmap", at=tuple(centers)) \
        if cfg.paired else None
    stats = torch.zeros(cfg.num_chains, 3, dtype=torch.float64, device=device)
    step_tensor = torch.zeros(1, dtype=torch.int64, device=device)
    stepper = Stepper(ops, cfg.sampler, cfg.sampler_kwargs, cfg.bounding_box, params, epsilon=cfg.epsilon,
                      seed=cfg.seed, chain_offset=cfg.chain_offset)
    mala = MalaTracker(params, centers, masks, steps=cfg.steps, eps=cfg.epsilon, nbeta=cfg.nbeta, gamma=cfg.gamma,
                       weight_decay=cfg.weight_decay, noise_scale=cfg.noise_scale) if cfg.mala else None

    passes = BatchedPasses(loss, cfg.chain_chunk, cfg.compile)

    def grads_of(batch, dims, per_chain):
        if mode == "vmap" and batch is not None:
            grads, losses = passes(dims)(working, batch)
            return [g.contiguous() for g in grads], losses
        if not grad_buf:
            grad_buf.extend(torch.empty_like(p) for p in params)
        return grad_buf, sequential_grads(loss, params, per_chain, grad_buf)

    def step(batch, dims, per_chain=None) -> None:
        with precision_context(cfg.precision, device), loss_context(cfg, bool(folds)):
            if accum == 1:
                grads, losses = grads_of(batch, dims, per_chain)
            else:  # the gradient of the mean micro-batch loss
                grads, losses = None, None
                for i in range(accum):
                    g, l = grads_of(None if batch is None else batch[i], None if dims is None else dims[i],
                                    per_chain[i] if per_chain is not None else None)
                    if grads is None:  # the sequential path refills one buffer per micro-batch: keep a copy
                        grads = [x.clone() for x in g] if g is grad_buf else g
                    else:
                        grads = [a.add_(x) for a, x in zip(grads, g)]
                    losses = l if losses is None else losses + l
                grads = [g.div_(accum) for g in grads]
                losses = losses / accum
        trace.index_copy_(0, step_tensor, losses.detach().to(torch.float32).reshape(1, -1))
        if star is not None:  # w* as one more chain that never moves, on the same batches
            with precision_context(cfg.precision, device):
                at_star = star_pass(batch, dims, per_chain) if accum == 1 else sum(
                    star_pass(None if batch is None else batch[i], None if dims is None else dims[i],
                              per_chain[i] if per_chain is not None else None) for i in range(accum)) / accum
            star.index_copy_(0, step_tensor, at_star.to(torch.float32).reshape(1, -1))
        with torch.no_grad():
            if mala is not None:
                mala.observe(params, grads, losses, step_tensor)
            stepper.step(params, grads, centers, eps=cfg.epsilon, nbeta=cfg.nbeta, gamma=cfg.gamma,
                         weight_decay=cfg.weight_decay, noise_scale=cfg.noise_scale, seed=cfg.seed, step=0,
                         chain_offset=cfg.chain_offset, masks=masks, stats=stats, step_tensor=step_tensor,
                         bf16_copies=copies)
        step_tensor.add_(1)

    views = dict(zip(names, params))
    graph: Optional[GraphStep] = None
    capture_s = 0.0
    bar = progress_bar(cfg.progress, cfg.steps, f"SGLD ({cfg.num_chains} chains, {mode})")
    sampling_started = time.perf_counter()

    def result(done: int) -> SamplerRun:
        losses = trace[:done].t().double().cpu().numpy()  # the one host sync
        bar.close()
        now = time.perf_counter()
        sampling_s = now - sampling_started - capture_s
        timings = {"setup_s": sampling_started - started, "capture_s": capture_s, "sampling_s": sampling_s,
                   "ms_per_chain_step": 1e3 * sampling_s / (cfg.num_chains * max(done, 1))}
        return SamplerRun(losses, stats.cpu().numpy(), mode, graph is not None, timings,
                          mala.result(done) if mala is not None else None,
                          compiled=passes.compiled and mode == "vmap",  # the sequential path is not compiled
                          pass_plan=pass_plan, folds=folds, bf16_copies=bf16_copies.summary(params, copies),
                          star=star[:done].t().double().cpu().numpy() if star is not None else None,
                          final=params)

    draw_pass = _Losses(loss, cfg.num_chains, cfg.chain_chunk, mode == "vmap") if draw_feed is not None else None

    def draw_losses():
        """The draw at the chains' current weights on the draws' own batches
        (and w*'s on the same, when paired): [C] each."""
        at_chains, at_star = 0.0, 0.0
        # Plain torch on the fp32 weights: a forward alone needs none of the step's first-order kernels, and a
        # draw is then the same number whatever fast path (folds, bf16 copies) the steps took
        with precision_context(cfg.precision, device):
            for _ in range(accum):
                b, d, per = draw_feed.next_stacked()
                at_chains = at_chains + draw_pass(b, d, per, params=tuple(params))
                if star is not None:
                    at_star = at_star + star_pass(b, d, per)
        return at_chains / accum, (at_star / accum if star is not None else None)

    done = 0  # steps finished, callbacks included
    try:
        for t in range(cfg.steps):
            drawn = None
            if draw_feed is not None and is_draw_step(t, cfg.draw_start, cfg.draw_every):
                drawn = draw_losses()  # before the step moves the chains
            batch, dims, per_chain = first if t == 0 else next_batches()
            if use_graphs and graph is None and t >= WARMUP_STEPS and batch is not None:
                capture_started = time.perf_counter()
                graph = _capture(step, batch, dims)
                capture_s += time.perf_counter() - capture_started
                use_graphs = graph is not None
            if graph is not None and graph.accepts(batch, dims):
                graph.replay(batch)
            else:
                with side_stream(use_graphs and graph is None):
                    step(batch, dims, per_chain)
            for cb in callbacks:
                cb(step=t, chains=range(cfg.chain_offset, cfg.chain_offset + cfg.num_chains), loss=trace[t],
                   params=views)
            if drawn is not None:  # the draw replaces the step's own loss in the trace, after the callbacks saw it
                trace[t].copy_(drawn[0].detach().to(torch.float32).reshape(-1))
                if drawn[1] is not None:
                    star[t].copy_(drawn[1].to(torch.float32).reshape(-1))
            bar.update(1)
            done = t + 1
    except KeyboardInterrupt:
        # The step under way may be half applied; the steps before it are whole.
        raise ChainsInterrupted(result(done), done) from None
    return result(cfg.steps)


class _Losses:
    """The loss on each chain's batch, [C], without gradients: at one shared
    point (``at``, w*) or at each chain's own weights (``params`` of a
    call). One batched forward (vmap) where the batches stack, one shared
    forward where every chain got the same batch at the shared point, else
    chain by chain."""

    def __init__(self, loss: Callable, num_chains: int, chain_chunk: Optional[int], batched: bool,
                 at: Optional[tuple] = None):
        self.loss, self.num_chains, self.chain_chunk, self.at = loss, num_chains, chain_chunk, at
        self.batched = batched  # False where vmap cannot run the model: chain by chain, as the steps run
        self._fns: Dict[tuple, Callable] = {}

    def __call__(self, batch, dims, per_chain, params: Optional[tuple] = None) -> torch.Tensor:
        shared = params is None
        point = self.at if shared else params
        with torch.no_grad():
            if batch is None or not self.batched:
                return torch.stack([self.loss(point if shared else tuple(p[c] for p in point), b).detach()
                                    for c, b in enumerate(per_chain)])
            if shared and all(d is None for d in tree_flatten(dims)[0]):
                return self.loss(point, batch).detach().expand(self.num_chains)
            key = (shared, repr(dims))
            if key not in self._fns:
                self._fns[key] = torch.func.vmap(self.loss, in_dims=(None if shared else 0, dims),
                                                 randomness="different", chunk_size=self.chain_chunk)
            return self._fns[key](point, batch).detach()


class BatchedPasses:
    """The vmapped loss-and-gradient function for each batch layout, built
    once; with ``compile`` it goes through torch.compile (Inductor fuses the
    elementwise work around the matmuls). A model torch.compile cannot
    handle runs eagerly after one warning."""

    def __init__(self, loss: Callable, chain_chunk: Optional[int], mode: Optional[str]):
        self.loss, self.chain_chunk, self.mode = loss, chain_chunk, mode
        self._compile = GuardedCompile(mode, "this model's batched pass")
        self._fns: Dict[str, Callable] = {}

    @property
    def compiled(self) -> bool:
        return self._compile.active

    def __call__(self, dims) -> Callable:
        key = repr(dims)
        if key not in self._fns:
            self._fns[key] = self._compile.wrap(vmapped_grads(self.loss, dims, self.chain_chunk))
        return self._fns[key]


def _cpu_pass_plan(loss: Callable, params: List[torch.Tensor], batch, cfg: SamplerConfig) -> dict:
    """How a CPU runs the passes (planner.cpu_pass_plan), from the activations
    chain 0's forward pass saves on its first batch. A compiled pass stays
    stacked: compiling it is what was asked for."""
    point = tuple(p[0].detach().clone().requires_grad_() for p in params)
    # One chain needs no chain fold, and torch's SDPA and layer norm save more than the folds do.
    with precision_context(cfg.precision, torch.device("cpu")), loss_context(cfg, fold=False):
        total, largest = measure_saved_tensors(lambda: loss(point, batch))
    return cpu_pass_plan(cfg.num_chains, total, largest, stack=cfg.compile is not None)


def _bf16_copies(loss: Callable, params: List[torch.Tensor], batch, cfg: SamplerConfig, device, mode: str):
    """The bf16 working copies the batched pass takes (engine/bf16_copies.py),
    or None: only for SGLD's eager batched pass under bf16 autocast, one
    gradient a step (an accumulated one would be summed in bf16) and no MALA
    (which reads the gradients itself). A compiled pass keeps the casts,
    which Inductor schedules with its other kernels, and the code measured
    with them."""
    if (cfg.precision != "bf16" or mode != "vmap" or cfg.sampler != "sgld" or cfg.grad_accum_steps != 1
            or cfg.mala or cfg.compile is not None or not settings.current().on("bf16_copies", device)):
        return None
    with precision_context(cfg.precision, device), loss_context(cfg, fold=False):
        use = bf16_copies.cast_only(loss, [p[0] for p in params], batch)
    return bf16_copies.make_copies(params, use)


def loss_context(cfg: SamplerConfig, fold: bool = True):
    """Where the step's losses may take first-order-only kernels (fused_loss,
    chain_fold): everywhere but under torch.compile, where Inductor fuses
    the loss itself and the opaque kernels would only split its graph. The
    vmap probe enters the same context, so it probes the pass the steps run;
    ``fold`` False leaves out the chain fold's mode (a pass that folds no
    call only pays for its hook)."""
    return first_order(fold) if cfg.compile is None else nullcontext()


def _choose_mode(loss, params: List[torch.Tensor], first, cfg: SamplerConfig, device):
    """("vmap" or "sequential", the calls the batched pass folds over chains
    by kind: empty where the fold's mode is left out)."""
    if cfg.sequential:
        return "sequential", {}
    batch, dims, per_chain = first
    probe, probe_dims = (batch, dims) if batch is not None else (per_chain[0], None)
    with precision_context(cfg.precision, device), loss_context(cfg) as fold:
        reason = vmap_failure(loss, params, probe, probe_dims, cfg.chain_chunk)
    if reason is None:
        return "vmap", dict(fold.calls) if fold is not None and fold.folded else {}
    if fold is not None and fold.folded:  # the fold is the only part of the pass that is ours to leave out
        with precision_context(cfg.precision, device), loss_context(cfg, fold=False):
            if vmap_failure(loss, params, probe, probe_dims, cfg.chain_chunk) is None:
                return "vmap", {}
    if cfg.backend == "fast":
        raise RuntimeError(f"backend='fast' cannot batch this model's chains with torch.func.vmap ({reason}). "
                           "Common causes: batch norm in train mode, data-dependent control flow, in-place ops on "
                           "parameters. Use backend='auto' to run the chains one after another with the fused step.")
    warnings.warn(f"llcfast: this model cannot be batched over chains with torch.func.vmap ({reason}); running the "
                  "chains one after another with the fused step (slower). Call model.eval() if batch norm in train "
                  "mode is the cause.", RuntimeWarning, stacklevel=4)
    return "sequential", {}


def _capture(step: Callable, batch, dims) -> Optional[GraphStep]:
    # The warm-up steps ran on a side stream, and the blocks they freed stay cached for that stream, where the
    # capture's private pool cannot reuse them: a capture would then need a second step's worth of memory. On
    # the H100, GPT-2 124M planned at 3 chains a pass (about 54 GB of activations) was left without graphs.
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    try:
        return GraphStep(step, batch, dims)
    except Exception as exc:  # capture rejects host syncs and some ops; eager steps still work
        warnings.warn(f"llcfast: could not capture the SGLD step as a CUDA graph ({type(exc).__name__}: "
                      f"{first_line(exc)}); continuing without graphs "
                      "(slower). Pass cuda_graphs=False to skip the attempt.", RuntimeWarning, stacklevel=4)
        torch.cuda.synchronize()
        return None
