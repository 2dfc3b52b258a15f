"""Several runs side by side. The paper reads its LLC curves over five seeds,
and a stage boundary is worth naming only where the seeds agree on it, so
compare_runs puts each run's test loss, LLC (± its standard error) and stage
fit on shared axes, with each run's stages in a strip of its own. Beside the
figure, compare.json holds each run's stages, each boundary of the first run
with every other run's nearest, and, at the steps all runs measured, the
LLC's spread across runs against the chains' standard error within them;
compare.csv holds the points."""
from __future__ import annotations

import math
import os
import warnings
from typing import List, Optional, Sequence, Union

import numpy as np

from .checkpoints import atomic_json
from .curvature import boundary_matches
from .report import record_se, stage_fit, stage_strip
from .safety import save_figure, save_text
from .sweep import RESULTS, latest_sweep


def _labels(run_dirs: Sequence[str], keys: Sequence[str], labels: Optional[Sequence[str]]) -> List[str]:
    if labels is None:
        names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
        paths = [os.path.relpath(d) for d in run_dirs]
        real = {n: {os.path.realpath(d) for d, m in zip(run_dirs, names) if m == n} for n in names}
        one_run = all(len(r) == 1 for r in real.values())  # a name repeats only for one run's sweeps
        # The shortest that tells them apart: the folder's name; with the key,
        # for one run's sweeps under two settings; its path, for runs/a/seed0
        # and runs/b/seed0; its path with the key.
        candidates = [names] + ([[f"{n}:{k}" for n, k in zip(names, keys)]] if one_run else []) + [
            paths, [f"{p}:{k}" for p, k in zip(paths, keys)]]
        labels = next(c for c in candidates if len(set(c)) == len(c))
    labels = list(labels)
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels {labels} for {len(run_dirs)} runs; give one label per run")
    if len(set(labels)) < len(labels):
        raise ValueError(f"the labels {labels} repeat; each run needs its own")
    return labels


def _value(record: dict, key: str) -> float:
    return math.nan if record.get(key) is None else float(record[key])


# Settings that change neither the LLC nor the test loss: runs that differ
# only in these compare like for like.
_NOT_COMPARED = ("hessian", "hessian_probes", "hessian_batch", "behaviour")


def settings_differences(runs: Sequence[List[dict]], labels: Sequence[str]) -> Optional[dict]:
    """{setting: {label: value}} for each sweep setting (the records'
    sweep_settings) on which the runs differ; None where a run's records
    predate sweep_settings and only their keys can be compared."""
    found = [records[-1].get("sweep_settings") for records in runs]
    if any(s is None for s in found):
        return None
    names = sorted(set().union(*found) - set(_NOT_COMPARED))
    return {n: {lab: s.get(n) for lab, s in zip(labels, found)} for n in names
            if len({repr(s.get(n)) for s in found}) > 1}


def across_runs(runs: Sequence[List[dict]]) -> List[dict]:
    """At each step every run measured: the LLC's mean and standard
    deviation across runs, and the root mean square of the runs' own
    standard errors (what each run's error bars show)."""
    by_step = [{r["step"]: r for r in records} for records in runs]
    shared = sorted(set.intersection(*(set(d) for d in by_step)))
    rows = []
    for step in shared:
        llc = np.array([_value(d[step], "llc_mean") for d in by_step])
        se = np.array([record_se(d[step]) for d in by_step])
        rows.append({"step": step, "llc_mean": float(np.mean(llc)), "llc_sd_across_runs": float(np.std(llc, ddof=1)),
                     "llc_se_within_runs": float(np.sqrt(np.mean(se ** 2)))})
    return rows


