"""`llcfast demo`: the whole pipeline on a small in-context regression
transformer it trains itself: train with checkpoints, sweep the LLC and
Hessian statistics, detect stages, write the report."""
from __future__ import annotations

import os
import time
from dataclasses import replace

import torch

from .config import preset
from .report import stage_table, write_report
from .sweep import sweep
from .train import train


def demo(out: str = "llcfast-demo", *, device: str = "cpu", full: bool = False, hessian: bool = True,
         progress: bool = True, config=None) -> dict:
    """Runs (or resumes) the demo into ``out``; returns the report's paths.
    ``full`` uses the paper-scale regression settings (a GPU job)."""
    cfg = config or preset("regression" if full else "demo")
    cfg = replace(cfg, sweep=replace(cfg.sweep, hessian=hessian))
    device = torch.device(device)
    started = time.perf_counter()
    say = print if progress else (lambda *a, **k: None)
    say(f"llcfast demo: training the in-context regression transformer ({cfg.train.steps} steps) into {out}/")
    train(cfg, out, device=device, progress=progress)
    trained = time.perf_counter()
    say(f"  trained in {trained - started:.0f} s; sweeping the LLC"
        + (" and Hessian statistics" if hessian else "") + " over the checkpoints")
    records = sweep(out, device=device, progress=progress)
    swept = time.perf_counter()
    paths = write_report(records, out, title="llcfast demo: in-context linear regression",
                         extra={"seconds": {"train": trained - started, "sweep": swept - trained}})
    say(f"  swept {len(records)} checkpoints in {swept - trained:.0f} s; stages:")
    for line in stage_table(paths["fit"], paths["curvature"], paths.get("behaviour")):
        say("    " + line)
    say(f"report: {os.path.abspath(paths['png'])}\n        (also report.svg, summary.json, results.csv there)")
    return paths
