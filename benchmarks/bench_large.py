"""The LLC of a GPT-2-size model (built from a config, randomly initialised,
nothing downloaded) on one GPU: llcfast in bf16 with its memory plan vs
devinterp 1.3.2 on the same settings, in one run.

    python benchmarks/bench_large.py                          # 124M and 774M, 4 chains x 100 draws
    python benchmarks/bench_large.py --sizes tiny --device cpu --draws 3   # a smoke run

Reported per size: wall time, ms per chain-step, peak memory, the memory
plan, model FLOP utilisation (6 x parameters x tokens per chain-step, the
standard dense-transformer count, over the measured bf16 matmul rate) and
the ratio to devinterp's ms per chain-step (devinterp runs fewer draws:
its per-step time is what is compared). Both sample the same loss, the
mean next-token cross-entropy: devinterp as the model's own ``.loss``,
llcfast as llcfast.pipeline.models.hf_next_token_loss, whose fused forms never write
fp32 logits (``--hf-loss`` gives llcfast the model's ``.loss`` too).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import llcfast  # noqa: E402
from llcfast.fastpath import fold as chain_fold  # noqa: E402
from llcfast.fastpath import bf16_copies, settings  # noqa: E402
from llcfast.pipeline.models import hf_next_token_loss  # noqa: E402
from results_io import device_name, save_report  # noqa: E402

SIZES = {  # GPT-2 family shapes
    "tiny": dict(n_embd=64, n_layer=2, n_head=4),
    "124M": dict(n_embd=768, n_layer=12, n_head=12),
    "774M": dict(n_embd=1280, n_layer=36, n_head=20),
}


# GPT-2's own activation, "gelu_new", is the tanh approximation of GELU spelled in eight elementwise torch ops,
# each a pass over the MLP's 4 x d-wide activations, forward and backward, in fp32 under bf16 autocast. On the
# traffic model of 124M (8 x 1024 tokens, 2 chains a pass, bf16) they double the roofline time: 34.3 ms a
# chain-step with them, 17.7 with "gelu_pytorch_tanh", the same function as one kernel (traffic_large.py). The
# benchmark runs the latter by default, as a user who wants speed should; --activation gelu_new the former.
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new")


def gpt2(size: str, context: int, activation: str = ACTIVATIONS[0], layers=None):
    """``layers``: fewer blocks than the size has, at its width."""
    import transformers
    torch.manual_seed(0)
    shape = dict(SIZES[size], **({"n_layer": layers} if layers else {}))
    config = transformers.GPT2Config(vocab_size=50257, n_positions=max(context, 1024), bos_token_id=0,
                                     eos_token_id=0, activation_function=activation, **shape)
    return transformers.GPT2LMHeadModel(config).eval()  # eval: no dropout, so chains see a fixed loss


def batches(n: int, batch: int, context: int, device):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 50257, (batch, context), generator=g).to(device)
        out.append({"input_ids": ids, "labels": ids})
    return out


def bf16_matmul_tflops(device) -> float:
    """The device's measured bf16 matmul rate (8192^3 on random data)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    return 10 * 2 * 8192 ** 3 / (start.elapsed_time(end) / 1e3) / 1e12


