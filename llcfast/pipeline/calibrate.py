"""Calibration: a grid over epsilon x gamma (x nbeta) on one checkpoint, each
setting flagged when it diverges, does not equilibrate or gives a negative
LLC, and one recommended — the manual sweep users do today, automated.

Each setting runs all its chains at once; settings run one after another
(the fused step takes one epsilon, gamma and nbeta per launch).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..engine.progress import progress_bar
from ..engine.samplers import check_sampler
from ..estimate.auto import GAMMA_AGREE
from ..estimate.diagnostics import TREND_T
from ..estimate.llc import estimate_llc
from .safety import inside, save_figure, save_text
from .sweep import _finite, append_record, read_results

RHAT_MAX = 1.1
PLATEAU_REL = 0.1  # neighbouring epsilons agree within this fraction (or 2 SE)


@dataclass
class CalibrationResult:
    rows: List[dict]
    traces: Dict[tuple, np.ndarray] = field(repr=False)
    init_loss: float
    recommended: Optional[dict]
    reason: str
    gamma_note: str = ""

    def to_frame(self):
        import pandas as pd
        return pd.DataFrame(self.rows)

    def describe(self) -> str:
        width = max([7] + [len(r["sampler"]) for r in self.rows])
        lines = [f"{'sampler':<{width}} {'epsilon':>9} {'gamma':>8} {'nbeta':>8} {'LLC':>9} {'sd':>7}  flags"]
        for r in self.rows:
            flags = ", ".join(r["flags"]) or "ok"
            lines.append(f"{r['sampler']:<{width}} {r['epsilon']:>9.2g} {r['gamma']:>8.3g} {r['nbeta']:>8.3g} "
                         f"{r['llc_mean']:>9.3g} {r['llc_std']:>7.2g}  {flags}")
        if self.recommended:
            rec = self.recommended
            lines.append(f"recommended: sampler={rec['sampler']} epsilon={rec['epsilon']:g} gamma={rec['gamma']:g} "
                         f"nbeta={rec['nbeta']:g} (LLC {rec['llc_mean']:.4g}); {self.reason}")
        else:
            lines.append(f"no setting recommended: {self.reason}")
        if self.gamma_note:
            lines.append(f"gamma: {self.gamma_note}")
        return "\n".join(lines)

    def plot(self, path: Optional[str] = None, traces_path: Optional[str] = None):
        """LLC against epsilon, one line per (sampler, gamma, nbeta), flagged settings
        as crosses; and (to ``traces_path``) every setting's loss traces."""
        import matplotlib
        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6.5, 4))
        groups = sorted({_group(r) for r in self.rows})
        for i, (sampler, g, nb) in enumerate(groups):
            rows = sorted((r for r in self.rows if _group(r) == (sampler, g, nb)), key=lambda r: r["epsilon"])
            eps = [r["epsilon"] for r in rows]
            llc = [r["llc_mean"] if math.isfinite(r["llc_mean"]) else np.nan for r in rows]
            sd = [r["llc_std"] if math.isfinite(r["llc_std"]) else 0 for r in rows]
            label = (f"{sampler}, " if len({k[0] for k in groups}) > 1 else "") + f"gamma={g:g}" + \
                (f", nbeta={nb:g}" if len({k[2] for k in groups}) > 1 else "")
            ax.errorbar(eps, llc, yerr=sd, fmt="-o", ms=4, color=f"C{i}", label=label, capsize=2)
            bad = [(e, v) for e, v, r in zip(eps, llc, rows) if r["flags"]]
            if bad:
                ax.plot(*zip(*bad), "x", color="red", ms=9, mew=2)
        if self.recommended:
            ax.plot(self.recommended["epsilon"], self.recommended["llc_mean"], "*", color="gold", ms=16, mec="k",
                    label="recommended")
        ax.set(xscale="log", xlabel="epsilon", ylabel="LLC estimate", title="calibration (red x: flagged)")
        ax.legend(fontsize=7)
        if path is not None:
            save_figure(fig, path, dpi=120, bbox_inches="tight")
        if traces_path is not None:
            tfig = self._plot_traces()
            save_figure(tfig, traces_path, dpi=100, bbox_inches="tight")
            plt.close(tfig)
        return fig

    def _plot_traces(self):
        import matplotlib.pyplot as plt
        eps = sorted({r["epsilon"] for r in self.rows})
        groups = sorted({_group(r) for r in self.rows})
        fig, axes = plt.subplots(len(groups), len(eps), figsize=(2.2 * len(eps), 1.8 * len(groups)), squeeze=False,
                                 sharex=True)
        for r in self.rows:
            ax = axes[groups.index(_group(r)), eps.index(r["epsilon"])]
            ax.plot(self.traces[_group(r) + (r["epsilon"],)].T, lw=0.6)
            ax.axhline(self.init_loss, color="k", ls="--", lw=0.8)
            ax.set_title(f"{r['sampler']} eps {r['epsilon']:.2g} g {r['gamma']:.3g}\n" + (", ".join(r["flags"]) or "ok"),
                         fontsize=7, color="red" if r["flags"] else "k")
            ax.tick_params(labelsize=6)
        fig.tight_layout()
        return fig


