"""Hessian statistics side by side, in one run: llcfast's batched HVPs vs
a PyHessian-style loop (one double-backward HVP at a time, power iteration
for the top eigenvalue) and, where it is installed, curvlinops' Hutchinson
trace and hessian-eigenthings' Hutchinson trace and Lanczos, same model,
same batch.

    python benchmarks/bench_hessian.py                       # GPU, JSON into benchmarks/results/
    python benchmarks/bench_hessian.py --quick --device cpu  # a small smoke run

Reported per case: trace with P Rademacher probes (seconds, HVPs per second,
the two estimates), and the top eigenvalue: how many HVPs each method needed
to get within 1e-3 relative of a tight reference value (Lanczos at tol 1e-8).
llcfast's trace is also timed at each of --precisions (TF32 matmuls, bf16
autocast, +compile: the passes through torch.compile, compiled in the
warm-up call, +forward: forward-over-reverse HVPs instead of the default
reverse-over-reverse) with the same probes: its speed-up over the fp32 loop, and how
far its estimate moved from llcfast's fp32 one in units of the standard error.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import llcfast  # noqa: E402
from bench_llc import flops_per_chain_step, lm_case, lr_case, peak_fraction, sync  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from results_io import device_name, save_report  # noqa: E402


def loop_trace(model, loss_fn, batch, probes, seed):
    """PyHessian's trace: gradients with create_graph once, then one
    autograd.grad per Rademacher probe."""
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    loss = loss_fn(model, batch)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    values = []
    for _ in range(probes):
        v = [torch.randint(0, 2, p.shape, generator=gen, device=p.device).float() * 2 - 1 for p in params]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        values.append(sum(float((a * b).sum()) for a, b in zip(hv, v)))
    mean = sum(values) / len(values)
    se = (sum((x - mean) ** 2 for x in values) / max(len(values) - 1, 1) / len(values)) ** 0.5
    return mean, se


def loop_power(model, loss_fn, batch, target, max_iter, seed):
    """Power iteration with one double-backward HVP per step; returns the HVPs
    it took to come within 1e-3 relative of ``target`` (or max_iter)."""
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    loss = loss_fn(model, batch)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    v = [torch.randn(p.shape, generator=gen, device=p.device) for p in params]
    value = float("nan")
    for it in range(1, max_iter + 1):
        norm = torch.sqrt(sum((x * x).sum() for x in v))
        v = [x / norm for x in v]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        value = float(sum((a * b).sum() for a, b in zip(hv, v)))
        if abs(value - target) <= 1e-3 * abs(target):
            return it, value
        v = [h.detach() for h in hv]
    return max_iter, value


def lanczos_hvps_to(model, loss_fn, batch, target, max_iter):
    """The fewest Lanczos iterations (HVPs) whose top Ritz value is within
    1e-3 relative of ``target``."""
    for it in range(2, max_iter + 1):
        res = llcfast.hessian_eigs(model, loss_fn, [batch], k=1, tol=1e-12, max_iter=it, progress=False)
        if abs(res.values[0, 0] - target) <= 1e-3 * abs(target):
            return res.num_hvps, float(res.values[0, 0])
    return max_iter, float(res.values[0, 0])


def curvlinops_trace(model, loss_fn, batch, probes):
    """curvlinops' Hutchinson trace (its HessianLinearOperator batches the
    probes' HVPs) on the same loss: the model is wrapped so that its output
    is loss_fn's value, and curvlinops' loss is the identity on it."""
    import curvlinops
    from torch import nn

    class LossAsOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, X):
            return loss_fn(self.model, X["batch"]).reshape(1, 1)

    class Identity(nn.Module):
        reduction = "mean"

        def forward(self, out, target):
            return out.sum()

    params = [p for p in model.parameters() if p.requires_grad]
    dummy = torch.zeros(1, 1, device=params[0].device)
    op = curvlinops.HessianLinearOperator(LossAsOutput(), Identity(), params, [({"batch": batch}, dummy)],
                                          check_deterministic=False, batch_size_fn=lambda X: 1)
    return float(curvlinops.hutchinson_trace(op, probes))


def eigenthings_trace(model, loss_fn, batch, probes):
    """hessian-eigenthings' Hutchinson trace (one double-backward HVP per
    probe through its HessianOperator); it takes loss_fn(model, batch) as is."""
    import hessian_eigenthings as he
    op = he.HessianOperator(model, [batch], loss_fn)
    return float(he.hutchinson(op, num_samples=probes, seed=0).estimate)


def eigenthings_hvps_to(model, loss_fn, batch, target, max_iter):
    """The fewest hessian-eigenthings Lanczos steps (one HVP each) whose top
    Ritz value is within 1e-3 relative of ``target``."""
    import hessian_eigenthings as he
    op = he.HessianOperator(model, [batch], loss_fn)
    value = float("nan")
    for it in range(2, max_iter + 1):
        value = float(he.lanczos(op, k=1, max_iter=it, which="LA", seed=0, reorthogonalize=True).eigenvalues[0])
        if abs(value - target) <= 1e-3 * abs(target):
            return it, value
    return max_iter, value


def optional(device, fn):
    """(seconds, value) of fn, or (None, None) where its library is missing."""
    try:
        fn()  # warm-up (allocations, libraries)
        return timed(device, fn)
    except ImportError:
        return None, None


def counted_flops(fn) -> int:
    """Matmul and convolution FLOPs fn executes (torch's flop counter sees
    the batched ops vmap issues, primal passes included)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(device, fn):
    sync(device)
    started = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - started, out


