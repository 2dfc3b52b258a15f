"""The three fused sampler steps (SGLD, RMSprop-SGLD, SGNHT) side by side in
one run, each against its pure-torch twin: ms per step, GB/s of the bytes
each must move and the fraction of the measured copy bandwidth.

Bytes counted per chain: w and g read, w written (SGLD); plus the state
(V or momentum) read and written (RMSprop-SGLD, SGNHT); w* read once.

    python benchmarks/bench_samplers.py                  # CUDA if present
    python benchmarks/bench_samplers.py --device cpu --params 1e6 --chains 4
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import llcfast  # noqa: E402
from llcfast import ops, reference  # noqa: E402
from llcfast.engine.samplers import Stepper  # noqa: E402
from bench_sgld_step import copy_bandwidth, split_sizes, timer  # noqa: E402
from results_io import device_name, save_report  # noqa: E402


def bench(sampler, n, chains, device, run, reps, with_twin):
    sizes = split_sizes(n)
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(chains, s, device=device, generator=gen) for s in sizes]
    grads = [torch.randn(chains, s, device=device, generator=gen) for s in sizes]
    centers = [p[0].clone() for p in params]
    hyper = dict(eps=1e-6, nbeta=10.0, gamma=100.0, weight_decay=0.0, noise_scale=1.0, seed=1, step=0)
    kwargs = {"sgld": {}, "rmsprop_sgld": {"alpha": 0.99, "rms_eps": 0.1}, "sgnht": {"diffusion": 0.01}}[sampler]
    fused = Stepper(ops, sampler, kwargs, 0.0, params, epsilon=hyper["eps"], seed=1)
    state_rw = 0 if sampler == "sgld" else 2
    nbytes = 4 * sum(sizes) * (chains * (3 + state_rw) + 1)
    for _ in range(3):
        fused.step(params, grads, centers, **hyper)
    out = {"sampler": sampler, "params_per_chain": sum(sizes), "chains": chains,
           "fused_ms": 1e3 * run(lambda: fused.step(params, grads, centers, **hyper), reps)}
    out["fused_GBps"] = nbytes / (out["fused_ms"] / 1e3) / 1e9
    if with_twin:
        twin = Stepper(reference, sampler, kwargs, 0.0, params, epsilon=hyper["eps"], seed=1)
        twin.step(params, grads, centers, **hyper)
        out["twin_ms"] = 1e3 * run(lambda: twin.step(params, grads, centers, **hyper), max(3, reps // 3))
        out["twin_over_fused"] = out["twin_ms"] / out["fused_ms"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--params", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    ap.add_argument("--chains", type=int, nargs="+", default=[8])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--no-twin", action="store_true", help="skip the pure-torch twins (slow at 1e8)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/samplers_<device>_<date>.json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    run = timer(device)
    bw = copy_bandwidth(device, run)
    rows = []
    for n in args.params:
        for chains in args.chains:
            for sampler in llcfast.SAMPLERS:
                r = bench(sampler, int(n), chains, device, run, args.reps, not args.no_twin)
                r["fraction_of_copy"] = r["fused_GBps"] * 1e9 / bw
                rows.append(r)
                print(f"{sampler:13s} {r['params_per_chain']:>11,d} x {chains:<3d} fused {r['fused_ms']:8.3f} ms "
                      f"{r['fused_GBps']:7.0f} GB/s ({100 * r['fraction_of_copy']:.0f}% of copy)"
                      + (f"   twin {r['twin_ms']:8.2f} ms ({r['twin_over_fused']:.1f}x)" if "twin_ms" in r else ""),
                      flush=True)
    name = device_name(device)
    report = {"benchmark": "sampler_steps", "device": name, "torch": torch.__version__,
              "cuda": torch.version.cuda, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "copy_bandwidth_GBps": bw / 1e9, "build": llcfast.build_info(), "rows": rows}
    save_report(report, args.out, "samplers")


if __name__ == "__main__":
    main()