def _group(row: dict) -> tuple:
    """Settings that differ only in epsilon: one line of the plot, and the
    set within which the step-size plateau is looked for."""
    return row["sampler"], row["gamma"], row["nbeta"]


def sampler_grid(sampler: str, **axes: Sequence[float]) -> List[tuple]:
    """Every combination of a sampler's hyperparameters, as entries for
    calibrate(samplers=...): sampler_grid("rmsprop_sgld", alpha=[0.99, 0.9999])."""
    import itertools
    names = sorted(axes)
    return [(sampler, dict(zip(names, values))) for values in itertools.product(*(axes[n] for n in names))]


def _sampler_configs(samplers) -> List[tuple]:
    """(label, name, kwargs) per entry of samplers: a name, or (name, kwargs)."""
    out = []
    for entry in samplers:
        name, kwargs = (entry, {}) if isinstance(entry, str) else tuple(entry)
        name, full, _ = check_sampler(name, kwargs, None)
        label = name + ("(" + ", ".join(f"{k}={v:g}" for k, v in sorted(kwargs.items())) + ")" if kwargs else "")
        out.append((label, name, dict(kwargs)))
    if not out:
        raise ValueError("samplers must name at least one sampler")
    return out


def _recommend(rows: List[dict]):
    ok = [r for r in rows if not r["flags"]]
    if not ok:
        return None, "every setting diverged, drifted or gave a negative LLC; try smaller epsilon or larger gamma"
    stable = []
    for r in ok:  # stable: agrees with every smaller healthy epsilon of its (gamma, nbeta)
        smaller = [s for s in ok if _group(s) == _group(r) and s["epsilon"] < r["epsilon"]]
        if smaller and all(abs(r["llc_mean"] - s["llc_mean"]) <= max(2 * math.hypot(r["llc_se"], s["llc_se"]),
                                                                      PLATEAU_REL * abs(s["llc_mean"]))
                           for s in smaller):
            stable.append(r)
    if stable:
        best = max(stable, key=lambda r: (r["epsilon"], -r["gamma"]))
        return best, ("the largest healthy epsilon whose LLC agrees with those of all smaller epsilons "
                      "(the estimate has stopped depending on the step size)")
    best = max(ok, key=lambda r: (r["epsilon"], -r["gamma"]))
    return best, ("the largest healthy epsilon; no two neighbouring epsilons agreed, so the estimate still "
                  "depends on the step size: add smaller epsilons or more draws")


