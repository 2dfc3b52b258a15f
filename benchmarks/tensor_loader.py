"""estimate_llc on a DataLoader of a TensorDataset, the loader most small
models are sampled with: batches indexed from the tensors (what the engine
does for such a loader) against the same loader fetched and collated sample
by sample (forced by a collate_fn that only calls default_collate). The
estimates must be equal to the last bit; the report gives the wall time of
each, side by side in one process, and their ratio.

    python3 benchmarks/tensor_loader.py [--quick] [--device cpu] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils.collate import default_collate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import llcfast  # noqa: E402
from benchmarks.results_io import report_header, save_report  # noqa: E402


def sample_by_sample(batch):
    return default_collate(batch)


def mse(model, batch):
    return torch.nn.functional.mse_loss(model(batch[0]).squeeze(-1), batch[1])


def case(d: int, width: int, n: int, batch_size: int, device: torch.device, kw: dict, train_steps: int) -> dict:
    g = torch.Generator().manual_seed(d)
    x = torch.randn(n, d, generator=g)
    y = torch.sin(x.sum(1)) + 0.1 * torch.randn(n, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(d, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)).to(device)
    data = TensorDataset(x.to(device), y.to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(train_steps):  # near a minimum, as an LLC's w* should be
        optimizer.zero_grad()
        mse(model, data.tensors).backward()
        optimizer.step()
    row = {"model": f"MLP {d}-{width}-1", "parameters": sum(p.numel() for p in model.parameters()), "n": n,
           "batch_size": batch_size}
    warm = DataLoader(data, batch_size=batch_size)
    llcfast.estimate_llc(model, warm, mse, device=device, **{**kw, "num_burnin": 2, "num_draws": 2})  # first-call costs
    results = {}
    for name, collate in (("per_sample", sample_by_sample), ("indexed", None)):
        loader = DataLoader(data, batch_size=batch_size, shuffle=True, **({"collate_fn": collate} if collate else {}))
        start = time.perf_counter()
        results[name] = llcfast.estimate_llc(model, loader, mse, device=device, **kw)
        row[f"{name}_s"] = time.perf_counter() - start
    row["llc"] = results["indexed"].llc_mean
    row["equal_estimates"] = results["indexed"].llc_mean == results["per_sample"].llc_mean
    row["speedup"] = row["per_sample_s"] / row["indexed_s"]
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    steps = 20 if args.quick else 300
    kw = dict(epsilon=1e-4, gamma=100.0, num_chains=8, num_burnin=steps, num_draws=steps, seed=0, progress=False)
    cases = [(2, 16, 400, 100), (5, 16, 400, 100)] if args.quick else [(2, 16, 2000, 200), (20, 64, 10000, 500)]
    rows = [case(*c, device, kw, 20 if args.quick else 500) for c in cases]
    for row in rows:
        print(f"{row['model']:>14} batch {row['batch_size']:>4}: per sample {row['per_sample_s']:.2f} s, "
              f"indexed {row['indexed_s']:.2f} s, x{row['speedup']:.1f}, equal estimates: {row['equal_estimates']}")
    report = {**report_header("tensor_loader", device), "settings": {k: v for k, v in kw.items() if k != "progress"},
              "rows": rows}
    save_report(report, args.out, "tensor_loader")
    return report


if __name__ == "__main__":
    main()
