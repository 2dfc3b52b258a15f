"""Per-sample (or per-token) susceptibilities under weight restrictions.

For each restriction R (a set of parameters that move; the rest stay at
w*), sample the posterior restricted to R and, at every draw, take the mean
loss on the sampling task's observable set, ``pt``, and the per-sample
losses ``x`` on every other observable set. With ``phi = pt - L0`` (L0: the
unrestricted run's loss at w*) the susceptibility of sample i to R is

    chi_i(R) = E_R[phi * pt] - E_R[phi * x_i] - E_R[phi] * (E_full[pt] - E_full[x_i])

(devinterp 2.0.1's definition: how strongly the restricted posterior's
loss on the sampling task co-varies with sample i's loss, against the
unrestricted posterior's gap between the two). The expectations run over
all chains' draws. Only running sums are kept: for the unrestricted run the
sums of pt and x, for each restricted run those of phi, phi * pt and
phi * x.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .observed import Observer, check_observed, reduce_sum, sample_observed
from .result import LLCResult


@dataclass
class SusceptibilityResult:
    """``values[i, r]``: the susceptibility of observable sample (or token)
    ``labels[i]`` to restriction ``restrictions[r]``; ``llc``: each run's
    LLCResult, the unrestricted one under "full"."""
    values: np.ndarray
    labels: List[tuple]
    restrictions: List[str]
    unit: str
    llc: Dict[str, LLCResult]
    config: Dict = field(default_factory=dict)

    def to_frame(self):
        import pandas as pd
        names = ["observable", "sample"] + (["position"] if self.unit == "token" else [])
        frame = pd.DataFrame(self.labels, columns=names)
        for r, name in enumerate(self.restrictions):
            frame[name] = self.values[:, r]
        return frame

    def plot(self, path: Optional[str] = None, ax=None):
        """Each restriction's susceptibilities, sample by sample (bars)."""
        import matplotlib
        if ax is None and path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(self.labels)), 4))
        width = 0.8 / max(len(self.restrictions), 1)
        index = np.arange(len(self.labels))
        for r, name in enumerate(self.restrictions):
            ax.bar(index + r * width, self.values[:, r], width=width, label=name)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set(title=f"susceptibilities per {self.unit}", xlabel=f"observable {self.unit}", ylabel="chi")
        ax.legend(fontsize=8)
        if fig is not None and path is not None:
            fig.savefig(path, dpi=120, bbox_inches="tight")
            plt.close(fig)
        return ax


class _PhiSums:
    """The restricted run's sums of phi, phi * pt and phi * x over draws."""

    def __init__(self, task: slice, init_loss: float):
        self.task, self.init_loss = task, init_loss
        self.count, self.phi, self.phi_pt, self.phi_x = 0, 0.0, 0.0, None

    def __call__(self, x: torch.Tensor) -> None:  # x [chains, N]
        pt = x[:, self.task].mean(1)
        phi = pt - self.init_loss
        self.count += x.shape[0]
        self.phi += float(phi.sum())
        self.phi_pt += float((phi * pt).sum())
        term = (phi[:, None] * x).sum(0)
        self.phi_x = term if self.phi_x is None else self.phi_x + term

    def all_reduce(self) -> None:
        """The sums over every rank's chains, on every rank."""
        scalars = torch.tensor([self.count, self.phi, self.phi_pt], dtype=torch.float64)
        reduce_sum(scalars)
        reduce_sum(self.phi_x)
        self.count, self.phi, self.phi_pt = int(scalars[0]), float(scalars[1]), float(scalars[2])


def susceptibilities_from_traces(full: np.ndarray, restricted: np.ndarray, task: slice,
                                 init_loss: float) -> np.ndarray:
    """The twin: chi from stored traces [C, T, N] of the unrestricted and one
    restricted run, by the formula in the module docstring."""
    full_pt = full[..., task].mean(-1)
    pt = restricted[..., task].mean(-1)
    phi = pt - init_loss
    gap = full_pt.mean() - full.mean(axis=(0, 1))
    return (phi * pt).mean() - (phi[..., None] * restricted).mean(axis=(0, 1)) - phi.mean() * gap


