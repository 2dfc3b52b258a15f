"""loss_along_path and layer_ablation on the regression transformer of the
demo's shape (4 blocks of 4 heads), with their points stacked in batched
passes of different sizes against one point at a time, side by side in one
process, at two batch sizes; the largest relative difference between the
losses of each way and the first's. The twin of layer_ablation (which edits
the model one variant at a time) is timed beside them.

    python3 benchmarks/landscape_passes.py [--quick] [--device cpu] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import llcfast  # noqa: E402
from benchmarks.results_io import report_header, save_report  # noqa: E402
from llcfast.pipeline import models  # noqa: E402

SHAPE = dict(task_dim=4, max_pairs=16, d_model=64, heads=4, layers=4, mlp_width=256)


def timed(call):
    start = time.perf_counter()
    out = call()
    return out, time.perf_counter() - start


def rows_for(sequences: int, batches: int, device) -> list:
    torch.manual_seed(0)
    a, b = models.InContextRegression(**SHAPE).to(device), models.InContextRegression(**SHAPE).to(device)
    gen = torch.Generator().manual_seed(1)
    loader = [models.sample_regression(sequences, pairs=16, task_dim=4, generator=gen, device=device)
              for _ in range(batches)]
    loss, rows = models.regression_loss, []
    path = dict(points=17, progress=False, device=device)
    llcfast.loss_along_path(a, b, loader[:1], loss, **{**path, "points": 3})  # first-call costs
    base = None
    for per_pass in (1, 4, 17, None):  # None: the default, which the row records as "default -> chosen"
        r, s = timed(lambda: llcfast.loss_along_path(a, b, loader, loss, points_per_pass=per_pass, **path))
        base = r.loss if base is None else base
        chosen = per_pass or f"default -> {r.config['points_per_pass']}"
        rows.append({"call": "loss_along_path", "points": 17, "per_pass": chosen, "sequences": sequences,
                     "seconds": s, "max_relative_difference": float(np.max(np.abs(r.loss - base) / np.abs(base)))})
    ablate = dict(heads=True, progress=False, device=device)
    llcfast.layer_ablation(a, loader[:1], loss, **ablate)
    twin, s = timed(lambda: llcfast.layer_ablation(a, loader, loss, batched=False, **ablate))
    rows.append({"call": "layer_ablation twin", "points": len(twin.loss), "per_pass": 1, "sequences": sequences,
                 "seconds": s, "max_relative_difference": 0.0})
    for per_pass in (1, 4, 16, None):
        r, s = timed(lambda: llcfast.layer_ablation(a, loader, loss, variants_per_pass=per_pass, **ablate))
        per_pass = per_pass or "default"
        gap = max(abs(r.loss[k] - twin.loss[k]) / abs(twin.loss[k]) for k in twin.loss)
        rows.append({"call": "layer_ablation", "points": len(r.loss), "per_pass": per_pass, "sequences": sequences,
                     "seconds": s, "max_relative_difference": gap})
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one small batch")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for sequences in ((4,) if args.quick else (8, 256)):
        rows += rows_for(sequences, 1 if args.quick else 8, device)
    for r in rows:
        print(f"{r['call']:>20} {r['points']:>3} points, {r['per_pass']!s:>2} per pass, {r['sequences']:>3} sequences: "
              f"{r['seconds']:6.2f} s (largest relative difference {r['max_relative_difference']:.1e})")
    report = {**report_header("landscape_passes", device), "model": {"InContextRegression": SHAPE},
              "batches": 1 if args.quick else 8, "rows": rows}
    save_report(report, args.out, "landscape_passes")
    return report


if __name__ == "__main__":
    main()