def compare_runs(run_dirs: Sequence[str], out_dir: str, *, labels: Optional[Sequence[str]] = None,
                 settings: Union[str, Sequence[Optional[str]], None] = None, title: str = "",
                 **stage_kwargs) -> dict:
    """compare.png/.svg, compare.json and compare.csv in ``out_dir`` for
    the latest sweep of each run. ``settings``: one key, the sweep with that
    key in every run; or one key (or None: the latest) per run, so that one
    run's sweeps under different settings can be compared. Returns the
    paths and the summary."""
    run_dirs = list(run_dirs)
    if len(run_dirs) < 2:
        raise ValueError(f"comparing needs two runs or more, got {len(run_dirs)}: {run_dirs}")
    wanted = [settings] * len(run_dirs) if settings is None or isinstance(settings, str) else list(settings)
    if len(wanted) != len(run_dirs):
        raise ValueError(f"{len(wanted)} settings keys {wanted} for {len(run_dirs)} runs; give one key for all "
                         "runs or one per run")
    runs, keys = [], []
    for d, want in zip(run_dirs, wanted):
        records, key, _ = latest_sweep(os.path.join(d, RESULTS), want)
        if not records:
            raise ValueError(f"{d} has no finished checkpoint in its sweep; run `llcfast sweep {d}` first")
        runs.append(records)
        keys.append(key)
    seen = [(os.path.realpath(d), key) for d, key in zip(run_dirs, keys)]
    twice = sorted({f"{d} ({key})" for d, key, s in zip(run_dirs, keys, seen) if seen.count(s) > 1})
    if twice:
        raise ValueError(f"{twice} name the same sweep more than once; give each run once, or one settings key "
                         "per run to compare one run's sweeps")
    labels = _labels(run_dirs, keys, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a flat or short run's fit warns; its summary says so
        fits = [stage_fit(records, **stage_kwargs) for records in runs]
    shared = across_runs(runs)
    summary = {
        "runs": [{"label": lab, "run_dir": os.path.abspath(d), "settings": key, "checkpoints": len(records),
                  "final_step": records[-1]["step"], "final_llc": records[-1].get("llc_mean"), **fit.to_dict()}
                 for lab, d, key, records, fit in zip(labels, run_dirs, keys, runs, fits)],
        "same_settings": len(set(keys)) == 1,
        "settings_differences": settings_differences(runs, labels),
        "boundaries_vs_first": boundary_matches(fits[0], dict(zip(labels[1:], fits[1:]))),
        "across_runs": shared,
    }
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"compare.{k}") for k in ("png", "svg", "json", "csv")}
    fig = plot_comparison(runs, fits, labels, title=title, shared=shared)
    save_figure(fig, paths["png"], dpi=130, bbox_inches="tight")
    save_figure(fig, paths["svg"], bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    save_text(paths["csv"], _points(runs, labels).to_csv(index=False))
    atomic_json(summary, paths["json"])
    return {"paths": paths, "summary": summary, "fits": fits}


def _points(runs, labels):
    import pandas as pd
    rows = [{"run": lab, "step": r["step"], "llc_mean": r.get("llc_mean"), "llc_se": record_se(r),
             "test_loss": r.get("test_loss"), "failed_checks": ", ".join(r.get("failed_checks") or [])}
            for lab, records in zip(labels, runs) for r in records]
    return pd.DataFrame(rows)


def plot_comparison(runs, fits, labels, title: str = "", shared: Optional[List[dict]] = None):
    """``shared``: across_runs' rows, drawn as the mean across runs ± their
    standard deviation behind the runs' own points."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    heights = [2, 3] + [0.45] * len(runs)
    fig, axes = plt.subplots(len(heights), 1, figsize=(8, 2.0 * sum(heights) / 1.6 + 0.4), sharex=True,
                             gridspec_kw={"height_ratios": heights, "hspace": 0.08})
    ax_loss, ax_llc = axes[0], axes[1]
    if shared and len(shared) > 1:
        steps = [r["step"] for r in shared]
        mean = np.array([r["llc_mean"] for r in shared])
        sd = np.array([r["llc_sd_across_runs"] for r in shared])
        ax_llc.fill_between(steps, mean - sd, mean + sd, color="0.5", alpha=0.2, lw=0,
                            label=f"mean of the {len(runs)} runs ± sd across them")
    for i, (records, fit, lab) in enumerate(zip(runs, fits, labels)):
        color = f"C{i % 10}"
        steps = np.array([r["step"] for r in records], dtype=float)
        ax_loss.plot(steps, [_value(r, "test_loss") for r in records], ".-", ms=3, lw=1, color=color, label=lab)
        ax_llc.errorbar(steps, [_value(r, "llc_mean") for r in records], yerr=[record_se(r) for r in records], fmt="o",
                        ms=3, color=color, elinewidth=0.8, capsize=0)
        ax_llc.plot(fit.grid_steps, fit.mean, color=color, lw=1.2, label=f"{lab}: stage fit")
        for b in fit.boundaries:
            ax_llc.axvline(b, color=color, lw=0.7, ls=":")
        stage_strip(axes[2 + i], fit, lab)
        axes[2 + i].yaxis.label.set_color(color)
    ax_loss.set_ylabel("test loss")
    ax_loss.legend(fontsize=7, loc="best")
    ax_llc.set_ylabel(r"LLC $\hat\lambda$ (± SE)")
    ax_llc.legend(fontsize=7, loc="upper left")
    ax_llc.text(0.99, 0.02, "dotted: each run's stage boundaries", transform=ax_llc.transAxes, fontsize=6,
                ha="right", va="bottom", color="0.3")
    last = axes[-1]
    last.set_xscale("symlog", linthresh=1)
    first = min(r["step"] for records in runs for r in records)
    end = max(r["step"] for records in runs for r in records)
    if end > first:  # one shared step leaves matplotlib to pad the axis
        last.set_xlim(max(first, 0), end)
    last.set_xlabel("training step")
    if title:
        ax_loss.set_title(title)
    fig.align_ylabels(axes)
    return fig


def comparison_lines(summary: dict) -> List[str]:
    """What `llcfast compare` prints: each run's stages, each boundary of
    the first run beside the others' nearest, and the spread across runs."""
    lines = [f"{'run':>16} {'checkpoints':>11} {'final LLC':>10}  stages (type, end step, LLC change)"]
    for run in summary["runs"]:
        stages = ", ".join(f"{s['kind']}{s['stage']} to {s['end']:.0f} {s['delta']:+.1f}" for s in run["stages"])
        final = run["final_llc"]
        lines.append(f"{run['label']:>16} {run['checkpoints']:>11} "
                     f"{'n/a' if final is None else format(final, '.1f'):>10}  {stages}")
    labels = [run["label"] for run in summary["runs"]]
    if summary["boundaries_vs_first"]:
        lines += ["", f"{labels[0] + ' boundary':>16} " + " ".join(f"{'nearest in ' + lab:>22}" for lab in labels[1:])]
        for row in summary["boundaries_vs_first"]:
            cells = [f"{'none':>22}" if row[lab] is None else
                     f"{format(row[lab]['nearest'], '.0f') + ' (x' + format(row[lab]['ratio'], '.2g') + ')':>22}"
                     for lab in labels[1:]]
            lines.append(f"{row['step']:>16.0f} " + " ".join(cells))
        lines.append("(x: the ratio of step + 1 between the two boundaries; each run's own stage fit)")
    shared = summary["across_runs"]
    if shared:
        sd = [r["llc_sd_across_runs"] for r in shared]
        se = [r["llc_se_within_runs"] for r in shared if math.isfinite(r["llc_se_within_runs"])]
        within = f", against the chains' standard error within a run of {min(se):.2g} to {max(se):.2g}" if se else ""
        steps = "the step" if len(shared) == 1 else f"the {len(shared)} steps"
        lines += ["", f"At {steps} every run measured, the LLC's sd across runs is "
                      f"{min(sd):.2g} to {max(sd):.2g}{within}."]
    else:
        lines += ["", "The runs share no checkpoint step, so their LLCs are not compared step by step."]
    differences = summary["settings_differences"]
    if differences:
        named = "; ".join(f"{name} {values}" for name, values in differences.items())
        lines.append(f"The runs were swept with different settings ({named}): their LLCs differ by those too.")
    elif differences is None and not summary["same_settings"]:
        keys = {run["label"]: run["settings"] for run in summary["runs"]}
        lines.append(f"The runs were swept with different settings {keys}: their LLCs differ by the settings too.")
    return lines