def estimate_susceptibilities(model: torch.nn.Module, loader, observables: Dict[str, Sequence],
                              restrictions: Dict[str, object], *, sampling_task: str,
                              per_sample_loss_fn: Callable, loss_fn: Optional[Callable] = None, unit: str = "token",
                              include_sampling_task: bool = False, backend: str = "auto", keep_traces: bool = False,
                              **sampling) -> SusceptibilityResult:
    """Susceptibilities of every observable sample (or token) to each weight
    restriction (module docstring).

    restrictions: {name: None (every parameter), parameter-name globs, or
        {name: bool mask}}, as estimate_llc's ``restrict``; it must hold
        "full" (None), the unrestricted run the others are measured against.
    sampling_task: the observable set whose mean loss is phi's (the data the
        chains are driven by, as a set of batches of its own).
    per_sample_loss_fn, unit, backend: as in estimate_bif. Each restriction
        is one sampling run of estimate_llc (same defaults and arguments;
        ``restrict`` comes from ``restrictions``), all chains batched.
    """
    num_chains = check_observed(observables, per_sample_loss_fn, unit, backend, sampling,
                                "estimate_susceptibilities")
    if not isinstance(restrictions, dict) or restrictions.get("full", "missing") is not None:
        raise ValueError("restrictions must be a dict holding 'full': None (the unrestricted posterior), with one "
                         "entry per weight restriction to measure")
    if len(restrictions) < 2:
        raise ValueError("restrictions holds only 'full'; add the weight restrictions to measure")
    if sampling_task not in observables:
        raise ValueError(f"sampling_task {sampling_task!r} is not among the observables {list(observables)}")
    if not include_sampling_task and len(observables) == 1:
        raise ValueError("every observable is the sampling task; add another, or include_sampling_task=True")
    if "restrict" in sampling:
        raise ValueError("estimate_susceptibilities takes each run's restrict from restrictions; do not pass "
                         "restrict")
    names = list(observables)
    order = [sampling_task] + [n for n in names if n != sampling_task]
    ordered = {n: observables[n] for n in order}
    runs, llc, traces = {}, {}, {}
    full, task = None, slice(0, 0)
    for name, restrict in [("full", None)] + [(k, v) for k, v in restrictions.items() if k != "full"]:
        observer = Observer(model, ordered, per_sample_loss_fn, unit, num_chains, store=keep_traces, outer=False)
        if full is not None:
            observer.on_draw = _PhiSums(task, llc["full"].init_loss)
        llc[name] = sample_observed(model, loader, loss_fn, observer, backend, dict(sampling, restrict=restrict))
        if full is None:
            full = observer
            task = slice(0, sum(1 for label in observer.labels if label[0] == sampling_task))
        runs[name] = observer
        if keep_traces:
            traces[name] = observer.stacked_traces().numpy()
    s1, _, counts, _ = full.result_arrays()
    full_mean = s1.sum(0) / counts.sum()
    gap = full_mean[task].mean() - full_mean
    values, kept = [], [r for r in runs if r != "full"]
    for name in kept:
        sums = runs[name].on_draw
        values.append(sums.phi_pt / sums.count - (sums.phi_x / sums.count).cpu().numpy()
                      - sums.phi / sums.count * gap)
    values = np.stack(values, axis=1)
    labels = full.labels
    rows = slice(0, None) if include_sampling_task else slice(task.stop, None)
    config = {"unit": unit, "sampling_task": sampling_task, "observables": order,
              "restrictions": {k: v for k, v in restrictions.items()}, "init_loss": llc["full"].init_loss}
    if keep_traces:
        config["traces"] = traces
        config["task_columns"] = (task.start, task.stop)
    return SusceptibilityResult(values=values[rows], labels=labels[rows], restrictions=kept, unit=unit, llc=llc,
                                config=config)
