"""The report of a sweep, in the style of the paper's Figure 1: test loss on
top, the LLC with its error band and the stage fit, Hessian statistics and
behavioural metrics when measured, and the stages as coloured bands; with
summary.json and results.csv beside the PNG and SVG."""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..estimate.diagnostics import TREND_T
from ..estimate.result import RHAT_OK
from .behaviour import change_lines, series, stage_changes
from .checkpoints import atomic_json
from .curvature import boundary_matches, curvature_fits, match_table
from .safety import save_figure, save_text
from .stages import StageFit, detect_stages

STAGE_COLORS = {"A": "#4c72b0", "B": "#dd8452"}


def record_se(record: dict) -> float:
    """A sweep record's standard error of the LLC across its chains; NaN
    with fewer than two chains or no spread recorded."""
    chains = len(record.get("llc_per_chain") or [])
    if record.get("llc_std") is None or chains < 2:
        return math.nan
    return record["llc_std"] / math.sqrt(chains)


def stage_fit(records: Sequence[dict], **kwargs) -> StageFit:
    steps = [r["step"] for r in records]
    llc = [np.nan if r.get("llc_mean") is None else r["llc_mean"] for r in records]
    err = [np.nan if r.get("llc_std") is None else r["llc_std"] / math.sqrt(max(len(r.get("llc_per_chain") or [1]), 1))
           for r in records]
    return detect_stages(steps, llc, err, **kwargs)


def llc_se(record: dict) -> Optional[float]:
    """The standard error of a record's LLC: the spread over its chains that did not diverge, / sqrt(count)."""
    finite = [v for v in record.get("llc_per_chain") or [] if v is not None and math.isfinite(v)]
    if record.get("llc_std") is None or len(finite) < 2:
        return None
    return record["llc_std"] / math.sqrt(len(finite))


def _frame(records: Sequence[dict]):
    import pandas as pd

    # llc_se is derived below; naming it here keeps its column beside llc_mean
    cols = ["step", "llc_mean", "llc_se", "llc_std", "test_loss", "init_loss", "rhat", "ess", "trend_t",
            "hessian_trace", "hessian_trace_se", "hessian_top_eig", "barrier_prev", "barrier_final", "seconds",
            "checkpoint"]
    rows = [{c: r.get(c) for c in cols} | {"llc_se": llc_se(r), "diverged_chains": len(r.get("diverged_chains") or []),
                                            "failed_checks": ", ".join(r.get("failed_checks") or []),
                                            "warnings": " | ".join(r.get("warnings") or [])}
            | (r.get("behaviour") or {}) for r in records]
    return pd.DataFrame(rows).sort_values("step").reset_index(drop=True)