def gamma_agreement(rows: List[dict]) -> str:
    """The recipe's gamma procedure read off the grid: for each sampler and
    nbeta, the estimate at each gamma (its smallest healthy epsilon, the least
    step-size bias), and the largest gamma whose estimate agrees within the
    combined standard error with the next smaller gamma's, going down."""
    notes = []
    for sampler, nbeta in sorted({(r["sampler"], r["nbeta"]) for r in rows}):
        best = {}
        for r in rows:
            if (r["sampler"], r["nbeta"]) == (sampler, nbeta) and not r["flags"]:
                if r["gamma"] not in best or r["epsilon"] < best[r["gamma"]]["epsilon"]:
                    best[r["gamma"]] = r
        gammas = sorted(best, reverse=True)
        where = f"{sampler}, nbeta {nbeta:.4g}: " if len({(r['sampler'], r['nbeta']) for r in rows}) > 1 else ""
        if len(gammas) < 2:
            notes.append(where + "needs two or more gammas with a healthy setting to compare")
            continue
        for big, small in zip(gammas, gammas[1:]):
            a, b = best[big], best[small]
            if abs(a["llc_mean"] - b["llc_mean"]) <= GAMMA_AGREE * math.hypot(a["llc_se"], b["llc_se"]):
                notes.append(where + f"{big:g}, whose LLC {a['llc_mean']:.4g} agrees with gamma {small:g}'s "
                             f"{b['llc_mean']:.4g} within their standard error")
                break
        else:
            notes.append(where + f"no two neighbouring gammas agree (down to {gammas[-1]:g}): the estimate still "
                         "depends on gamma; add smaller gammas, or more draws")
    return "; ".join(notes)


def calibrate(model, loader, loss_fn=None, *, epsilons: Sequence[float], gammas: Sequence[float],
              nbetas: Sequence[Optional[float]] = (None,), samplers: Sequence = ("sgld",), num_chains: int = 4,
              num_draws: int = 200,
              num_burnin: int = 0, seed: int = 0, device=None, progress: bool = True,
              record: Optional[str] = None, **llc_kwargs) -> CalibrationResult:
    """Runs estimate_llc at every (sampler, epsilon, gamma, nbeta) of the grid
    (``samplers``: names, or (name, sampler_kwargs) pairs; sampler_grid()
    spans a sampler's hyperparameters) and
    flags each setting: "diverged" (a chain's loss became NaN/Inf),
    "not equilibrated" (the loss trace still trends: |t| > 3 across chains,
    or R-hat > 1.1), "negative LLC". Recommends the largest healthy epsilon
    at which the LLC agrees (within 2 SE or 10%) with every smaller healthy
    epsilon's: the estimate has stopped changing with the step size.
    ``record``: a JSON-lines file each finished setting is appended to (one
    fsync'd line); settings already there, measured the same way, are read
    back instead of run again, so an interrupted grid resumes."""
    for name, grid in (("epsilons", epsilons), ("gammas", gammas)):
        if not grid or any(not isinstance(v, (int, float)) or not v > 0 for v in grid):
            raise ValueError(f"{name} must be a non-empty list of numbers > 0, got {grid!r}")
    rows, traces, init = [], {}, math.nan
    configs = _sampler_configs(samplers)
    settings = [(cfg, float(e), float(g), nb) for cfg in configs for nb in nbetas for g in gammas for e in epsilons]
    bar = progress_bar(progress, len(settings), "calibration grid", unit="setting", leave=True)
    done = {r["key"]: r for r in read_results(record, _setting_problem)} if record else {}
    for (label, sampler, sampler_kwargs), eps, gamma, nbeta in settings:
        key = repr((label, eps, gamma, nbeta, num_chains, num_draws, num_burnin, seed, sorted(llc_kwargs.items())))
        if key in done:
            row, trace, init = _from_record(done[key])
            rows.append(row)
            traces[(label, gamma, row["nbeta"], eps)] = trace
            bar.update(1)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # flagged in the table instead
            warnings.filterwarnings("ignore", message="the loader holds", category=UserWarning)
            res = estimate_llc(model, loader, loss_fn, num_chains=num_chains, num_draws=num_draws,
                               num_burnin=num_burnin, epsilon=eps, gamma=gamma, nbeta=nbeta, seed=seed,
                               device=device, progress=False, sampler=sampler, sampler_kwargs=sampler_kwargs,
                               **llc_kwargs)
        nb = float(res.config.get("nbeta", nbeta))
        init = res.init_loss
        good = np.isfinite(res.llc_per_chain)  # chains whose whole trace is finite
        t = res.diagnostics.get("trend_t", math.nan)  # over the chains whose whole trace is finite
        rhat = res.diagnostics.get("rhat", math.nan)
        flags = []
        if res.diagnostics["diverged_chains"] or not math.isfinite(res.llc_mean):
            flags.append("diverged")
        else:
            if (math.isfinite(t) and abs(t) > TREND_T) or (math.isfinite(rhat) and rhat > RHAT_MAX):
                flags.append("not equilibrated")
            if res.llc_mean < 0:
                flags.append("negative LLC")
        rows.append({"sampler": label, "epsilon": eps, "gamma": gamma, "nbeta": nb, "llc_mean": res.llc_mean, "llc_std": res.llc_std,
                     "llc_se": res.llc_std / math.sqrt(max(int(good.sum()), 1)),
                     "rhat": rhat, "trend_t": t, "flags": flags})
        traces[(label, gamma, nb, eps)] = res.loss_trace
        if record:
            append_record(record, {"key": key, "row": _jsonable(rows[-1]), "trace": _jsonable(res.loss_trace.tolist()),
                                   "init_loss": _jsonable(init)})
        bar.update(1)
    bar.close()
    best, reason = _recommend(rows)
    return CalibrationResult(rows, traces, init, best, reason, gamma_agreement(rows))


