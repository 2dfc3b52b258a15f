"""The LLC at initialisation of the regression transformer, docs/paper.md's size
against the demo's, under docs/paper.md's main LLC settings (eps 3e-4, nbeta 66.67,
gamma 6.67). The paper reports about 0 at init. A freshly initialised model
predicts y-hat with E[y-hat^2] well above 0, which the chains can lower in a
few steps, so a small model can read well below 0; ``--unembed-scale`` shrinks
the output layer at init to test that reading. Prints the README's table.

    python benchmarks/init_llc.py [--seeds 0 1 2] [--draws 400] [--unembed-scale 1 0.1]
"""
import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import llcfast  # noqa: E402
from llcfast.pipeline import models, tasks  # noqa: E402

SIZES = {
    "paper": (dict(task_dim=4, pairs=8), dict(d_model=64, heads=4, layers=2, mlp_width=64)),
    "demo": (dict(task_dim=3, pairs=8), dict(d_model=32, heads=2, layers=2, mlp_width=32)),
}
SETTINGS = dict(epsilon=3e-4, nbeta=66.67, gamma=6.67, num_burnin=0)


def init_llc(size: str, seed: int, draws: int, chains: int, unembed_scale: float) -> dict:
    task_args, model_args = SIZES[size]
    torch.manual_seed(seed)
    task = tasks.RegressionTask(seed=seed, **task_args)
    model = models.InContextRegression(task_dim=task_args["task_dim"], max_pairs=task_args["pairs"], **model_args)
    with torch.no_grad():
        model.unembed.weight.mul_(unembed_scale)
        model.unembed.bias.mul_(unembed_scale)
        xs, ys = task.eval_set(2048)
        yhat_sq = float((model(xs, ys) ** 2).mean())
    batches = task.llc_batches(2048, 256)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # a negative estimate is the point of the measurement, not a mistake to be warned about
        warnings.simplefilter("ignore")
        res = llcfast.estimate_llc(model, batches, models.regression_loss, num_chains=chains, num_draws=draws,
                                   num_init_batches=len(batches), seed=seed, progress=False, **SETTINGS)
    return dict(size=size, seed=seed, unembed_scale=unembed_scale, params=models.count_parameters(model),
                yhat_sq=yhat_sq, llc_mean=res.llc_mean, llc_std=res.llc_std,
                se_init=res.diagnostics["llc_se_from_init_loss"], seconds=time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--draws", type=int, default=400)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--unembed-scale", type=float, nargs="+", default=[1.0, 0.1])
    args = p.parse_args(argv)
    print(f"{args.chains} chains x {args.draws} draws, eps {SETTINGS['epsilon']:g}, nbeta {SETTINGS['nbeta']:g}, "
          f"gamma {SETTINGS['gamma']:g}; the init loss averages the 8 batches the chains sample from")
    print("| model | params | unembed scale | seed | E[y-hat^2] at init | LLC (mean ± sd over chains) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size in SIZES:
        for scale in args.unembed_scale:
            if size == "paper" and scale != 1.0:
                continue
            for seed in args.seeds:
                r = init_llc(size, seed, args.draws, args.chains, scale)
                print(f"| {size} | {r['params']} | {scale:g} | {seed} | {r['yhat_sq']:.3f} | "
                      f"{r['llc_mean']:+.2f} ± {r['llc_std']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
