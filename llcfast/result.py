"""LLCResult: what every estimate_llc backend returns."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np

from .diagnostics import ess, split_rhat


@dataclass
class LLCResult:
    llc_mean: float
    llc_std: float  # across the chains that did not diverge (ddof=1; 0 for one chain)
    llc_per_chain: np.ndarray  # [C]; NaN for a diverged chain
    loss_trace: np.ndarray  # [C, draws]; NaN after a chain diverged
    init_loss: float
    diagnostics: Dict[str, Any] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_traces(cls, loss_trace, init_loss: float, nbeta: float, *, config: Optional[dict] = None,
                    timings: Optional[dict] = None, diagnostics: Optional[dict] = None) -> "LLCResult":
        """llc_chain[c] = nbeta * (mean_t loss_trace[c, t] - init_loss), over
        chains whose whole trace is finite; the rest are reported diverged."""
        trace = np.asarray(loss_trace, dtype=np.float64)
        if trace.ndim != 2 or trace.shape[1] == 0:
            raise ValueError(f"loss_trace must be [chains, draws] with draws >= 1, got shape {trace.shape}")
        ok = np.isfinite(trace).all(axis=1)
        per_chain = np.full(trace.shape[0], np.nan)
        per_chain[ok] = nbeta * (trace[ok].mean(axis=1) - init_loss)
        good = per_chain[ok]
        mean = float(good.mean()) if good.size else math.nan
        std = float(good.std(ddof=1)) if good.size > 1 else (0.0 if good.size == 1 else math.nan)
        diag = dict(diagnostics or {})
        diag["diverged_chains"] = [int(c) for c in np.flatnonzero(~ok)]
        if ok.sum() >= 1 and trace.shape[1] >= 4:
            diag["rhat"] = split_rhat(trace[ok])
            diag["ess"] = ess(trace[ok])
        return cls(mean, std, per_chain, trace, float(init_loss), diag, dict(config or {}), dict(timings or {}))

    def to_dict(self) -> dict:
        """JSON-ready: arrays become lists, NaN becomes None."""
        def clean(v):
            if isinstance(v, np.ndarray):
                return clean(v.tolist())
            if isinstance(v, (list, tuple)):
                return [clean(u) for u in v]
            if isinstance(v, dict):
                return {k: clean(u) for k, u in v.items()}
            if isinstance(v, (float, np.floating)):
                return None if not math.isfinite(v) else float(v)
            if isinstance(v, np.integer):
                return int(v)
            return v
        return clean({
            "llc_mean": self.llc_mean, "llc_std": self.llc_std, "llc_per_chain": self.llc_per_chain,
            "loss_trace": self.loss_trace, "init_loss": self.init_loss, "diagnostics": self.diagnostics,
            "config": self.config, "timings": self.timings,
        })

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def to_frame(self):
        """The loss traces as a long pandas DataFrame: chain, draw, loss, and
        the chain's LLC on every row."""
        import pandas as pd
        chains, draws = self.loss_trace.shape
        return pd.DataFrame({
            "chain": np.repeat(np.arange(chains), draws),
            "draw": np.tile(np.arange(draws), chains),
            "loss": self.loss_trace.reshape(-1),
            "llc_chain": np.repeat(self.llc_per_chain, draws),
        })

    def plot(self, path: Optional[str] = None, ax=None):
        """Per-chain loss traces against the loss at w*: the first figure to
        check (traces should settle to a flat band above the dashed line)."""
        import matplotlib
        if ax is None and path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(7, 4))
        for c, row in enumerate(self.loss_trace):
            ax.plot(row, lw=0.8, alpha=0.85, label=f"chain {c}")
        ax.axhline(self.init_loss, color="k", ls="--", lw=1, label="loss at w*")
        rhat = self.diagnostics.get("rhat")
        title = f"LLC = {self.llc_mean:.3g} ± {self.llc_std:.2g}"
        if rhat is not None:
            title += f"   (R-hat {rhat:.3f}, ESS {self.diagnostics.get('ess', float('nan')):.0f})"
        if self.diagnostics.get("diverged_chains"):
            title += f"   diverged: {self.diagnostics['diverged_chains']}"
        ax.set(title=title, xlabel="draw", ylabel="minibatch loss")
        if len(self.loss_trace) <= 10:
            ax.legend(fontsize=7, ncol=2)
        fig = fig or ax.figure
        if path is not None:
            fig.savefig(path, dpi=120, bbox_inches="tight")
        return fig
