"""Fused SGLD step vs its pure-torch reference, side by side in one run.

For each (parameters per chain, chains): the fused kernel with Philox noise,
the fused kernel with explicit noise, the pure-torch twin with explicit noise
(several torch ops per tensor), and a plain torch step drawing torch.randn
noise (what a per-tensor torch loop does). Reports ms per step, GB/s of the
bytes each must move, and the fraction of the device's measured copy
bandwidth (bytes read + written by a large device-to-device copy).

    python benchmarks/bench_sgld_step.py                 # CUDA if present
    python benchmarks/bench_sgld_step.py --device cpu --max-params 1e7
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time

import torch

import llcfast
from llcfast import ops, reference

sys.path.insert(0, os.path.dirname(__file__))
from results_io import device_name, file_tag  # noqa: E402

FRACTIONS = [0.31, 0.22, 0.17, 0.11, 0.08, 0.05, 0.03, 0.02, 0.01]  # a model-like mix of tensor sizes


def split_sizes(n: int) -> list:
    sizes = [max(4, int(n * f) // 4 * 4) for f in FRACTIONS]
    sizes.append(max(1, n - sum(sizes)) | 1)  # one odd-sized tail tensor: exercises the scalar path
    return sizes


def timer(device):
    if device.type == "cuda":
        def run(fn, reps):
            times = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            return statistics.median(times)
    else:
        def run(fn, reps):
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
    return run


def copy_bandwidth(device, run) -> float:
    n = 2**28 if device.type == "cuda" else 2**25
    x = torch.randn(n, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    t = run(lambda: y.copy_(x), 20)
    return 2 * 4 * n / t


def bench_config(n, chains, device, run, reps, with_reference):
    sizes = split_sizes(n)
    n = sum(sizes)
    params = [torch.randn(chains, s, device=device) for s in sizes]
    grads = [torch.randn(chains, s, device=device) for s in sizes]
    centers = [torch.randn(s, device=device) for s in sizes]
    hyper = dict(eps=1e-6, nbeta=20.0, gamma=100.0, weight_decay=0.0, noise_scale=1.0, seed=1)
    step = [0]

    def fused():
        step[0] += 1
        ops.sgld_step_(params, grads, centers, step=step[0], **hyper)

    row = {"params_per_chain": n, "chains": chains, "tensors": len(sizes)}
    bytes_fused = 4 * (3 * chains * n + n)  # read w, g; write w; read w* once
    fused()
    row["fused_ms"] = run(fused, reps) * 1e3
    row["fused_GBps"] = bytes_fused / row["fused_ms"] / 1e6
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else float("inf")
    if free < 4 * chains * n * 5:
        return row, sizes
    noise = [torch.randn(chains, s, device=device) for s in sizes]
    bytes_noise = bytes_fused + 4 * chains * n

    def fused_noise():
        ops.sgld_step_(params, grads, centers, noise=noise, step=0, **hyper)

    fused_noise()
    row["fused_explicit_noise_ms"] = run(fused_noise, reps) * 1e3
    row["fused_explicit_noise_GBps"] = bytes_noise / row["fused_explicit_noise_ms"] / 1e6
    if with_reference:
        def twin():
            reference.sgld_step_(params, grads, centers, noise=noise, step=0, **hyper)

        a, b, e, s = reference.fold_coefficients(hyper["eps"], hyper["nbeta"], hyper["gamma"], 0.0, 1.0)

        def torch_randn_step():
            for p, g, c in zip(params, grads, centers):
                p.add_(-(a * g + b * (p - c)) + s * torch.randn_like(p))

        twin()
        row["reference_ms"] = run(twin, max(3, reps // 2)) * 1e3
        torch_randn_step()
        row["torch_randn_ms"] = run(torch_randn_step, max(3, reps // 2)) * 1e3
    return row, sizes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-params", type=float, default=1e9)
    ap.add_argument("--chains", default="1,8,32")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    run = timer(device)
    mem = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 8 * 2**30
    copy_bw = copy_bandwidth(device, run)
    print(f"device copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write)")
    rows = []
    for exp in range(5, 10):
        n = 10**exp
        if n > args.max_params:
            break
        for chains in [int(c) for c in args.chains.split(",")]:
            if 4 * chains * n * 2.2 > 0.8 * mem or chains * n > 2**33:
                rows.append({"params_per_chain": n, "chains": chains, "skipped": "does not fit in device memory"})
                continue
            row, _ = bench_config(n, chains, device, run, args.reps, with_reference=chains * n <= 4e9)
            row["fused_fraction_of_copy"] = row["fused_GBps"] * 1e9 / copy_bw
            if "fused_explicit_noise_GBps" in row:
                row["fused_explicit_noise_fraction_of_copy"] = row["fused_explicit_noise_GBps"] * 1e9 / copy_bw
            if "reference_ms" in row:
                row["speedup_vs_reference"] = row["reference_ms"] / row["fused_ms"]
                row["speedup_vs_torch_randn"] = row["torch_randn_ms"] / row["fused_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    info = llcfast.build_info()
    result = {
        "benchmark": "sgld_step",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__, "cuda": torch.version.cuda, "llcfast_build": info,
        "copy_bandwidth_GBps": copy_bw / 1e9, "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"sgld_step_{file_tag(result['device'])}_{dt.date.today().isoformat()}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{'params':>10} {'chains':>6} {'fused ms':>9} {'GB/s':>7} {'%copy':>6} {'noise-in %copy':>14} "
          f"{'ref ms':>9} {'x ref':>7} {'x randn':>7}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['params_per_chain']:>10.0e} {r['chains']:>6}  skipped: {r['skipped']}")
            continue
        f = lambda k, fmt: format(r[k], fmt) if k in r else "-"
        print(f"{r['params_per_chain']:>10.2e} {r['chains']:>6} {r['fused_ms']:>9.3f} {r['fused_GBps']:>7.0f} "
              f"{100 * r['fused_fraction_of_copy']:>5.1f}% "
              f"{f('fused_explicit_noise_fraction_of_copy', '.1%'):>14} {f('reference_ms', '9.3f'):>9} "
              f"{f('speedup_vs_reference', '7.1f'):>7} {f('speedup_vs_torch_randn', '7.1f'):>7}")
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
