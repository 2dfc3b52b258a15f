"""The loss barrier between two regression transformers trained from
different seeds, before and after align_permutation: weight or activation
matching, with and without the residual stream's permutation.

    python3 benchmarks/two_seed_transformers.py [--quick] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import llcfast  # noqa: E402
from benchmarks.results_io import report_header, save_report  # noqa: E402
from llcfast.pipeline import models  # noqa: E402

SHAPE = dict(task_dim=2, max_pairs=8, d_model=32, heads=4, layers=2, mlp_width=32)


def train(seed: int, steps: int):
    torch.manual_seed(seed)
    model = models.InContextRegression(**SHAPE)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(100 + seed)
    for _ in range(steps):
        loss = models.regression_loss(model, models.sample_regression(64, pairs=8, task_dim=2, generator=gen))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: little training")
    parser.add_argument("--steps", type=int, default=2000, help="Adam steps per model")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    steps = 20 if args.quick else args.steps
    a, b = train(1, steps), train(2, steps)
    gen = torch.Generator().manual_seed(7)
    data = [models.sample_regression(128, pairs=8, task_dim=2, generator=gen) for _ in range(4)]
    ways = {"none": lambda: b,
            "weights, heads and units": lambda: llcfast.align_permutation(a, b, residual=False),
            "weights, and the residual stream": lambda: llcfast.align_permutation(a, b),
            "activations, heads and units": lambda: llcfast.align_permutation(a, b, data, residual=False),
            "activations, and the residual stream": lambda: llcfast.align_permutation(a, b, data)}
    rows = []
    for name, align in ways.items():
        r = llcfast.loss_along_path(a, align(), data, models.regression_loss, points=17, progress=False)
        rows.append({"alignment": name, "barrier": r.barrier, "barrier_t": r.barrier_t,
                     "loss_a": float(r.loss[0]), "loss_b": float(r.loss[-1]), "loss_midpoint": float(r.loss[8])})
        print(f"{name:>38}: barrier {r.barrier:.4f} (ends {r.loss[0]:.4f}, {r.loss[-1]:.4f}; midpoint {r.loss[8]:.4f})")
    report = {**report_header("two_seed_transformers", torch.device("cpu")), "model": {"InContextRegression": SHAPE},
              "training": {"adam_steps": steps, "lr": 3e-3, "sequences_per_step": 64},
              "evaluation": {"batches": 4, "sequences_per_batch": 128, "points": 17}, "rows": rows}
    save_report(report, args.out, "two_seed_transformers")
    return report


if __name__ == "__main__":
    main()