def plot_report(records: Sequence[dict], fit: StageFit, path: Optional[str] = None, title: str = "",
                curvature: Optional[Dict[str, StageFit]] = None):
    """``curvature``: the stage fits of the Hessian statistics
    (curvature.curvature_fits), whose boundaries are drawn on their panel."""
    import matplotlib
    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    records = sorted(records, key=lambda r: r["step"])
    steps = np.array([r["step"] for r in records], dtype=float)
    has_hessian = any(r.get("hessian_trace") is not None for r in records)
    has_landscape = any(r.get("barrier_final") is not None for r in records)
    behaviour = series(records)
    heights = [2, 3] + ([2] if has_hessian else []) + ([1.5] if has_landscape else []) + [1.3] * len(behaviour) + [0.6]
    fig, axes = plt.subplots(len(heights), 1, figsize=(8, 2.0 * sum(heights) / 1.6), sharex=True,
                             gridspec_kw={"height_ratios": heights, "hspace": 0.08})
    ax_loss, ax_llc, ax_stage = axes[0], axes[1], axes[-1]

    def col(key):
        return np.array([np.nan if r.get(key) is None else r[key] for r in records], dtype=float)

    ax_loss.plot(steps, col("test_loss"), "o-", ms=3, color="k", lw=1)
    ax_loss.set_ylabel("test loss")
    llc, sd = col("llc_mean"), col("llc_std")
    ax_llc.fill_between(fit.grid_steps, fit.mean - 2 * fit.std, fit.mean + 2 * fit.std, color="C2", alpha=0.25,
                        lw=0, label="stage fit ± 2 sd")
    ax_llc.plot(fit.grid_steps, fit.mean, color="C2", lw=1.2)
    ax_llc.errorbar(steps, llc, yerr=sd, fmt="o", ms=3, color="C0", ecolor="C0", elinewidth=0.8, capsize=0,
                    label="LLC (± sd across chains)")
    flagged = np.array([bool(_own_checks(r)) for r in records])
    if flagged.any():
        ax_llc.plot(steps[flagged], llc[flagged], "o", ms=8, mfc="none", mec="C3", mew=1.2,
                    label="fails a check (failed_checks in results.csv)")
    ax_llc.set_ylabel(r"LLC $\hat\lambda$")
    ax_llc.legend(fontsize=7, loc="upper left")
    if has_hessian:
        ax_h = axes[2]
        ax_h.plot(steps, col("hessian_trace"), "s-", ms=3, lw=1, color="C3", label="Hessian trace")
        ax_h.set_ylabel("trace", color="C3")
        twin = ax_h.twinx()
        twin.plot(steps, col("hessian_top_eig"), "^-", ms=3, lw=1, color="C4", label="top eigenvalue")
        twin.set_ylabel("top eigenvalue", color="C4")
        for key, ax, color, style in (("hessian_trace", ax_h, "C3", "--"), ("hessian_top_eig", twin, "C4", "-.")):
            own = (curvature or {}).get(key)
            for b in own.boundaries if own is not None else []:
                ax.axvline(b, color=color, lw=1.0, ls=style, alpha=0.8)
        if curvature:
            ax_h.text(0.01, 0.95, "dashed: boundaries of the trace's and the top eigenvalue's own stage fits",
                      transform=ax_h.transAxes, fontsize=6, va="top", color="0.3")
    if has_landscape:
        ax_b = axes[2 + int(has_hessian)]
        ax_b.plot(steps, col("barrier_prev"), "o-", ms=3, lw=1, color="C8", label="to the previous checkpoint")
        ax_b.plot(steps, col("barrier_final"), "s--", ms=3, lw=1, color="C9", label="to the final checkpoint")
        ax_b.set_ylabel("loss barrier", fontsize=7)
        ax_b.legend(fontsize=6, loc="best")
    for ax, (panel, lines) in zip(axes[2 + int(has_hessian) + int(has_landscape):-1], behaviour.items()):
        for i, (line, values) in enumerate(lines.items()):
            ax.plot(steps, values, ".-", ms=3, lw=1, color=f"C{(i + 5) % 10}", label=line if len(lines) > 1 else None)
        ax.set_ylabel(panel, fontsize=7)
        if len(lines) > 1:
            ax.legend(fontsize=6, loc="best", ncol=min(len(lines), 3))
    for s in fit.stages:
        for ax in axes[:-1]:
            ax.axvspan(max(s.start, 0), s.end, color=STAGE_COLORS[s.kind], alpha=0.08, lw=0)
    for b in fit.boundaries:
        for ax in axes[:-1]:
            ax.axvline(b, color="0.4", lw=0.7, ls=":")
    stage_strip(ax_stage, fit, "stage")
    ax_stage.set_xscale("symlog", linthresh=1)
    ax_stage.set_xlim(max(steps.min(), 0), steps.max())
    ax_stage.set_xlabel("training step")
    if title:
        axes[0].set_title(title)
    fig.align_ylabels(axes)
    if path is not None:
        fig.savefig(path, dpi=130, bbox_inches="tight")
    return fig


def stage_strip(ax, fit: StageFit, label: str) -> None:
    """The stages as coloured bands labelled with their LLC change."""
    for s in fit.stages:
        ax.axvspan(max(s.start, 0), s.end, color=STAGE_COLORS[s.kind], alpha=0.7, lw=0)
        mid = math.exp((math.log(s.start + 1) + math.log(s.end + 1)) / 2) - 1
        ax.text(mid, 0.5, f"{s.kind}{s.number}\n{s.delta:+.0f}", ha="center", va="center", fontsize=7,
                color="white")
    for b in fit.boundaries:
        ax.axvline(b, color="white", lw=2)
    ax.set_yticks([])
    ax.set_ylabel(label, rotation=0, ha="right", va="center")


