"""The Bayesian influence function (BIF): how per-sample losses co-vary
across draws of the localized posterior that estimate_llc samples.

At every draw each chain's per-sample losses on the observable sets are
evaluated in one batched pass over the chains (vmap), and folded into
running sums on the device: per chain, the sum of the loss vectors and of
their outer products (float64), and per draw the sum over chains. From them
come the covariance (or correlation) between every pair of observable
samples (or tokens) under three ways of pooling the chains:

- "stack": every chain's draws pooled and centred on their common mean (as
  devinterp's "stack");
- "centred": each chain centred on its own mean, then pooled, so that chains
  which have not mixed add no spread of their own;
- "mean": the chains' mean at each draw, centred over draws (devinterp's
  "mean").

The standard error comes from resampling whole chains (a chain bootstrap).
The twin, ``bif_from_traces``, takes stored traces and torch.cov.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.func import vmap

from .._checks import check_int
from ..engine.common import resolve_device
from ..engine.distributed import current_split
from ..engine.functional import chain_loss
from .auto import auto_epsilon, check_auto
from .llc import estimate_llc
from .result import LLCResult
from .sequential import estimate_llc as sequential_estimate_llc
from .trust import relaxation_steps

UNITS = ("sequence", "token")
STATISTICS = ("correlation", "covariance")
CHAIN_POOLING = ("stack", "centred", "mean")
ACCUMULATOR_BYTES = 2 * 2 ** 30  # per-chain outer products above this ask for fewer observables
BOOTSTRAP_SAMPLES = 200


@dataclass
class BIFResult:
    """``influence[i, j]``: the statistic between observable samples i and j
    (rows in ``labels`` order); ``se``: its chain-bootstrap standard error
    (None for pooling "mean"); ``llc``: the sampling run's LLCResult."""
    influence: np.ndarray
    se: Optional[np.ndarray]
    labels: List[tuple]
    statistic: str
    pooling: str
    unit: str
    draws: int
    llc: LLCResult
    config: Dict = field(default_factory=dict)

    def to_frame(self):
        """Long format: one row per pair (i, j) with both labels."""
        import pandas as pd
        n = len(self.labels)
        i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        frame = pd.DataFrame({"i": i.ravel(), "j": j.ravel(), "influence": self.influence.ravel()})
        if self.se is not None:
            frame["se"] = self.se.ravel()
        names = ["observable", "sample"] + (["position"] if self.unit == "token" else [])
        for side in ("i", "j"):
            for k, name in enumerate(names):
                frame[f"{name}_{side}"] = [self.labels[r][k] for r in frame[side]]
        return frame

    def plot(self, path: Optional[str] = None, order: Optional[Sequence] = None, ax=None):
        """A heat map of ``influence``, rows and columns in ``order`` (any
        sortable label per row, e.g. a topic), or in label order."""
        import matplotlib
        if ax is None and path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        index = np.arange(len(self.labels)) if order is None else np.argsort(np.asarray(order), kind="stable")
        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(6.5, 5.5))
        shown = self.influence[np.ix_(index, index)]
        limit = np.nanmax(np.abs(shown)) if np.isfinite(shown).any() else 1.0
        image = ax.imshow(shown, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set(title=f"BIF ({self.statistic} of per-{self.unit} losses, {self.pooling} chains, {self.draws} draws)",
               xlabel=f"{self.unit} j", ylabel=f"{self.unit} i")
        ax.figure.colorbar(image, ax=ax)
        if fig is not None and path is not None:
            fig.savefig(path, dpi=120, bbox_inches="tight")
            plt.close(fig)
        return ax


class _Observer:
    """The callback that evaluates the per-sample losses on every
    observable at the draws, for all of a step's chains in one pass, and
    folds them into the running sums (with ``store``, also keeps them)."""

    def __init__(self, model, observables: Dict[str, list], per_sample_loss_fn: Callable, unit: str,
                 num_chains: int, store: bool):
        self.model, self.observables, self.per_sample_loss_fn, self.unit = model, observables, per_sample_loss_fn, unit
        self.num_chains, self.store = num_chains, store
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
        self.is_draw = lambda t: (t >= num_burnin and (t - num_burnin) % steps_between_draws == steps_between_draws - 1
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
        self.s2[ids[0]:ids[-1] + 1].add_(x[:, :, None] * x[:, None, :])
        self.by_draw[draw].add_(x.sum(0))
        self.counts[ids] += 1
        if self.store:
            for r, c in enumerate(ids):
                self.traces.setdefault(c, []).append(x[r].cpu())

    def _start(self, n: int, device) -> None:
        need = self.num_chains * n * n * 8
        if need > ACCUMULATOR_BYTES:
            raise MemoryError(f"estimate_bif: {n} observable {self.unit}s need {need / 2 ** 30:.1f} GiB of per-chain "
                              f"sums of outer products (at most {ACCUMULATOR_BYTES / 2 ** 30:.0f} GiB); pass fewer "
                              "observable samples, unit='sequence', or fewer chains")
        self.s1 = torch.zeros(self.num_chains, n, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(self.num_chains, n, n, dtype=torch.float64, device=device)
        self.by_draw = torch.zeros(self.planned_draws, n, dtype=torch.float64, device=device)

    def _losses(self, params: tuple, device) -> torch.Tensor:
        """[chains, N]: every observable's per-sample (or per-token) losses,
        concatenated in ``labels`` order."""
        parts, labels = [], []
        for name, batches in self.observables.items():
            offset = 0
            for batch in batches:
                out = self._per_chain(params, _to(batch, device))  # [c, B] or [c, B, T]
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

    def result_arrays(self):
        """(s1 [C, N], s2 [C, N, N], counts [C], chain means by draw [T, N])."""
        return (self.s1.cpu().numpy(), self.s2.cpu().numpy(), self.counts.copy(),
                self.by_draw.cpu().numpy() / self.num_chains)


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def pooled_covariance(s1: np.ndarray, s2: np.ndarray, counts: np.ndarray, by_draw: np.ndarray,
                      pooling: str) -> np.ndarray:
    """The covariance of the loss vectors under ``pooling``, from the running
    sums: per chain s1[c] = sum of x, s2[c] = sum of x x^T over its counts[c]
    draws; by_draw[t] the chains' mean at draw t."""
    if pooling == "stack":
        n = counts.sum()
        total = s1.sum(0)
        return (s2.sum(0) - np.outer(total, total) / n) / (n - 1)
    if pooling == "centred":
        within = s2.sum(0) - np.einsum("ci,cj,c->ij", s1, s1, 1.0 / counts)
        return within / (counts - 1).sum()
    centred = by_draw - by_draw.mean(0)
    return centred.T @ centred / (len(by_draw) - 1)


def as_statistic(cov: np.ndarray, statistic: str) -> np.ndarray:
    if statistic == "covariance":
        return cov
    scale = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        return cov / np.outer(scale, scale)


def bif_from_traces(traces: torch.Tensor, statistic: str = "correlation", pooling: str = "stack") -> torch.Tensor:
    """The twin: the same statistic from stored traces [C, T, N] of per-sample
    losses, with torch.cov / torch.corrcoef."""
    c, t, n = traces.shape
    if pooling == "stack":
        rows = traces.reshape(c * t, n).T
        return torch.corrcoef(rows) if statistic == "correlation" else torch.cov(rows)
    if pooling == "mean":
        rows = traces.mean(0).T
        return torch.corrcoef(rows) if statistic == "correlation" else torch.cov(rows)
    centred = traces - traces.mean(1, keepdim=True)
    cov = torch.einsum("cti,ctj->ij", centred, centred) / (c * (t - 1))
    if statistic == "covariance":
        return cov
    scale = cov.diagonal().sqrt()
    return cov / torch.outer(scale, scale)


def chain_bootstrap_se(s1, s2, counts, statistic: str, pooling: str, seed: int) -> Optional[np.ndarray]:
    """The standard error of the statistic over resamples of whole chains;
    None where chains cannot be resampled on their own (pooling "mean", one
    chain)."""
    if pooling == "mean" or len(counts) < 2:
        return None
    gen = np.random.default_rng(seed)
    samples = []
    for _ in range(BOOTSTRAP_SAMPLES):
        pick = gen.integers(0, len(counts), len(counts))
        samples.append(as_statistic(pooled_covariance(s1[pick], s2[pick], counts[pick], None, pooling), statistic))
    return np.std(np.stack(samples), axis=0, ddof=1)


def estimate_bif(model: torch.nn.Module, loader, observables: Dict[str, Sequence], *,
                 per_sample_loss_fn: Callable, loss_fn: Optional[Callable] = None, unit: str = "sequence",
                 statistic: str = "correlation", pooling: str = "stack", backend: str = "auto",
                 keep_traces: bool = False, **sampling) -> BIFResult:
    """The Bayesian influence function between the samples (or tokens) of
    ``observables`` at the model's weights w*.

    Samples the localized posterior as ``estimate_llc(model, loader,
    loss_fn, **sampling)`` does (same defaults, same arguments; gamma must
    be a number), and at every draw evaluates ``per_sample_loss_fn(model,
    batch)`` on each batch of each observable set for all chains at once.

    observables: {name: list of batches}; each batch is what
        per_sample_loss_fn takes.
    per_sample_loss_fn: ``(model, batch) -> [batch]`` per-sample losses, or
        ``[batch, positions]`` per-token losses.
    unit: "sequence" (per-token losses averaged over positions) or "token".
    statistic: "correlation" (devinterp's default) or "covariance".
    pooling: how chains are pooled: "stack", "centred" or "mean" (module
        docstring).
    backend: "auto"/"fast" (the batched engine) or "reference" (the
        sequential estimator; the traces are kept and the statistic is
        the twin's, torch.cov on them).
    keep_traces: also keep every draw's losses, ``config["traces"]`` [C, T, N].
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if pooling not in CHAIN_POOLING:
        raise ValueError(f"pooling must be one of {CHAIN_POOLING}, got {pooling!r}")
    if not callable(per_sample_loss_fn):
        raise TypeError(f"per_sample_loss_fn must be a function (model, batch) -> per-sample losses, got "
                        f"{per_sample_loss_fn!r}")
    if not isinstance(observables, dict) or not observables:
        raise ValueError("observables must be a non-empty dict {name: list of batches}")
    for name, batches in observables.items():
        if isinstance(batches, torch.Tensor) or not isinstance(batches, (list, tuple)) or not batches:
            raise ValueError(f"observable {name!r} must be a non-empty list of batches, got "
                             f"{type(batches).__name__}")
    if "callbacks" in sampling:
        raise ValueError("estimate_bif uses the sampler's callbacks itself; run estimate_llc for your own")
    gamma = sampling.get("gamma", 100.0)
    if check_auto("gamma", gamma):
        raise ValueError("estimate_bif needs a number for gamma (the BIF is a property of the posterior at one "
                         "gamma); estimate_llc(gamma='auto') reports the one its ladder chose")
    num_chains = check_int("num_chains", sampling.get("num_chains", 8), minimum=1)
    if backend not in ("auto", "fast", "reference"):
        raise ValueError(f"backend must be 'auto', 'fast' or 'reference', got {backend!r}")
    if current_split(num_chains) is not None and sampling.get("split_chains", True):
        raise ValueError("estimate_bif runs its chains in one process; inside a torch.distributed job pass "
                         "split_chains=False")
    reference = backend == "reference"
    observer = _Observer(model, dict(observables), per_sample_loss_fn, unit, num_chains,
                         store=keep_traces or reference)
    estimate = sequential_estimate_llc if reference else estimate_llc
    if reference:
        sampling = {k: v for k, v in sampling.items() if k not in _FAST_ONLY}

    def run(model_, loader_, loss_fn_, **kw):
        # epsilon="auto": its pilots run without callbacks; the run that carries them is the one to observe
        if kw.get("callbacks"):
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
        full = dict(_DEFAULTS, **settings)
        full["device"] = resolve_device(full.get("device"), model)
        llc = auto_epsilon(run, model, loader, loss_fn, full)
    else:
        llc = run(model, loader, loss_fn, epsilon=epsilon, **settings)
    if observer.s1 is None:
        raise RuntimeError("estimate_bif: the run made no draws")
    s1, s2, counts, by_draw = observer.result_arrays()
    if reference:
        traces = torch.stack([torch.stack(observer.traces[c]) for c in sorted(observer.traces)])
        influence = bif_from_traces(traces, statistic, pooling).numpy()
    else:
        influence = as_statistic(pooled_covariance(s1, s2, counts, by_draw, pooling), statistic)
    config = {"unit": unit, "statistic": statistic, "pooling": pooling, "observables": list(observables),
              "backend": "reference" if reference else "fast"}
    if keep_traces:
        config["traces"] = torch.stack([torch.stack(observer.traces[c]) for c in sorted(observer.traces)]).numpy()
    se = chain_bootstrap_se(s1, s2, counts, statistic, pooling, seed=sampling.get("seed", 0))
    return BIFResult(influence=influence, se=se, labels=observer.labels, statistic=statistic, pooling=pooling,
                     unit=unit, draws=int(counts.min()), llc=llc, config=config)


# estimate_llc's arguments the sequential estimator does not take
_FAST_ONLY = ("backend", "precision", "cuda_graphs", "chain_chunk", "split_chains", "chain_group", "compile",
              "fastpath")
# the defaults auto_epsilon reads from a full settings dict (estimate_llc's own)
_DEFAULTS = dict(num_chains=8, num_draws=200, num_burnin="auto", steps_between_draws=1, gamma=100.0, nbeta=None,
                 weight_decay=0.0, noise_scale=1.0, init_loss="auto", num_init_batches=None, restrict=None, seed=0,
                 device=None, progress=True, grad_accum_steps=1, mala=False, trust_checks="auto",
                 draw_batches="independent", sampler="sgld", sampler_kwargs=None, bounding_box=None,
                 activation_checkpointing=False)