def low_precision_traces(model, loss_fn, batch, probes, device, precisions, fast, loop_s, flops):
    """llcfast's trace at each precision, against its fp32 run ``fast``
    (same probes) and the fp32 loop's time. ``flops``: the fp32 run's
    count, which precision does not change (the same matmuls run)."""
    out = {}
    for variant in precisions:
        precision, *extras = variant.split("+")
        mode = "forward-over-reverse" if "forward" in extras else "reverse-over-reverse"
        run = lambda: llcfast.hessian_trace(model, loss_fn, [batch], num_probes=probes,  # noqa: E731
                                            precision=precision, compile="compile" in extras, hvp_mode=mode,
                                            progress=False)
        run()  # warm-up (and torch.compile's compilation, which later calls reuse)
        seconds, res = timed(device, run)
        out[variant] = {"s": seconds, "speedup_vs_loop": loop_s / seconds, "hvps_per_s": probes / seconds,
                          "tflops": flops / seconds / 1e12,
                          "peak_fraction": peak_fraction(device, precision, flops / seconds / 1e12),
                          "estimate": float(res.trace[0]), "compiled": res.config.get("compile", False),
                          "shift_in_se": float((res.trace[0] - fast.trace[0]) / fast.std_error[0])}
    return out


def measure(case, device, probes, max_iter, precisions=()):
    model, loss_fn = case["model"], case["loss_fn"]
    batch = next(iter(case["loader"]))
    llcfast.hessian_trace(model, loss_fn, [batch], num_probes=2, progress=False)  # warm-up (allocations, libraries)
    fast_s, fast = timed(device, lambda: llcfast.hessian_trace(model, loss_fn, [batch], num_probes=probes, progress=False))
    loop_s, (loop, loop_se) = timed(device, lambda: loop_trace(model, loss_fn, batch, probes, seed=0))
    cl_s, cl = optional(device, lambda: curvlinops_trace(model, loss_fn, batch, probes))
    he_s, he_value = optional(device, lambda: eigenthings_trace(model, loss_fn, batch, probes))
    fast_flops = counted_flops(lambda: llcfast.hessian_trace(model, loss_fn, [batch], num_probes=probes, progress=False))
    loop_flops = counted_flops(lambda: loop_trace(model, loss_fn, batch, probes, seed=0))
    ref = llcfast.hessian_eigs(model, loss_fn, [batch], k=1, tol=1e-8, max_iter=max_iter, progress=False)
    target = float(ref.values[0, 0])
    lz_hvps, lz_value = lanczos_hvps_to(model, loss_fn, batch, target, max_iter)
    pw_hvps, pw_value = loop_power(model, loss_fn, batch, target, 10 * max_iter, seed=0)
    try:
        he_hvps, he_top = eigenthings_hvps_to(model, loss_fn, batch, target, max_iter)
    except ImportError:
        he_hvps, he_top = None, None
    flops = flops_per_chain_step(case, device)
    return {"case": case["name"].split("-")[0], "params": sum(p.numel() for p in model.parameters()),
            "probes": probes, "trace": {
                "llcfast_s": fast_s, "loop_s": loop_s, "speedup": loop_s / fast_s,
                "llcfast_hvps_per_s": probes / fast_s, "loop_hvps_per_s": probes / loop_s,
                "llcfast_tflops": fast_flops / fast_s / 1e12, "loop_tflops": loop_flops / loop_s / 1e12,
                "llcfast_peak_fraction": peak_fraction(device, "fp32", fast_flops / fast_s / 1e12),
                "loop_peak_fraction": peak_fraction(device, "fp32", loop_flops / loop_s / 1e12),
                "llcfast_estimate": float(fast.trace[0]), "llcfast_se": float(fast.std_error[0]),
                "llcfast_probes_per_pass": fast.config["probes_per_pass"],
                "loop_estimate": loop, "loop_se": loop_se,
                "curvlinops_s": cl_s, "curvlinops_estimate": cl,
                "speedup_vs_curvlinops": None if cl_s is None else cl_s / fast_s,
                "eigenthings_s": he_s, "eigenthings_estimate": he_value,
                "speedup_vs_eigenthings": None if he_s is None else he_s / fast_s,
                "precisions": low_precision_traces(model, loss_fn, batch, probes, device, precisions, fast, loop_s,
                                                   fast_flops)},
            "top_eig": {"reference": target, "lanczos_hvps": lz_hvps, "lanczos_value": lz_value,
                        "power_hvps": pw_hvps, "power_value": pw_value,
                        "eigenthings_lanczos_hvps": he_hvps, "eigenthings_lanczos_value": he_top},
            "grad_flops": flops}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small models, few probes")
    p.add_argument("--probes", type=int, default=None, help="Hutchinson probes (default 100; quick: 8)")
    p.add_argument("--precisions", default="fp32+forward,tf32,bf16,bf16+compile",
                   help="comma-separated fp32, tf32, bf16, each optionally +compile (torch.compile'd passes) and "
                        "+forward (forward-over-reverse HVPs): llcfast's trace also timed at these (empty: none)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/hessian_<gpu>_<date>.json)")
    args = p.parse_args(argv)
    precisions = [x for x in args.precisions.split(",") if x]
    for x in precisions:
        precision, *extras = x.split("+")
        if precision not in ("fp32", "tf32", "bf16") or not set(extras) <= {"compile", "forward"}:
            p.error(f"--precisions: {x!r} is not fp32, tf32 or bf16, optionally followed by +compile, +forward")
    device = torch.device(args.device)
    probes = args.probes or (8 if args.quick else 100)
    max_iter = 40 if args.quick else 100
    results = []
    for make in (lr_case, lm_case):
        case = make(1, device, args.quick)
        res = measure(case, device, probes, max_iter, precisions)
        results.append(res)
        t, e = res["trace"], res["top_eig"]
        print(f"{res['case']}: trace {t['llcfast_estimate']:.4g} ± {t['llcfast_se']:.2g} in {t['llcfast_s']:.3f} s "
              f"({t['llcfast_hvps_per_s']:.1f} HVP/s) vs loop {t['loop_estimate']:.4g} ± {t['loop_se']:.2g} in {t['loop_s']:.3f} s "
              f"-> {t['speedup']:.1f}x ({t['llcfast_tflops']:.2f} vs {t['loop_tflops']:.2f} TFLOP/s)"
              + (f"; curvlinops {t['curvlinops_estimate']:.4g} in {t['curvlinops_s']:.3f} s "
                 f"-> {t['speedup_vs_curvlinops']:.1f}x" if t["curvlinops_s"] is not None else "; curvlinops not installed")
              + (f"; hessian-eigenthings {t['eigenthings_estimate']:.4g} in {t['eigenthings_s']:.3f} s "
                 f"-> {t['speedup_vs_eigenthings']:.1f}x" if t["eigenthings_s"] is not None
                 else "; hessian-eigenthings not installed")
              + f";  top eig {e['reference']:.5g}: Lanczos {e['lanczos_hvps']} HVPs, "
              f"power {e['power_hvps']} HVPs, hessian-eigenthings Lanczos {e['eigenthings_lanczos_hvps']} HVPs")
        for precision, r in t["precisions"].items():
            print(f"  {precision}: trace {r['estimate']:.4g} in {r['s']:.3f} s -> {r['speedup_vs_loop']:.1f}x the fp32 "
                  f"loop, {r['shift_in_se']:+.2f} SE from fp32")
    gpu = device_name(device)
    report = {"device": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
              "date": datetime.date.today().isoformat(), "quick": args.quick, "cases": results}
    save_report(report, args.out, "hessian_quick" if args.quick else "hessian")


if __name__ == "__main__":
    main()
