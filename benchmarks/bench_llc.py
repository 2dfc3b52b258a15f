"""estimate_llc side by side: llcfast's fast engine vs llcfast's sequential
reference vs devinterp 1.3.2, same model, same hyperparameters, same loader,
same number of gradient evaluations, in one run.

    python benchmarks/bench_llc.py                      # GPU, all cases, JSON into benchmarks/results/
    python benchmarks/bench_llc.py --quick --device cpu # a small smoke run

Cases (docs/paper.md's two models): the in-context linear regression transformer
(batch 256 sequences of 16 (x, y) pairs; 8 and 32 chains) and the 2-layer
attention-only language model (vocab 5000, d_model 256, 8 heads, 1024
positions; batch 16 sequences of 256 tokens; 8 chains). Reported: ms per
chain-step (wall time of the whole call over chains x steps), the ratio to
devinterp, the LLC each backend found, and the fraction of the GPU's matmul
peak the fast engine reached (FLOPs counted with torch's FlopCounterMode on
one chain's forward and backward).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
import warnings

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import llcfast  # noqa: E402
from llcfast.fastpath import fold as chain_fold
from llcfast.pipeline import models, tasks  # noqa: E402
from llcfast.fastpath import bf16_copies, settings  # noqa: E402
from results_io import device_name, save_report  # noqa: E402

# Dense matmul peaks (TFLOP/s) of the GPUs these benchmarks run on, from the
# vendor's datasheets (SXM parts; sparsity excluded). fp32 means CUDA cores.
PEAK_TFLOPS = {
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
}


class PreBatched(Dataset):
    """A fixed set of batches already on the device (as the paper samples its
    LLC data once); a DataLoader with batch_size=1 over it shuffles their
    order per pass and costs all three backends the same little to load."""

    def __init__(self, tensors, batch_size):
        n = len(tensors[0]) // batch_size
        self.batches = [tuple(t[i * batch_size:(i + 1) * batch_size] for t in tensors) for i in range(n)]

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def _only(items):
    return items[0]


def gpu_loader(tensors, batch_size, seed):
    loader = DataLoader(PreBatched(tensors, batch_size), batch_size=1, shuffle=True, collate_fn=_only,
                        generator=torch.Generator().manual_seed(seed))
    loader.seed = seed
    return loader


def rewind(case):
    """Reseed the case's shuffled loader so the next run sees the same
    batches, the init-loss batch first, as every other run. Without it each
    run's init loss came from another batch, and with nbeta ~ 22 the LM's
    LLC moved by several units from that alone (see the precision check)."""
    loader = case["loader"]
    loader.generator.manual_seed(loader.seed)


def pretrain(model, task, loss_fn, steps, batch_size, device, lr=1e-3):
    """A short AdamW run so that w* sits near a minimum, as the checkpoints a
    user sweeps do: at a random initialisation SGLD chains at the paper's
    step sizes diverge and the LLCs the backends report are not comparable."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model, task.train_batch(t, batch_size, device)).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return float(loss_fn(model, task.train_batch(steps, batch_size, device)).detach())


def lr_case(chains, device, quick, train_steps=0):
    torch.manual_seed(0)
    model = models.InContextRegression().to(device)
    task = tasks.RegressionTask(seed=1)
    trained = pretrain(model, task, models.regression_loss, train_steps, 256, device)
    data = task.llc_batches(256 * (8 if quick else 64), 256 * (8 if quick else 64), device)[0]
    # The paper's main LR settings (its later sweep's eps 1e-3 diverged every
    # chain here after 500 training steps).
    return dict(name=f"lr-{chains}ch", model=model, loader=gpu_loader(data, 256, 2), train_steps=train_steps,
                train_loss=trained, loss_fn=models.regression_loss, chains=chains, epsilon=3e-4, nbeta=66.67,
                gamma=6.67)


