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

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .observed import Observer, check_observed, sample_observed
from .result import LLCResult

STATISTICS = ("correlation", "covariance")


CHAIN_POOLING = ("stack", "centred", "mean")


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
    """The statistic from covariances [..., N, N]."""
    if statistic == "covariance":
        return cov
    scale = np.sqrt(np.clip(np.diagonal(cov, axis1=-2, axis2=-1), 0.0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        return cov / (scale[..., :, None] * scale[..., None, :])


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


def chain_bootstrap_se(s1, s2, counts, statistic: str, pooling: str, seed: int,
                       per_pass: int = 16) -> Optional[np.ndarray]:
    """The standard error of the statistic over resamples of whole chains;
    None where chains cannot be resampled on their own (pooling "mean", one
    chain). A resample's running sums are its chains' sums weighted by how
    often each was drawn, so ``per_pass`` resamples are one matrix product,
    and their spread is merged pass by pass, never holding every resample's
    N x N statistic at once."""
    if pooling == "mean" or len(counts) < 2:
        return None
    gen = np.random.default_rng(seed)
    c, n = s1.shape
    weights = np.stack([np.bincount(gen.integers(0, c, c), minlength=c)
                        for _ in range(BOOTSTRAP_SAMPLES)]).astype(np.float64)
    second = s2 if pooling == "stack" else s2 - np.einsum("ci,cj,c->cij", s1, s1, 1.0 / counts)
    second = second.reshape(c, n * n)
    seen, mean, m2 = 0, 0.0, 0.0
    for start in range(0, BOOTSTRAP_SAMPLES, per_pass):
        w = weights[start:start + per_pass]
        summed = (w @ second).reshape(-1, n, n)
        if pooling == "stack":
            draws, total = w @ counts, w @ s1
            cov = (summed - total[:, :, None] * total[:, None, :] / draws[:, None, None]) / (draws - 1)[:, None, None]
        else:
            cov = summed / (w @ (counts - 1))[:, None, None]
        stat = as_statistic(cov, statistic)
        # Chan et al.'s merge of two groups' means and sums of squared deviations
        k, group_mean = len(stat), stat.mean(0)
        delta = group_mean - mean
        m2 = m2 + ((stat - group_mean) ** 2).sum(0) + delta ** 2 * seen * k / (seen + k)
        mean = mean + delta * k / (seen + k)
        seen += k
    return np.sqrt(m2 / (seen - 1))


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
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if pooling not in CHAIN_POOLING:
        raise ValueError(f"pooling must be one of {CHAIN_POOLING}, got {pooling!r}")
    num_chains = check_observed(observables, per_sample_loss_fn, unit, backend, sampling, "estimate_bif")
    reference = backend == "reference"
    observer = Observer(model, dict(observables), per_sample_loss_fn, unit, num_chains,
                         store=keep_traces or reference)
    llc = sample_observed(model, loader, loss_fn, observer, backend, sampling)
    s1, s2, counts, by_draw = observer.result_arrays()
    if reference:
        influence = bif_from_traces(observer.stacked_traces(), statistic, pooling).numpy()
    else:
        influence = as_statistic(pooled_covariance(s1, s2, counts, by_draw, pooling), statistic)
    config = {"unit": unit, "statistic": statistic, "pooling": pooling, "observables": list(observables),
              "backend": "reference" if reference else "fast"}
    if keep_traces:
        config["traces"] = observer.stacked_traces().numpy()
    se = chain_bootstrap_se(s1, s2, counts, statistic, pooling, seed=sampling.get("seed", 0))
    return BIFResult(influence=influence, se=se, labels=observer.labels, statistic=statistic, pooling=pooling,
                     unit=unit, draws=int(counts.min()), llc=llc, config=config)