def _setting_problem(record) -> Optional[str]:
    """Why a line of a calibration record file is not a finished setting."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if not isinstance(record.get("key"), str) or not isinstance(record.get("row"), dict):
        return "it lacks a 'key' string or a 'row' object"
    if not isinstance(record.get("trace"), list):
        return "its 'trace' is not a list"
    return None


def _jsonable(value):
    # JSON has no NaN or Inf: a diverged chain's values are stored as null.
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _from_record(rec: dict):
    row = {k: (math.nan if v is None else v) for k, v in rec["row"].items()}
    trace = np.array(rec["trace"], dtype=float)  # null -> NaN
    return row, trace, math.nan if rec["init_loss"] is None else rec["init_loss"]


def calibrate_run(run_dir: str, *, step: Optional[int] = None, epsilons=None, gammas=None, nbetas=None, samplers=None,
                  num_chains: Optional[int] = None, num_draws: Optional[int] = None, device=None,
                  out: Optional[str] = None, progress: bool = True) -> CalibrationResult:
    """calibrate() on one checkpoint of a training run, with grids around the
    run's own settings by default; writes calibration.png,
    calibration_traces.png, calibration.csv into ``out`` (RUN_DIR/calibration),
    and each finished setting into settings_stepN.jsonl there, so that an
    interrupted calibration resumes where it stopped."""
    import torch

    from .estimate import open_checkpoint
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = open_checkpoint(run_dir, step, device)
    step, cfg, s = ckpt.step, ckpt.config, ckpt.config.sweep
    out = out or inside(run_dir, os.path.join(run_dir, "calibration"))
    os.makedirs(out, exist_ok=True)
    result = calibrate(ckpt.model, ckpt.task.llc_batches(s.llc_sequences, s.llc_batch_size, device), cfg.loss_fn,
                       epsilons=epsilons or [s.epsilon * f for f in (0.1, 0.3, 1, 3, 10)],
                       gammas=gammas or [s.gamma * f for f in (0.1, 1, 10)], nbetas=nbetas or [s.nbeta],
                       samplers=samplers or ["sgld"],
                       num_chains=num_chains or s.num_chains, num_draws=num_draws or s.num_draws,
                       num_burnin=s.num_burnin, seed=s.seed, device=device, progress=progress,
                       record=os.path.join(out, f"settings_step{step}.jsonl"))  # a rerun resumes from it
    import matplotlib.pyplot as plt
    fig = result.plot(os.path.join(out, "calibration.png"), os.path.join(out, "calibration_traces.png"))
    plt.close(fig)
    frame = result.to_frame()
    frame["flags"] = frame["flags"].map(lambda f: "; ".join(f))
    save_text(os.path.join(out, "calibration.csv"), frame.assign(step=step).to_csv(index=False))
    return result