def lm_case(chains, device, quick, train_steps=0):
    torch.manual_seed(0)
    vocab = 500 if quick else 5000
    model = models.AttentionOnlyLM(vocab=vocab, d_model=64 if quick else 256, heads=8, context=1024).to(device)
    task = tasks.SyntheticLanguage(vocab=vocab, context=(64 if quick else 256) + 1, seed=1)
    trained = pretrain(model, task, models.next_token_loss, train_steps, 16, device)
    data = task.llc_batches(16 * 16, 16 * 16, device)[0]
    # The paper's LM settings: eps 3e-3, gamma 300, nbeta 100 / ln 100.
    return dict(name=f"lm-{chains}ch", model=model, loader=gpu_loader(data, 16, 2), train_steps=train_steps,
                train_loss=trained, loss_fn=models.next_token_loss, chains=chains, epsilon=3e-3,
                nbeta=100 / math.log(100), gamma=300.0)


def flops_per_chain_step(case, device):
    batch = next(iter(case["loader"]))
    model = case["model"]
    with FlopCounterMode(display=False) as counter:
        case["loss_fn"](model, batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_llcfast(case, steps, device, loader=None, **kw):
    rewind(case)
    sync(device)
    started = time.perf_counter()
    r = llcfast.estimate_llc(case["model"], loader if loader is not None else case["loader"], case["loss_fn"],
                             num_chains=case["chains"],
                             num_draws=steps, epsilon=case["epsilon"], nbeta=case["nbeta"], gamma=case["gamma"],
                             num_burnin=0, seed=0, device=device, progress=False, trust_checks=False,
                             draw_batches="step", **kw)  # devinterp's draws: the same passes
    sync(device)
    return time.perf_counter() - started, r


def profile_run(case, device, kw, steps, path):
    """Where ``steps`` steps of one estimate_llc run (``kw``: the fast engine's
    settings, or backend="reference") spend their time: the ops by device
    time and by host time, for the notes that steer the next change. The
    host table is what tells launch-bound and Python-bound steps apart."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run_llcfast(case, steps, device, **kw)
    averages = prof.key_averages()
    tables = [averages.table(sort_by="self_cuda_time_total", row_limit=25)] if device.type == "cuda" else []
    tables.append(averages.table(sort_by="self_cpu_time_total", row_limit=25))
    with open(path, "w") as f:
        f.write("\n\n".join(tables))
    return tables[0]


def in_order(case):
    """The case's batches in a fixed order (no shuffling). devinterp 1.3.2
    pickles the loader once per chain, so with a shuffled loader every chain
    replays one and the same order, and its chains' spread leaves out the
    batch-order error; llcfast gives each chain its own pass. With a fixed
    order both see the same init batches and the same sequence in every
    chain, the batch-order error is common to the two estimates, and their
    difference is judged by the chains' spreads alone."""
    loader = case["loader"]
    return DataLoader(loader.dataset, batch_size=1, shuffle=False, collate_fn=_only)


def run_devinterp(case, steps, device):
    from devinterp.optim import SGLD
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary
    sync(device)
    started = time.perf_counter()
    r = estimate_learning_coeff_with_summary(
        case["model"], in_order(case), evaluate=case["loss_fn"], sampling_method=SGLD,
        optimizer_kwargs=dict(lr=case["epsilon"], localization=case["gamma"], nbeta=case["nbeta"]),
        num_chains=case["chains"], num_draws=steps, device=device, verbose=False)
    sync(device)
    return time.perf_counter() - started, float(r["llc/mean"]), float(r["llc/std"])


def measure(case, device, steps, slow_steps, ref_steps, precisions, skip_devinterp, profile_dir=None):
    chains = case["chains"]
    out = {"case": case["name"], "parameters": models.count_parameters(case["model"]), "chains": chains,
           "steps_fast": steps, "steps_devinterp": slow_steps, "steps_reference": ref_steps,
           "train_steps": case["train_steps"], "train_loss": case["train_loss"], "epsilon": case["epsilon"],
           "nbeta": case["nbeta"], "gamma": case["gamma"],
           "flops_per_chain_step": flops_per_chain_step(case, device), "runs": {}}
    for variant in precisions:  # "bf16", "bf16+compile" (compile=True), "bf16+autotune", "bf16+sdpa", ...
        precision, *extras = variant.split("+")
        kw = dict(precision=precision, compile=next((COMPILE_VARIANTS[e] for e in extras if e in COMPILE_VARIANTS),
                                                    False))
        models.set_attention(case["model"], "sdpa" if "sdpa" in extras else "matmul")  # same weights
        # +nofold: torch's own vmap of SDPA (which runs its backward chain by chain), of layer norm (a
        # weightless norm, a multiply and an add) and of linear layers (a batched matmul and a bias add);
        # +nonorm, +nolinear and +nohead (the LM's fused unembedding and loss) leave out one each
        off = set() if "nofold" in extras else None
        try:
            with settings.using(settings.current().widened()), chain_fold.folding(off, layer_norm=set() if "nonorm" in extras else None,
                                    linear=set() if "nolinear" in extras else None,
                                    head=set() if "nohead" in extras else None), \
                    bf16_copies.left_out("nocopies" in extras):
                run_llcfast(case, 3, device, **kw)  # warm-up: lazy init, graph pools, kernels, compilation
                wall, r = run_llcfast(case, steps, device, **kw)
                if profile_dir:  # before the attention is set back: a "+sdpa" profile must run the sdpa model
                    profile_run(case, device, kw, min(steps, 50),
                                os.path.join(profile_dir, f"profile_{case['name']}_{variant.replace('+', '-')}.txt"))
        finally:
            models.set_attention(case["model"], "matmul")
        sampling = r.timings.get("sampling_s", wall)
        tflops = out["flops_per_chain_step"] * chains * steps / sampling / 1e12
        out["runs"][f"llcfast-{variant}"] = dict(
            ms_per_chain_step=1e3 * wall / (chains * steps), sampling_ms_per_chain_step=1e3 * sampling / (chains * steps),
            llc_mean=r.llc_mean, llc_std=r.llc_std, diverged=list(r.diagnostics.get("diverged_chains", [])),
            backend=r.config.get("backend"), cuda_graphs=r.config.get("cuda_graphs"),
            compiled=r.config.get("compile", False), timings=r.timings, bf16_copies=r.config.get("bf16_copies"),
            **{key: r.config.get(key, False) for key in chain_fold.CONFIG_KEYS.values()},
            achieved_tflops=tflops, peak_fraction=peak_fraction(device, precision, tflops))
    fp32, bf16 = out["runs"].get("llcfast-fp32"), out["runs"].get("llcfast-bf16")
    if fp32 and bf16:  # same batches, same noise: does bf16 move the estimate beyond the chains' spread?
        se = fp32["llc_std"] / chains ** 0.5  # the goal: within the fp32 estimate's standard error
        diff = bf16["llc_mean"] - fp32["llc_mean"]
        out["bf16_vs_fp32"] = dict(difference=diff, fp32_standard_error=se, within=bool(abs(diff) <= se))
    wall, r = run_llcfast(case, ref_steps, device, backend="reference")
    if profile_dir:  # on the H100 the reference took 10-20x devinterp's time a chain-step, on 2 CPU cores 1.1-1.4x
        # Two chains of two steps: the same ops as every chain's, at a fraction of the device time.
        profile_run(dict(case, chains=min(chains, 2)), device, dict(backend="reference"), min(ref_steps, 2),
                    os.path.join(profile_dir, f"profile_{case['name']}_reference.txt"))
    out["runs"]["llcfast-reference"] = dict(ms_per_chain_step=1e3 * wall / (chains * ref_steps), llc_mean=r.llc_mean,
                                            llc_std=r.llc_std, diverged=list(r.diagnostics.get("diverged_chains", [])))
    if not skip_devinterp:
        try:
            run_devinterp(case, 2, device)
            wall, mean, std = run_devinterp(case, slow_steps, device)
            out["runs"]["devinterp-1.3.2"] = dict(ms_per_chain_step=1e3 * wall / (chains * slow_steps),
                                                  llc_mean=mean, llc_std=std)
            # The same estimate at devinterp's step count, on the same batches in
            # the same order (in_order) with the same init loss (one batch per
            # chain, devinterp's default): only the noise differs, so the two
            # should agree within their combined standard error.
            _, same = run_llcfast(case, slow_steps, device, loader=in_order(case))
            se = ((same.llc_std ** 2 + std ** 2) / chains) ** 0.5
            out["same_steps_as_devinterp"] = dict(steps=slow_steps, llcfast_llc=same.llc_mean,
                                                  llcfast_std=same.llc_std, devinterp_llc=mean, devinterp_std=std,
                                                  z=(same.llc_mean - mean) / se if se > 0 else None)
        except RuntimeError as exc:  # devinterp raises on the first NaN loss of any chain
            out["devinterp_error"] = str(exc)
            print(f"{case['name']:8s} devinterp-1.3.2 failed: {exc}", flush=True)
    base = out["runs"].get("devinterp-1.3.2", out["runs"]["llcfast-reference"])["ms_per_chain_step"]
    for run in out["runs"].values():
        run["speedup_vs_devinterp" if not skip_devinterp else "speedup_vs_reference"] = base / run["ms_per_chain_step"]
    return out


# --precisions suffixes: "bf16+compile" runs estimate_llc(compile=True), and so on;
# "+sdpa" switches the model's attention to scaled_dot_product_attention;
# "+nofold" leaves SDPA, layer norm and linear layers to torch's vmap instead
# of the engine's folds over chains and the LM's unembedding and loss
# unfused, "+nonorm" the layer norm only, "+nolinear" the linear layers only
# and "+nohead" the unembedding and loss only; "+nocopies" casts every
# weight to bf16 each step (no bf16 copies written by the step).
FOLD_VARIANTS = ("nofold", "nonorm", "nolinear", "nohead")
OTHER_VARIANTS = ("nocopies",)
PARTIAL_FOLD_VARIANTS = ("nonorm", "nolinear", "nohead")
COMPILE_VARIANTS = {"compile": True, "autotune": "max-autotune-no-cudagraphs"}


def variant_error(variant: str):
    """Why a --precisions entry is not allowed, or None."""
    precision, *extras = variant.split("+")
    if precision not in ("fp32", "tf32", "bf16"):
        return f"{variant!r}: the precision must be fp32, tf32 or bf16"
    unknown = [e for e in extras if e not in COMPILE_VARIANTS and e != "sdpa" and e not in FOLD_VARIANTS
               and e not in OTHER_VARIANTS]
    if unknown or len(set(extras)) != len(extras) or sum(e in COMPILE_VARIANTS for e in extras) > 1:
        return (f"{variant!r}: add at most one of +compile, +autotune, and optionally +sdpa and +nofold, or "
                "any of +nonorm, +nolinear and +nohead, and +nocopies")
    for one in PARTIAL_FOLD_VARIANTS:
        if "nofold" in extras and one in extras:
            return f"{variant!r}: +nofold already leaves out every fold; drop +{one}"
    return None


def peak_fraction(device, precision, tflops):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return tflops / peaks[precision]
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", default="lr-8,lr-32,lm-8", help="comma-separated from lr-8, lr-32, lm-8")
    p.add_argument("--steps", type=int, default=400, help="steps per chain for the fast engine")
    p.add_argument("--slow-steps", type=int, default=60, help="steps per chain for devinterp")
    p.add_argument("--ref-steps", type=int, default=10,
                   help="steps per chain for llcfast's reference (10-20x devinterp's time a chain-step on the H100; "
                        "--profile says where it goes)")
    p.add_argument("--train-steps", type=int, default=500, help="AdamW steps that move w* near a minimum first")
    p.add_argument("--profile", action="store_true",
                   help="also write torch.profiler tables of the fast engine and the reference")
    p.add_argument("--precisions", default="fp32,bf16",
                   help="comma-separated fp32, tf32, bf16, each optionally +compile (estimate_llc(compile=True)) "
                        "or +autotune (compile='max-autotune-no-cudagraphs'), and +sdpa (the models' attention "
                        "through scaled_dot_product_attention); +nofold: without the engine's folds of the chains "
                        "into one SDPA and one layer-norm call each way and of the linear layers' bias adds into "
                        "their matmuls, and the LM's unembedding and loss unfused; +nonorm: without the layer-norm "
                        "fold, +nolinear: without the linear fold, +nohead: the unembedding and loss unfused; "
                        "+nocopies: every weight cast to bf16 each step instead of the step's bf16 copies")
    p.add_argument("--skip-devinterp", action="store_true")
    p.add_argument("--quick", action="store_true", help="small data and LM, few steps: a smoke run")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/llc_<gpu>_<date>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        args.steps, args.slow_steps, args.ref_steps = min(args.steps, 20), min(args.slow_steps, 5), min(args.ref_steps, 3)
        args.train_steps = min(args.train_steps, 20)
    makers = {"lr-8": lambda: lr_case(8, device, args.quick, args.train_steps),
              "lr-32": lambda: lr_case(32, device, args.quick, args.train_steps),
              "lm-8": lambda: lm_case(8, device, args.quick, args.train_steps)}
    bad = [e for e in map(variant_error, args.precisions.split(",")) if e]
    if bad:
        p.error("; ".join(bad))
    unknown = [c for c in args.cases.split(",") if c not in makers]
    if unknown:
        p.error(f"unknown cases {unknown}; choose from {sorted(makers)}")
    warnings.filterwarnings("ignore", message="the loader holds")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="default nbeta is undefined")  # devinterp; nbeta is passed
    warnings.filterwarnings("ignore", message="Using passed in nbeta")
    warnings.filterwarnings("ignore", message="You are taking more sample batches")
    results = []
    for name in args.cases.split(","):
        profile_dir = os.path.dirname(os.path.abspath(args.out)) if args.profile and args.out else None
        if profile_dir:
            os.makedirs(profile_dir, exist_ok=True)
        res = measure(makers[name](), device, args.steps, args.slow_steps, args.ref_steps,
                      args.precisions.split(","), args.skip_devinterp, profile_dir)
        results.append(res)
        for run, v in res["runs"].items():
            print(f"{res['case']:8s} {run:20s} {v['ms_per_chain_step']:8.3f} ms/chain-step  "
                  + (f"(sampling {v['sampling_ms_per_chain_step']:.3f})  " if "sampling_ms_per_chain_step" in v else "")
                  + f"x{v.get('speedup_vs_devinterp', v.get('speedup_vs_reference')):6.1f}  "
                  f"LLC {v['llc_mean']:.3f} ± {v['llc_std']:.3f}"
                  + (f"  {v['achieved_tflops']:.1f} TFLOP/s" if "achieved_tflops" in v else "")
                  + (f" ({100 * v['peak_fraction']:.1f}% of peak)" if v.get("peak_fraction") else "")
                  + (f"  diverged {v['diverged']}" if v.get("diverged") else ""), flush=True)
        if "same_steps_as_devinterp" in res:
            d = res["same_steps_as_devinterp"]
            print(f"{res['case']:8s} at {d['steps']} steps: llcfast {d['llcfast_llc']:.3f} ± {d['llcfast_std']:.3f}, "
                  f"devinterp {d['devinterp_llc']:.3f} ± {d['devinterp_std']:.3f} (z = {d['z']:+.2f})")
        if "bf16_vs_fp32" in res:
            d = res["bf16_vs_fp32"]
            print(f"{res['case']:8s} bf16 - fp32 LLC: {d['difference']:+.3f} (fp32 standard error {d['fp32_standard_error']:.3f}"
                  f"{', within' if d['within'] else ', NOT within'})")
    gpu = device_name(device)
    report = {"benchmark": "estimate_llc", "device": gpu, "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "quick": args.quick, "build": llcfast.build_info(),
              "devinterp": None if args.skip_devinterp else __import__("devinterp").__version__
              if hasattr(__import__("devinterp"), "__version__") else "1.3.2", "cases": results}
    save_report(report, args.out, "llc")


if __name__ == "__main__":
    main()
