"""`llcfast demo`: the whole pipeline on a small model it trains itself:
train with checkpoints, sweep the LLC, the behavioural metrics and the
Hessian statistics, detect stages, write the report. The in-context
regression transformer by default; ``language=True`` a small attention-only
language model."""
from __future__ import annotations

import os
import time
from dataclasses import replace

import torch

from .config import preset
from .report import check_lines, stage_table, write_report
from .sweep import sweep
from .training import train

# (language, full) -> the preset run
PRESET = {(False, False): "demo", (False, True): "regression", (True, False): "language-demo", (True, True): "language"}
TITLE = {"regression": "in-context linear regression", "language": "attention-only language model"}


def demo(out: str = "llcfast-demo", *, device: str = "cpu", full: bool = False, hessian: bool = True,
         progress: bool = True, config=None, language: bool = False) -> dict:
    """Runs (or resumes) the demo into ``out``; returns the report's paths.
    ``full`` uses the paper-scale settings (a GPU job); ``language`` the
    language model instead of the regression transformer."""
    cfg = config or preset(PRESET[bool(language), bool(full)])
    cfg = replace(cfg, sweep=replace(cfg.sweep, hessian=hessian))
    device = torch.device(device)
    started = time.perf_counter()
    say = print if progress else (lambda *a, **k: None)
    what = TITLE["regression" if cfg.task == "regression" else "language"]
    say(f"llcfast demo: training the {what} ({cfg.train.steps} steps) into {out}/")
    train(cfg, out, device=device, progress=progress)
    trained = time.perf_counter()
    say(f"  trained in {trained - started:.0f} s; sweeping the LLC, the behavioural metrics"
        + (" and the Hessian statistics" if hessian else "") + " over the checkpoints")
    records = sweep(out, device=device, progress=progress)
    swept = time.perf_counter()
    paths = write_report(records, out, title=f"llcfast demo: {what}",
                         extra={"seconds": {"train": trained - started, "sweep": swept - trained}})
    say(f"  swept {len(records)} checkpoints in {swept - trained:.0f} s; stages:")
    lines, flagged = stage_table(paths["fit"], paths["curvature"], paths.get("behaviour")), check_lines(records)
    for line in lines + ([""] + flagged if flagged else []):
        say("    " + line)
    say(f"report: {os.path.abspath(paths['png'])}\n        (also report.svg, summary.json, results.csv there)")
    return paths
