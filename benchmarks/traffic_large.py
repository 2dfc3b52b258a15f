"""What one fast-engine step of bench_large.py's GPT-2 asks of an H100,
counted without one (bench_traffic.py's fake-tensor trace and roofline), and
the model-FLOP utilisation the roofline allows: 6 x parameters x tokens a
chain-step over the floor's time, against the bf16 matmul rate issue 6 names
(about 790 TFLOP/s measured on these GPUs).

    python benchmarks/traffic_large.py            # 124M and 774M, both GELUs
    python benchmarks/traffic_large.py --quick    # the tiny GPT-2

Each size is traced at bench_large.py's batch in bf16 (CUDA autocast's
policy), with the chains a pass that the H100's plan ran, once with GPT-2's
own "gelu_new" (eight elementwise ops) and once with "gelu_pytorch_tanh"
(the same function, one kernel). A model, not a timing: measured times sit
above the floor (GPT-2 124M with gelu_new on the H100, 2026-11-24: 71.0 ms a
chain-step). It also counts the activations one chain saves for its
backward pass under CUDA's autocast policy (on the CPU, with real tensors).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_large import ACTIVATIONS, gpt2  # noqa: E402 (it puts the repository on the path)
from bench_large import SIZES as SIZES_BY_NAME  # noqa: E402
from bench_traffic import HBM_GBPS, PEAK_TFLOPS, CudaAutocastBf16, summarize, trace_step  # noqa: E402
from llcfast.fastpath import fold as chain_fold, settings, token_loss as fused_loss  # noqa: E402
from llcfast.engine.planner import measure_saved_tensors  # noqa: E402
from llcfast.pipeline.models import hf_next_token_loss  # noqa: E402
from results_io import save_report  # noqa: E402

MEASURED_BF16_TFLOPS = 790.0  # issue 6's figure; bench_large measured 776-786 on the H100
# (size, chains a pass, batch): the passes of the H100 runs of 2026-11-24 (GPT-2 124M's four chains are now
# planned as 2 + 2; 774M at batch 2 ran 2 a pass).
SIZES = [("124M", 2, 8), ("774M", 2, 2)]
QUICK_SIZES = [("tiny", 2, 2)]


def saved_bytes(size: str, batch: int, context: int, activation: str) -> int:
    """The bytes autograd saves for one chain's backward pass, as the engine
    runs it on CUDA (CUDA autocast's bf16 policy, the fused unembedding and loss),
    counted on the CPU with real tensors: models of 1 and 2 layers at full
    width give the base and the per-layer share, extrapolated to the size's
    depth. Gradients and the bf16 copies of the weights come on top."""
    ids = torch.zeros(batch, context + 1, dtype=torch.long)
    totals = []
    with settings.using(settings.current().replace(token_loss=("cpu", "cuda"))), chain_fold.folding(head={"cpu", "cuda"}):
        for layers in (1, 2):
            totals.append(_saved_by(gpt2(size, context, activation, layers=layers), ids))
    per_layer = totals[1] - totals[0]
    return totals[0] - per_layer + SIZES_BY_NAME[size]["n_layer"] * per_layer


def _saved_by(model, ids) -> int:
    with CudaAutocastBf16(), fused_loss.first_order(fold=False):
        return measure_saved_tensors(lambda: hf_next_token_loss(model, ids))[0]


def row_for(size: str, chains: int, batch: int, context: int, activation: str) -> dict:
    model = gpt2(size, context, activation)
    case = dict(model=model, loss_fn=hf_next_token_loss, chains=chains, epsilon=1e-5, nbeta=30.0, gamma=100.0,
                loader=[(torch.zeros(batch, context + 1, dtype=torch.long),)])
    s = summarize(trace_step(case, "bf16", "head"), chains, "bf16")
    params = sum(p.numel() for p in model.parameters())
    model_gflop = 6 * params * batch * context / 1e9
    floor_s = s["floor_ms_per_chain_step"] / 1e3
    return {"case": f"gpt2-{size}", "parameters": params, "chains": chains, "batch": batch, "context": context,
           "precision": "bf16", "activation": activation, **s, "model_GFLOP": model_gflop,
           "mfu_at_floor": model_gflop * 1e9 / floor_s / (MEASURED_BF16_TFLOPS * 1e12),
           "saved_GB_per_chain": saved_bytes(size, batch, context, activation) / 1e9}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tiny GPT-2 at a short context (a smoke run)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/traffic_large_<date>.json)")
    args = p.parse_args(argv)
    context = 64 if args.quick else 1024
    rows = []
    for size, chains, batch in QUICK_SIZES if args.quick else SIZES:
        for activation in ACTIVATIONS:
            row = row_for(size, chains, batch, context, activation)
            rows.append(row)
            print(f"{row['case']:10s} {activation:18s} {chains} chains x {batch} x {context} tokens: kernels "
                  f"{row['kernels']:5d}  matmul {row['matmul_GB']:6.1f} GB  other {row['other_GB']:6.1f} GB  floor "
                  f"{row['floor_ms_per_chain_step']:7.2f} ms/chain-step  MFU at the floor "
                  f"{100 * row['mfu_at_floor']:.0f}%  saved for the backward "
                  f"{row['saved_GB_per_chain']:.2f} GB a chain", flush=True)
    save_report({"benchmark": "traffic_large", "device": "H100 model", "torch": torch.__version__,
                 "date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick,
                 "bandwidth_GBps": HBM_GBPS["H100"], "peak_tflops": PEAK_TFLOPS["H100"],
                 "measured_bf16_tflops": MEASURED_BF16_TFLOPS, "rows": rows}, args.out, "traffic_large")
    return 0


if __name__ == "__main__":
    sys.exit(main())