def write_report(records: Sequence[dict], out_dir: str, *, title: str = "", extra: Optional[dict] = None,
                 **stage_kwargs) -> dict:
    """report.png, report.svg, summary.json and results.csv in ``out_dir``;
    returns their paths (and the stage fit under "fit")."""
    records = sorted((r for r in records if "error" not in r), key=lambda r: r["step"])
    if not records:
        raise ValueError("no finished checkpoints to report; run the sweep first")
    os.makedirs(out_dir, exist_ok=True)
    fit = stage_fit(records, **stage_kwargs)
    curvature = curvature_fits(records, **stage_kwargs)
    paths = {k: os.path.join(out_dir, v) for k, v in
             (("png", "report.png"), ("svg", "report.svg"), ("summary", "summary.json"), ("csv", "results.csv"))}
    fig = plot_report(records, fit, title=title, curvature=curvature)
    save_figure(fig, paths["png"], dpi=130, bbox_inches="tight")
    save_figure(fig, paths["svg"], bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    save_text(paths["csv"], _frame(records).to_csv(index=False))
    llc = [r["llc_mean"] for r in records if r.get("llc_mean") is not None]
    summary = {"checkpoints": len(records), "steps": [records[0]["step"], records[-1]["step"]],
               "llc_range": [min(llc), max(llc)] if llc else None, **fit.to_dict(),
               "warnings": sum(1 for r in records if r.get("warnings")),
               "failed_checks": [{"step": r["step"], "checks": r["failed_checks"]} for r in records
                                 if r.get("failed_checks")], **(extra or {})}
    if any(r.get("behaviour") for r in records):
        paths["behaviour"] = summary["behaviour_by_stage"] = stage_changes(fit.stages, records)
    if curvature:
        summary["curvature"] = {k: {"boundaries": f.boundaries, "flat": f.flat} for k, f in curvature.items()}
        summary["llc_boundaries_vs_curvature"] = boundary_matches(fit, curvature)
    atomic_json(summary, paths["summary"])
    paths["fit"], paths["curvature"] = fit, curvature
    return paths


def stage_table(fit: StageFit, curvature: Optional[Dict[str, StageFit]] = None,
                behaviour: Optional[List[dict]] = None) -> List[str]:
    """The stages, then (with ``behaviour``, write_report's stage_changes
    rows) what the behavioural metrics did in each, then (with
    ``curvature``) each LLC boundary beside the nearest boundaries of the
    Hessian statistics' own fits."""
    lines = [f"{'stage':>6} {'type':>4} {'start':>10} {'end':>10} {'LLC change':>11}"]
    for s in fit.stages:
        lines.append(f"{s.number:>6} {s.kind:>4} {s.start:>10.0f} {s.end:>10.0f} {s.delta:>+11.1f}")
    if behaviour:
        lines += [""] + change_lines(behaviour)
    if curvature and fit.boundaries:
        lines += [""] + match_table(boundary_matches(fit, curvature), curvature)
    return lines


CHECK_MEANINGS = {"divergence": "chains diverged", "rhat": f"split R-hat above {RHAT_OK}",
                  "trend": f"the loss was still drifting (|t| > {TREND_T:g})", "sign": "negative LLC",
                  "gradient": "w* is not a minimum: its slope can move the estimate by over half of it",
                  "step_size": "the step-size rule failed where the chains went (lower epsilon)"}


def _own_checks(record: dict) -> List[str]:
    # The init loss's error is a matter of the sweep's settings (its batches
    # are the same at every checkpoint), so it is reported once, not circled.
    return [c for c in record.get("failed_checks") or [] if c != "init_loss"]


def check_lines(records: Sequence[dict], most: int = 8) -> List[str]:
    """For the terminal: the checkpoints whose estimate failed one of
    LLCResult.checks() (the first ``most`` by step) and what each check
    means; then, where the init loss's error exceeds the chains' standard
    error, that once with its range, since the sweep's settings set it."""
    bad = sorted((r for r in records if _own_checks(r)), key=lambda r: r["step"])
    lines = []
    if bad:
        lines.append(f"{len(bad)} of {len(records)} checkpoints fail a check of their estimate (circled in red on "
                     "the report; llcfast estimate RUN --step N shows one):")
        lines += [f"  step {r['step']}: {', '.join(_own_checks(r))}" for r in bad[:most]]
        if len(bad) > most:
            lines.append(f"  ... and {len(bad) - most} more (failed_checks in results.csv)")
        seen = sorted({c for r in bad for c in _own_checks(r)})
        lines.append("  " + "; ".join(f"{c}: {CHECK_MEANINGS.get(c, c)}" for c in seen))
    shared = [r for r in records if "init_loss" in (r.get("failed_checks") or [])]
    if shared:
        from_l0 = [r["llc_se_from_init_loss"] for r in shared if r.get("llc_se_from_init_loss") is not None]
        chains = [se for se in map(record_se, shared) if math.isfinite(se)]
        spans = (f" (± {min(from_l0):.2g} to {max(from_l0):.2g} in LLC, against ± {min(chains):.2g} to "
                 f"{max(chains):.2g})") if from_l0 and chains else ""
        lines.append(f"At {len(shared)} of {len(records)} checkpoints the init loss's error exceeds the chains' "
                     f"standard error{spans}, so the error bars understate the error; more init batches "
                     "(--init-batches, sweep.num_init_batches) shrink it, and all of them (all) make it 0.")
    return lines
