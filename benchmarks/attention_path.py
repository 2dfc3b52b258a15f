"""Which attention kernels a Hugging Face GPT-2 runs, and how much memory one
chain's loss and gradient take, under the transforms the fast engine uses:
plain autograd, torch.func's grad, vmap(grad) over stacked chains each
with its own batch, and that under the engine's first-order context, which
folds the chains into one SDPA call each way (llcfast.fastpath.attention).

On the H100 (2026-11-24) the planner measured 22.1 GB above the parameters
for one chain of GPT-2 774M at 2 x 1024 tokens in bf16. Saved tensors
counted on a CPU (1- and 2-layer models at that width), plus the fp32
gradients and bf16 weight copies, come to about 13.7 GB with fused
attention and 22.4 GB with the T x T scores kept for the backward pass, so
this script asks the device which one it ran.

    python benchmarks/attention_path.py                       # GPT-2 124M shapes, cuda
    python benchmarks/attention_path.py --size tiny --device cpu
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.func import functional_call, grad, vmap

sys.path.insert(0, os.path.dirname(__file__))
from bench_large import SIZES, gpt2  # noqa: E402 (it puts the repository on the path, for llcfast)
from llcfast.engine.planner import measure_activation_bytes  # noqa: E402
from llcfast.fastpath.token_loss import first_order  # noqa: E402

KERNEL_WORDS = ("attention", "fmha", "flash", "cudnn", "softmax", "sdpa", "dot_product")


def attention_ops(run, device) -> list:
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
    # With its number of calls: torch's vmap runs the fused backward once per chain, the engine's fold once.
    keys = {f"{e.key[:90]} x{e.count}" for e in prof.key_averages() if any(w in e.key.lower() for w in KERNEL_WORDS)}
    return sorted(k for k in keys if "log_softmax" not in k.lower() and "logsoftmax" not in k.lower())  # the loss


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default="124M", choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--chains", type=int, default=2)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    model = gpt2(args.size, args.context).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.chains, args.batch, args.context), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def loss(p, x):
        return functional_call(model, p, (), dict(input_ids=x, labels=x)).loss

    def plain():
        with autocast:
            mine = {k: v.clone().requires_grad_() for k, v in params.items()}
            return torch.autograd.grad(loss(mine, ids[0]), list(mine.values()))

    def one_grad():
        with autocast:
            return grad(loss)(params, ids[0])

    def stacked():
        stack = {k: v.expand(args.chains, *v.shape).clone() for k, v in params.items()}
        with autocast:
            return vmap(grad(loss), in_dims=(0, 0))(stack, ids)

    def engine_pass():  # as the fast engine runs it: on CUDA, SDPA folded over chains (llcfast.fastpath.attention)
        with first_order():
            return stacked()

    print(f"GPT-2 {args.size}, attention implementation {model.config._attn_implementation!r}, "
          f"{args.batch} x {args.context} tokens a chain, bf16 autocast, torch {torch.__version__}")
    for name, run in [("plain autograd", plain), ("torch.func.grad", one_grad),
                      (f"vmap(grad), {args.chains} chains", stacked),
                      (f"engine's pass, {args.chains} chains", engine_pass)]:
        run()  # warm-up: lazy initialisation and workspaces stay out of the peak
        gib = measure_activation_bytes(run, device) / 2**30 if device.type == "cuda" else float("nan")
        print(f"{name:>24}: {gib:6.2f} GiB above the baseline; attention ops: {attention_ops(run, device)}")


if __name__ == "__main__":
    main()
