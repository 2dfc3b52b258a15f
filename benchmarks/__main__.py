"""The benchmark suite in one command: the fused sampler steps, estimate_llc
on the paper's two models (llcfast vs its reference vs devinterp 1.3.2 where
installed), the Hessian statistics, GPT-2 124M/774M (bench_large) and the
kernels and bytes of one engine step (bench_traffic, counted without a GPU), each
writing its JSON into benchmarks/results/; a full run then rewrites the
result tables of docs/performance.md from it (benchmarks/tables.py).

    python -m benchmarks                  # everything, on CUDA if present
    python -m benchmarks --quick          # a smoke run of each (CPU is fine; JSON to a temp folder)
    python -m benchmarks --only llc hessian
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

SUITE = ("sgld_step", "samplers", "llc", "hessian", "large", "traffic")


def arguments(name: str, quick: bool, device: str, have_devinterp: bool, scratch: str) -> list:
    args = ["--device", device]
    if quick:  # smoke runs keep their JSON out of benchmarks/results/
        args += ["--out", scratch if name == "sgld_step" else os.path.join(scratch, f"{name}.json")]
    if name == "sgld_step":
        return args + (["--max-params", "1e6", "--chains", "1,4", "--reps", "3"] if quick else [])
    if name == "samplers":
        return args + (["--params", "1e5", "--chains", "2", "--reps", "3"] if quick else [])
    if name == "large":
        quick_args = ["--sizes", "tiny", "--chains", "2", "--draws", "3", "--batch", "2", "--context", "32"]
        return args + (quick_args if quick else []) + ([] if have_devinterp else ["--skip-devinterp"])
    if name == "llc":
        return args + (["--quick"] if quick else []) + ([] if have_devinterp else ["--skip-devinterp"])
    return args + (["--quick"] if quick else [])


def main(argv=None) -> int:
    import torch
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="small sizes and few steps: checks that each one runs")
    p.add_argument("--only", nargs="+", choices=SUITE, default=list(SUITE))
    args = p.parse_args(argv)
    have_devinterp = importlib.util.find_spec("devinterp") is not None
    if not have_devinterp:
        print("devinterp is not installed (pip install devinterp==1.3.2): estimate_llc runs without it")
    scratch = tempfile.mkdtemp(prefix="llcfast-bench-") if args.quick else ""
    failed = []
    for name in args.only:
        module = __import__(f"bench_{name}")
        started = time.perf_counter()
        print(f"== bench_{name}", flush=True)
        try:
            module.main(arguments(name, args.quick, args.device, have_devinterp, scratch))
        except Exception as exc:  # one failing benchmark must not hide the others' figures
            failed.append(name)
            print(f"bench_{name} failed: {type(exc).__name__}: {exc}", flush=True)
        print(f"== bench_{name}: {time.perf_counter() - started:.0f} s", flush=True)
    if not args.quick:  # docs/performance.md's result blocks follow the new JSON
        import tables
        page = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "performance.md")
        tables.main(["--readme", page])
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
