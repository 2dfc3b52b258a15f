"""Per-sample losses observed at the draws of an estimate_llc run: the
callback that evaluates them on observable sets for all of a step's chains
in one batched pass (vmap over chains) and folds them into running sums on
the device, and the run that carries it. The BIF and the susceptibilities
are read from these sums."""
from __future__ import annotations

import copy
import inspect
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch.func import vmap

from .._checks import check_int
from ..engine.common import is_draw_step, resolve_device, to_device
from ..engine.distributed import current_split
from ..engine.functional import chain_loss
from .auto import auto_epsilon, check_auto
from .llc import estimate_llc
from .result import LLCResult
from .sequential import estimate_llc as sequential_estimate_llc
from .trust import relaxation_steps

UNITS = ("sequence", "token")


ACCUMULATOR_BYTES = 2 * 2 ** 30  # per-chain outer products above this ask for fewer observables


class Observer:
    """The callback that evaluates the per-sample losses on every
    observable at the draws, for all of a step's chains in one pass, and
    folds them into the running sums (with ``store``, also keeps them)."""

    def __init__(self, model, observables: Dict[str, list], per_sample_loss_fn: Callable, unit: str,
                 num_chains: int, store: bool, outer: bool = True, on_draw: Optional[Callable] = None):
        self.model, self.observables, self.per_sample_loss_fn, self.unit = model, observables, per_sample_loss_fn, unit
        self.num_chains, self.store, self.outer, self.on_draw = num_chains, store, outer, on_draw
        self.is_draw: Callable[[int], bool] = lambda step: False
        self.planned_draws = 0
        self.loss = None
        self.names: List[str] = []
        self.labels: Optional[List[tuple]] = None
        self.s1 = self.s2 = self.by_draw = None
        self.counts = np.zeros(num_chains, dtype=np.int64)
        self.traces: Dict[int, list] = {}
        self.vmapped = True

    def schedule(self, num_burnin: int, num_draws: int, steps_between_draws: int) -> None:
        """The steps whose end are draws, as estimate_llc takes them."""
        self.planned_draws = num_draws
        self.is_draw = lambda t: (is_draw_step(t, num_burnin, steps_between_draws)
                                  and (t - num_burnin) // steps_between_draws < num_draws)

    def __call__(self, step, chains, loss, params):
        if not self.is_draw(step):
            return
        device = next(iter(params.values())).device
        if self.loss is None:
            base = copy.deepcopy(self.model).to(device)
            self.names = list(params)
            self.loss = chain_loss(base, self.per_sample_loss_fn, self.names, scalar=False)
        with torch.no_grad():
            x = self._losses(tuple(params[n] for n in self.names), device)  # [c, N] float64
        if self.s1 is None:
            self._start(x.shape[1], device)
        ids = list(chains)
        draw = int(self.counts[ids[0]])
        self.s1[ids[0]:ids[-1] + 1].add_(x)
        if self.outer:
            self.s2[ids[0]:ids[-1] + 1].add_(x[:, :, None] * x[:, None, :])
        if self.on_draw is not None:
            self.on_draw(x)
        self.by_draw[draw].add_(x.sum(0))
        self.counts[ids] += 1
        if self.store:
            for r, c in enumerate(ids):
                self.traces.setdefault(c, []).append(x[r].cpu())

    def _start(self, n: int, device) -> None:
        need = self.num_chains * n * n * 8 if self.outer else 0
        if need > ACCUMULATOR_BYTES:
            raise MemoryError(f"estimate_bif: {n} observable {self.unit}s need {need / 2 ** 30:.1f} GiB of per-chain "
                              f"sums of outer products (at most {ACCUMULATOR_BYTES / 2 ** 30:.0f} GiB); pass fewer "
                              "observable samples, unit='sequence', or fewer chains")
        self.s1 = torch.zeros(self.num_chains, n, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(self.num_chains, n, n, dtype=torch.float64, device=device) if self.outer else None
        self.by_draw = torch.zeros(self.planned_draws, n, dtype=torch.float64, device=device)

    def _losses(self, params: tuple, device) -> torch.Tensor:
        """[chains, N]: every observable's per-sample (or per-token) losses,
        concatenated in ``labels`` order."""
        parts, labels = [], []
        for name, batches in self.observables.items():
            offset = 0
            for batch in batches:
                out = self._per_chain(params, to_device(batch, device))  # [c, B] or [c, B, T]
                if out.dim() not in (2, 3):
                    raise ValueError(f"per_sample_loss_fn returned shape {tuple(out.shape[1:])} for observable "
                                     f"{name!r}; expected [batch] (per sample) or [batch, positions] (per token)")
                rows = out.shape[1]
                if self.unit == "sequence":
                    out = out.mean(-1) if out.dim() == 3 else out
                    labels += [(name, offset + b) for b in range(rows)]
                else:
                    if out.dim() != 3:
                        raise ValueError(f"unit='token' needs per-token losses [batch, positions] from "
                                         f"per_sample_loss_fn; observable {name!r} gave [batch]")
                    labels += [(name, offset + b, t) for b in range(rows) for t in range(out.shape[2])]
                    out = out.reshape(out.shape[0], -1)
                offset += rows
                parts.append(out.double())
        if self.labels is None:
            self.labels = labels
        return torch.cat(parts, dim=1)

    def _per_chain(self, params: tuple, batch) -> torch.Tensor:
        if self.vmapped:
            try:
                return vmap(self.loss, in_dims=(0, None), randomness="different")(params, batch).detach()
            except RuntimeError:  # a model vmap cannot batch: chain by chain
                self.vmapped = False
        return torch.stack([self.loss(tuple(p[c] for p in params), batch).detach()
                            for c in range(params[0].shape[0])])

    def stacked_traces(self) -> torch.Tensor:
        """The kept draws, [chains, draws, N]."""
        return torch.stack([torch.stack(self.traces[c]) for c in sorted(self.traces)])

    def all_reduce(self) -> None:
        """The sums over every rank's chains, on every rank (a chain's rows
        are zero on the ranks that did not run it)."""
        if self.store:
            raise ValueError("keep_traces keeps each rank's own draws; inside a torch.distributed job pass "
                             "keep_traces=False (the statistics are gathered either way)")
        counts = torch.from_numpy(self.counts).to(self.s1.device)
        for t in [self.s1, self.by_draw, counts] + ([self.s2] if self.outer else []):
            reduce_sum(t)
        self.counts = counts.cpu().numpy()
        if hasattr(self.on_draw, "all_reduce"):
            self.on_draw.all_reduce()

    def result_arrays(self):
        """(s1 [C, N], s2 [C, N, N], counts [C], chain means by draw [T, N])."""
        return (self.s1.cpu().numpy(), self.s2.cpu().numpy() if self.outer else None, self.counts.copy(),
                self.by_draw.cpu().numpy() / self.num_chains)


def reduce_sum(t: torch.Tensor) -> None:
    """``t`` summed over the ranks, in place, through the collective's own
    device (CUDA for nccl, the CPU for gloo)."""
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    moved = t.to(device)
    dist.all_reduce(moved)
    t.copy_(moved)


def check_observed(observables, per_sample_loss_fn, unit: str, backend: str, sampling: dict, name: str) -> int:
    """The checks every observed run shares; returns the number of chains."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if not callable(per_sample_loss_fn):
        raise TypeError(f"per_sample_loss_fn must be a function (model, batch) -> per-sample losses, got "
                        f"{per_sample_loss_fn!r}")
    if not isinstance(observables, dict) or not observables:
        raise ValueError("observables must be a non-empty dict {name: list of batches}")
    for key, batches in observables.items():
        if isinstance(batches, torch.Tensor) or not isinstance(batches, (list, tuple)) or not batches:
            raise ValueError(f"observable {key!r} must be a non-empty list of batches, got "
                             f"{type(batches).__name__}")
    if "callbacks" in sampling:
        raise ValueError(f"{name} uses the sampler's callbacks itself; run estimate_llc for your own")
    if check_auto("gamma", sampling.get("gamma", 100.0)):
        raise ValueError(f"{name} needs a number for gamma (the posterior is the one at that gamma); "
                         "estimate_llc(gamma='auto') reports the one its ladder chose")
    num_chains = check_int("num_chains", sampling.get("num_chains", 8), minimum=1)
    if backend not in ("auto", "fast", "reference"):
        raise ValueError(f"backend must be 'auto', 'fast' or 'reference', got {backend!r}")
    if current_split(num_chains) is not None and sampling.get("split_chains", True) and backend == "reference":
        raise ValueError(f"{name}: backend='reference' runs its chains in one process; inside a torch.distributed "
                         "job use backend='auto' or 'fast', which split the chains across ranks")
    return num_chains


def sample_observed(model, loader, loss_fn, observer: Observer, backend: str, sampling: dict) -> LLCResult:
    """estimate_llc (or the sequential estimator) with ``observer`` as its
    callback, told which steps are draws once epsilon and the burn-in are
    known; epsilon="auto" runs its pilots first, without the observer."""
    reference = backend == "reference"
    estimate = sequential_estimate_llc if reference else estimate_llc
    if reference:
        sampling = {k: v for k, v in sampling.items() if k not in _FAST_ONLY}

    def run(model_, loader_, loss_fn_, **kw):
        if kw.get("callbacks"):  # the pilots run without callbacks; the run that carries them is observed
            burn = kw.get("num_burnin", "auto")
            burn = relaxation_steps(kw["epsilon"], kw.get("gamma", 100.0)) if check_auto("num_burnin", burn) else burn
            observer.schedule(burn, kw.get("num_draws", 200), kw.get("steps_between_draws", 1))
            kw["num_burnin"] = burn
        return estimate(model_, loader_, loss_fn_, **kw)

    settings = dict(sampling, callbacks=[observer])
    if not reference:
        settings["backend"] = backend
    epsilon = settings.pop("epsilon", "auto")
    if check_auto("epsilon", epsilon):
        # auto_epsilon reads the whole settings dict: the estimator's own defaults under the caller's choices
        defaults = {k: p.default for k, p in inspect.signature(estimate).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY and k != "epsilon"}
        full = dict(defaults, **settings)
        full["device"] = resolve_device(full.get("device"), model)
        llc = auto_epsilon(run, model, loader, loss_fn, full)
    else:
        llc = run(model, loader, loss_fn, epsilon=epsilon, **settings)
    if observer.s1 is None:
        raise RuntimeError("the run made no draws to observe")
    if current_split(observer.num_chains) is not None and sampling.get("split_chains", True):
        observer.all_reduce()  # each rank summed its own chains: every rank gets the job's sums
    return llc


# estimate_llc's arguments the sequential estimator does not take
_FAST_ONLY = ("backend", "precision", "cuda_graphs", "chain_chunk", "split_chains", "chain_group", "compile",
              "fastpath")
