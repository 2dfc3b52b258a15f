"""LLCResult: what every estimate_llc backend returns."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np

from .diagnostics import TREND_T, ess, split_rhat, trend_t
from .trust import GRADIENT_SHARE

RHAT_OK = 1.05  # README, choosing hyperparameters
# The failed check the verdict names first: the one whose fix changes most of what the others see.
VERDICT_ORDER = ("interrupted", "divergence", "gradient", "step_size", "init_loss", "rhat", "trend", "sign")


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
    # [C, draws]: the running estimate nbeta * (mean of draws 0..k - init_loss)
    # per chain, to see whether it has settled; NaN from a chain's divergence on.
    llc_trace: Optional[np.ndarray] = None
    # [C, draws]: with init_loss="paired", the loss at w* on each draw's batch; None otherwise.
    init_trace: Optional[np.ndarray] = None

    @classmethod
    def from_traces(cls, loss_trace, init_loss: float, nbeta: float, *, config: Optional[dict] = None,
                    timings: Optional[dict] = None, diagnostics: Optional[dict] = None,
                    init_trace=None) -> "LLCResult":
        """llc_chain[c] = nbeta * (mean_t loss_trace[c, t] - init_loss), over
        chains whose whole trace is finite; the rest are reported diverged.
        With ``init_trace`` [C, draws] (paired), each draw subtracts its own
        loss at w*: nbeta * mean_t (loss_trace[c, t] - init_trace[c, t])."""
        trace = np.asarray(loss_trace, dtype=np.float64)
        if trace.ndim != 2 or trace.shape[1] == 0:
            raise ValueError(f"loss_trace must be [chains, draws] with draws >= 1, got shape {trace.shape}")
        if init_trace is not None:
            init_trace = np.asarray(init_trace, dtype=np.float64)
            if init_trace.shape != trace.shape:
                raise ValueError(f"init_trace must have loss_trace's shape {trace.shape}, got {init_trace.shape}")
        excess = trace - (init_trace if init_trace is not None else init_loss)  # [C, draws]
        ok = np.isfinite(excess).all(axis=1)
        per_chain = np.full(trace.shape[0], np.nan)
        per_chain[ok] = nbeta * excess[ok].mean(axis=1)
        good = per_chain[ok]
        mean = float(good.mean()) if good.size else math.nan
        std = float(good.std(ddof=1)) if good.size > 1 else (0.0 if good.size == 1 else math.nan)
        diag = dict(diagnostics or {})
        diag["diverged_chains"] = [int(c) for c in np.flatnonzero(~ok)]
        if ok.sum() >= 1:
            diag["trend_t"] = trend_t(trace[ok])
            if trace.shape[1] >= 4:
                diag["rhat"] = split_rhat(trace[ok])
                diag["ess"] = ess(trace[ok])
        running = nbeta * np.cumsum(excess, axis=1) / np.arange(1, trace.shape[1] + 1)
        return cls(mean, std, per_chain, trace, float(init_loss), diag, dict(config or {}), dict(timings or {}),
                   running, init_trace)

    def wbic(self, num_samples: int) -> tuple:
        """(WBIC, its standard error across chains): n times the mean draw
        loss, meaningful when the chains sampled at nbeta = n / log n (as
        llcfast.estimate_wbic runs them). Since nbeta * (E[L] - L(w*)) is the
        LLC, WBIC = n L(w*) + LLC * log n exactly at that nbeta."""
        n = int(num_samples)
        if n < 2:
            raise ValueError(f"num_samples must be >= 2 (WBIC uses log n), got {num_samples}")
        nbeta = self.config.get("nbeta")
        if nbeta is not None and not math.isclose(nbeta, n / math.log(n), rel_tol=1e-6):
            raise ValueError(f"these chains sampled at nbeta={nbeta:.6g}, but WBIC for n={n} needs nbeta = n / log n "
                             f"= {n / math.log(n):.6g}; run llcfast.estimate_wbic(..., num_samples={n})")
        ok = np.isfinite(self.loss_trace).all(axis=1)
        per_chain = n * self.loss_trace[ok].mean(axis=1)
        se = float(per_chain.std(ddof=1) / math.sqrt(len(per_chain))) if len(per_chain) > 1 else math.nan
        return float(per_chain.mean()), se

    @property
    def llc_se(self) -> float:
        """Standard error of llc_mean over the chains that did not diverge."""
        n = int(np.isfinite(self.llc_per_chain).sum())
        return self.llc_std / math.sqrt(n) if n > 1 else math.nan

    def checks(self) -> list:
        """What to look at before trusting the estimate: (name, passed,
        message) for each check the result's diagnostics allow. passed is
        None where the check only reports a number."""
        d, out = self.diagnostics, []
        stop = self.config.get("interrupted")
        if stop:
            out.append(("interrupted", False, f"interrupted after {stop['steps_done']} of {stop['steps']} steps: "
                        f"{stop['chains']} chains x {stop['draws']} draws ({stop['kept']})"))
        bad = d.get("diverged_chains") or []
        out.append(("divergence", not bad, f"chains {bad} diverged and were left out: lower epsilon or raise gamma"
                    if bad else "no chain diverged"))
        rhat = d.get("rhat")
        if rhat is not None and math.isfinite(rhat):
            out.append(("rhat", rhat <= RHAT_OK, f"split R-hat {rhat:.3f}" + (
                "" if rhat <= RHAT_OK else f" > {RHAT_OK}: the chains disagree; burn in and draw for longer")))
        t = d.get("trend_t")
        if t is not None and math.isfinite(t):
            flat = abs(t) <= TREND_T
            out.append(("trend", flat, f"loss trend t = {t:+.1f}" + (
                " (flat)" if flat else f", |t| > {TREND_T:g}: the loss is still "
                f"{'rising' if t > 0 else 'falling'}; burn in longer" + ("" if t > 0 else " or raise gamma"))))
        if d.get("ess") is not None and math.isfinite(d["ess"]):
            out.append(("ess", None, f"bulk ESS {d['ess']:.0f} of {self.loss_trace.size} draws"))
        from_l0, se = d.get("llc_se_from_init_loss"), self.llc_se
        method = d.get("init_loss_method")
        if method == "exact":
            out.append(("init_loss", True, f"loss at w* exact (all {self.config.get('num_init_batches')} batches)"))
        elif method == "paired":
            out.append(("init_loss", True, "loss at w* paired with each draw's batch (its error is in the "
                                           "standard error)"))
        elif from_l0 is not None and math.isfinite(from_l0) and math.isfinite(se):
            small = from_l0 <= se
            out.append(("init_loss", small, f"init loss error ± {from_l0:.3g} in LLC" + (
                "" if small else f" exceeds the chains' standard error {se:.3g}: use init_loss='auto' (exact or "
                "paired), or raise num_init_batches"
                + (f" (it used {self.config['num_init_batches']})" if self.config.get("num_init_batches") else ""))))
        if d.get("mala_acceptance") is not None and math.isfinite(d["mala_acceptance"]):
            out.append(("mala", None, f"MALA acceptance {d['mala_acceptance']:.3f}"))
        out.extend(self._trust_checks())
        if math.isfinite(self.llc_mean) and self.llc_mean < 0:
            out.append(("sign", False, "negative LLC: w* is not a local minimum of the sampled loss, "
                                       "or the chains have not equilibrated"))
        return out

    def _trust_checks(self) -> list:
        """The step-size rule where the chains went, and the slope at w*
        (llcfast.estimate.trust), where they were measured."""
        d, out = self.diagnostics, []
        step = d.get("step_check")
        if step and "skipped" in step:
            out.append(("step_size", None, f"step size not checked at the chains' end points ({step['skipped']})"))
        elif step:
            ok = step["step_rule"] <= step["step_rule_limit"]
            lam = float(np.max(step["lambda_max_at_chains"]))
            out.append(("step_size", ok, f"step-size rule epsilon (nbeta lambda_max + gamma) / 2 = "
                        f"{step['step_rule']:.3g} at the chains' end points (lambda_max {lam:.3g})" + (
                            f" <= {step['step_rule_limit']:g}" if ok else
                            f" > {step['step_rule_limit']:g}: lower epsilon to {step['safe_epsilon']:.2g} or below "
                            "(or epsilon='auto')")))
        eps, gamma, burn = (self.config.get(k) for k in ("epsilon", "gamma", "num_burnin"))
        if all(isinstance(v, (int, float)) for v in (eps, gamma, burn)) and gamma > 0:
            tau = 2 / (eps * gamma)
            out.append(("burn_in", None, f"burn-in {burn} steps, {burn / tau:.2g} x the slow modes' relaxation "
                                         f"time 2 / (epsilon gamma) = {tau:.0f} steps" + (
                                             "" if burn >= tau else "; num_burnin='auto' waits that long")))
        bound = d.get("slope_shift_bound")
        if bound is not None and math.isfinite(self.llc_mean):
            allowed = max(GRADIENT_SHARE * abs(self.llc_mean), 2 * self.llc_se if math.isfinite(self.llc_se) else 0.0)
            g = math.sqrt(d["grad_norm_sq_at_w_star"])
            if bound <= allowed:
                out.append(("gradient", True, f"slope at w*: |grad L| {g:.2g} moves the estimate by at most "
                                              f"{bound:.2g}"))
            else:
                out.append(("gradient", False, f"w* is not a minimum: its slope |grad L| {g:.2g} can pull the "
                                               f"estimate down by up to {bound:.3g} (nbeta^2 |grad L|^2 / gamma); "
                                               "measure at a trained checkpoint, or raise gamma"))
        return out

    def verdict(self) -> str:
        """One line: trustworthy, or the one thing to change first."""
        failed = {name: message for name, passed, message in self.checks() if passed is False}
        for name in VERDICT_ORDER:
            if name in failed:
                return f"verdict: not yet trustworthy; fix the {name} CHECK above first"
        return "verdict: trustworthy (every check passed)"

    def summary(self) -> str:
        """The estimate and its checks, one per line ("ok", "CHECK" or "-")."""
        n = int(np.isfinite(self.llc_per_chain).sum())
        lines = [f"LLC {self.llc_mean:.4g} ± {self.llc_se:.2g} (standard error, {n} of {len(self.llc_per_chain)} "
                 f"chains x {self.loss_trace.shape[1]} draws; nbeta {self.config.get('nbeta', float('nan')):.4g})"]
        for _, passed, message in self.checks():
            lines.append(f"  {'-    ' if passed is None else 'ok   ' if passed else 'CHECK'} {message}")
        lines.append(self.verdict())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

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
            "config": self.config, "timings": self.timings, "llc_trace": self.llc_trace,
            "init_trace": self.init_trace,
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
        running_ax = None
        if ax is None:
            fig, (ax, running_ax) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
        for c, row in enumerate(self.loss_trace):
            ax.plot(row, lw=0.8, alpha=0.85, label=f"chain {c}")
        ax.axhline(self.init_loss, color="k", ls="--", lw=1, label="loss at w*")
        l0_se = self.diagnostics.get("init_loss_se")
        if l0_se is not None and math.isfinite(l0_se):  # the init loss's own sampling error
            ax.axhspan(self.init_loss - l0_se, self.init_loss + l0_se, color="k", alpha=0.12, lw=0)
        rhat = self.diagnostics.get("rhat")
        title = f"LLC = {self.llc_mean:.3g} ± {self.llc_se:.2g} (standard error; chains' spread {self.llc_std:.2g})"
        from_l0 = self.diagnostics.get("llc_se_from_init_loss")
        if from_l0 is not None and math.isfinite(from_l0):
            title += f" (init loss ± {from_l0:.2g})"
        if rhat is not None:
            title += f"   (R-hat {rhat:.3f}, ESS {self.diagnostics.get('ess', float('nan')):.0f})"
        if self.diagnostics.get("mala_acceptance") is not None:
            title += f"   MALA acceptance {self.diagnostics['mala_acceptance']:.2f}"
        if self.diagnostics.get("diverged_chains"):
            title += f"   diverged: {self.diagnostics['diverged_chains']}"
        ax.set(title=title, xlabel="draw", ylabel="minibatch loss")
        if len(self.loss_trace) <= 10:
            ax.legend(fontsize=7, ncol=2)
        if running_ax is not None and self.llc_trace is not None:
            for c, row in enumerate(self.llc_trace):
                running_ax.plot(row, lw=0.8, alpha=0.85)
            running_ax.axhline(self.llc_mean, color="k", ls="--", lw=1)
            running_ax.set(title="running LLC per chain (should level off)", xlabel="draw", ylabel="LLC so far")
        fig = fig or ax.figure
        if path is not None:
            fig.savefig(path, dpi=120, bbox_inches="tight")
        return fig