def run_devinterp(model, loader, chains, draws, device, eps, gamma, nbeta):
    from devinterp.optim import SGLD
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary

    def evaluate(m, batch):
        return m(**batch).loss, {}

    # devinterp computes a default nbeta from loader.batch_size even when nbeta is passed, so it needs a
    # DataLoader; batch_size=1 over the pre-made batches (its default then warns and is not used).
    loader = torch.utils.data.DataLoader(loader, batch_size=1, collate_fn=lambda items: items[0])
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimate_learning_coeff_with_summary(model, loader, evaluate=evaluate, sampling_method=SGLD,
                                             optimizer_kwargs=dict(lr=eps, localization=gamma, nbeta=nbeta),
                                             num_chains=chains, num_draws=draws, device=device, verbose=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def measure(size, args, device, peak_tflops):
    model = gpt2(size, args.context, args.activation).to(device)
    params = sum(p.numel() for p in model.parameters())
    loader = batches(8, args.batch, args.context, device)
    kw = dict(num_chains=args.chains, num_draws=args.draws, num_burnin=0, draw_batches="step", epsilon=1e-5,
              gamma=100.0, nbeta=30.0, seed=0,
              progress=False, device=device, precision=args.precision,
              activation_checkpointing=args.checkpointing, trust_checks=False)  # the sampling's speed alone
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = llcfast.estimate_llc(model, loader, None if args.hf_loss else hf_next_token_loss, **kw)
    wall = time.perf_counter() - started
    # llcfast's own warnings say why a run went slower (no CUDA graphs, a sequential fallback); kept, not shown
    notes = sorted({str(w.message).splitlines()[0][:300] for w in caught if str(w.message).startswith("llcfast")})
    tokens = args.batch * args.context
    ms = res.timings["ms_per_chain_step"]
    row = {"size": size, "parameters": params, "chains": args.chains, "draws": args.draws, "batch": args.batch,
           "context": args.context, "precision": args.precision, "checkpointing": args.checkpointing,
           "backend": res.config.get("backend"), "wall_s": wall, "ms_per_chain_step": ms,
           "llc_mean": res.llc_mean, "llc_std": res.llc_std, "peak_memory_GiB": res.timings.get("peak_memory_bytes", 0) / 2**30,
           "memory_plan": res.config.get("memory_plan"), "cuda_graphs": res.config.get("cuda_graphs"),
           "model_tflops": 6 * params * tokens / (ms / 1e3) / 1e12, "llcfast_warnings": notes,
           **{key: res.config.get(key, False) for key in chain_fold.CONFIG_KEYS.values()},
           "bf16_copies": bool(res.config.get("bf16_copies")),
           "activation": args.activation,
           "loss": "model's .loss" if args.hf_loss else "hf_next_token_loss"}
    row["mfu_vs_measured_bf16"] = row["model_tflops"] / peak_tflops
    if not args.skip_devinterp:
        steps = max(2, args.devinterp_draws)
        model.zero_grad(set_to_none=True)
        del res
        try:
            t = run_devinterp(model, loader, args.chains, steps, device, 1e-5, 100.0, 30.0)
        except torch.cuda.OutOfMemoryError as err:  # devinterp runs fp32 chain by chain, with no planner
            row["devinterp_error"] = f"out of memory: {str(err).splitlines()[0]}"
            print(f"{size:>5}: devinterp ran out of memory on these settings", flush=True)
        else:
            row["devinterp_ms_per_chain_step"] = 1e3 * t / (args.chains * steps)
            row["speedup_vs_devinterp"] = row["devinterp_ms_per_chain_step"] / ms
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", nargs="+", default=["124M", "774M"], choices=sorted(SIZES))
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--draws", type=int, default=100)
    p.add_argument("--devinterp-draws", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--precision", default="bf16", choices=["fp32", "tf32", "bf16"])
    p.add_argument("--skip-devinterp", action="store_true")
    p.add_argument("--checkpointing", action="store_true",
                   help="recompute each GPT-2 block in the backward pass (chains then run one after another); "
                        "model FLOPs stay 6 x params x tokens, so the recomputation counts against MFU")
    p.add_argument("--activation", default=ACTIVATIONS[0], choices=ACTIVATIONS,
                   help="the MLP's GELU: one fused kernel, or GPT-2's own eight elementwise ops (the same function)")
    p.add_argument("--no-fold", action="store_true",
                   help="leave GPT-2's SDPA, layer-norm and Conv1D calls to torch's vmap (which runs SDPA's backward "
                        "chain by chain, a layer norm as a weightless norm, a multiply and an add, and Conv1D as a "
                        "batched matmul and a bias add) instead of the engine's folds (llcfast.fastpath.fold)")
    p.add_argument("--no-norm-fold", action="store_true", help="leave out the layer-norm fold only")
    p.add_argument("--no-linear-fold", action="store_true",
                   help="leave out the linear fold only (Conv1D's bias added after a batched matmul, not inside "
                        "one matmul per chain)")
    p.add_argument("--no-head-fusion", action="store_true",
                   help="leave the unembedding and the loss unfused (the logits kept for the backward)")
    p.add_argument("--no-bf16-copies", action="store_true",
                   help="cast every weight to bf16 each step, as autocast does, instead of the bf16 copies the SGLD "
                        "step writes (llcfast.fastpath.bf16_copies)")
    p.add_argument("--hf-loss", action="store_true",
                   help="llcfast samples the model's own .loss (Hugging Face's cross-entropy: fp32 logits, "
                        "log-softmax and gather) instead of llcfast.pipeline.models.hf_next_token_loss, the same number")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    with settings.using(settings.current().widened()), chain_fold.folding(set() if args.no_fold else None, layer_norm=set() if args.no_norm_fold else None,
                            linear=set() if args.no_linear_fold else None,
                            head=set() if args.no_head_fusion else None), \
            bf16_copies.left_out(args.no_bf16_copies):
        run(args, device)


def run(args, device):
    peak = bf16_matmul_tflops(device)
    rows = []
    for size in args.sizes:
        row = measure(size, args, device, peak)
        rows.append(row)
        print(f"{size:>5}: {row['parameters'] / 1e6:.0f}M params, {row['wall_s']:.1f} s wall, "
              f"{row['ms_per_chain_step']:.1f} ms/chain-step, peak {row['peak_memory_GiB']:.1f} GiB, "
              f"MFU {100 * row['mfu_vs_measured_bf16']:.1f}% of {peak:.0f} TFLOP/s"
              + (f", x{row['speedup_vs_devinterp']:.1f} vs devinterp" if "speedup_vs_devinterp" in row else ""),
              flush=True)
        for note in row["llcfast_warnings"]:
            print(f"{size:>5}: {note}", flush=True)
        del row
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = device_name(device)
    save_report({"benchmark": "large_model", "device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                 "date": datetime.date.today().isoformat(), "bf16_matmul_tflops": peak, "rows": rows},
                args.out, "large")


if __name__ == "__main__":
    main()
