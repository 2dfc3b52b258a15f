"""What one fast-engine step of the paper's models asks of a GPU, counted
without one: every ATen kernel of the batched loss-and-gradient pass and the
fused SGLD update, with its bytes read and written and its matmul FLOPs,
traced on fake tensors (no memory, no arithmetic) as CUDA would run them.

    python benchmarks/bench_traffic.py            # JSON into benchmarks/results/
    python benchmarks/bench_traffic.py --quick    # the small models

It also counts the Hessian passes of bench_hessian.py: what each probe adds
to a vmapped pass in either HVP mode, what the pass shares, and one HVP of
the PyHessian-style loop (a double backward through the gradient's graph).

bf16 follows CUDA autocast's policy (matmuls in bf16; softmax, log_softmax,
layer norm and the reductions it lists in fp32), applied at the torch-function
level because CPU autocast has another list. The fused loss is counted as it
runs on CUDA (its kernel), and as log_softmax + gather for comparison. The
floor is a roofline: each kernel costs the larger of its bytes over the
datasheet bandwidth and its FLOPs over the datasheet peak. It leaves out
launch gaps and kernels slower than the roofline, so measured times sit above
it; it is a model, not a measurement. attention="sdpa" is traced as the
engine runs it on CUDA, with the chains folded into one call each way
(llcfast.fastpath.attention), through torch's CPU flash kernel: its bytes stand
in for the CUDA kernels', which likewise never write the T x T scores.

compile=True's pass is counted too (``pass`` "compiled"): Inductor lowers
and fuses the same pass for a CUDA device, without one (inductor_trace.py),
and its scheduled kernels are counted with its own estimates. The loss is
the form torch.compile traces (fused_loss.token_nll_for_inductor); the
attention is matmul (the CPU trace of SDPA holds CPU kernels).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import os
import sys

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import llcfast  # noqa: E402
from llcfast.fastpath import fold as chain_fold, head as fused_head, token_loss as fused_loss
from llcfast.pipeline import models
from llcfast import ops  # noqa: E402
from llcfast.fastpath import bf16_copies, settings  # noqa: E402
from llcfast.engine.functional import chain_loss, vmapped_grads  # noqa: E402
from llcfast.engine.hvp import HVP, HVP_MODES  # noqa: E402
from llcfast.engine.hvp import _pass as hvp_pass  # noqa: E402
from bench_llc import PEAK_TFLOPS, lm_case, lr_case  # noqa: E402
from inductor_trace import Unavailable, inductor_rows  # noqa: E402
from results_io import save_report  # noqa: E402

HBM_GBPS = {"H100": 3350.0}  # H100 SXM datasheet
# Ops that move no data: views, metadata, allocation.
FREE = {"view", "_unsafe_view", "as_strided", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze",
        "select", "slice", "alias", "unbind", "split", "split_with_sizes", "detach", "lift_fresh", "_reshape_alias",
        "diagonal", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "unfold", "sym_size",
        "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size"}
_LOW = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.mm, torch.baddbmm,
        torch.addmm, torch.Tensor.bmm, torch.Tensor.mm}
_FP32 = {"softmax", "log_softmax", "layer_norm", "sum", "exp", "log", "logsumexp", "pow", "mse_loss",
         "cross_entropy", "nll_loss", "cumsum", "norm", "rsqrt", "reciprocal"}


class CudaAutocastBf16(TorchFunctionMode):
    """CUDA autocast's bf16 policy at the torch-function level. The fused
    head, which casts its product's operands itself where autocast is on
    (not a torch function the mode could see), is told bf16 too."""

    def __enter__(self):
        self._head_autocast = fused_head.autocast_dtype
        fused_head.autocast_dtype = lambda device_type: torch.bfloat16
        return super().__enter__()

    def __exit__(self, *exc):
        fused_head.autocast_dtype = self._head_autocast
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOW:
            src, dst = torch.float32, torch.bfloat16
        elif getattr(func, "__name__", "") in _FP32:
            src, dst = torch.bfloat16, torch.float32
        else:
            return func(*args, **kwargs)

        def cast(t):
            return t.to(dst) if isinstance(t, torch.Tensor) and t.dtype == src else t

        return func(*tree_map(cast, args), **tree_map(cast, kwargs))


# The LM's loss as each pass runs it: the unembedding and loss fused
# (fused_head), the loss kernel after torch's unembedding, the twin,
# torch.compile's form.
LOSS_LABELS = {"head": "fused head", True: "fused kernel", False: "log_softmax + gather", None: "Inductor form"}


def loss_label(fused) -> str:
    # Where torch has no vmap rules for the loss kernel the engine runs the twin (the fused head needs none).
    if fused == "head":
        return LOSS_LABELS["head"]
    return LOSS_LABELS[fused and fused_loss.VMAP_RULES if fused is not None else None]


def _nbytes(t: torch.Tensor) -> int:
    # An expanded (stride-0) operand is read once, not once per broadcast copy.
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


class KernelLog(TorchDispatchMode):
    """(op, FLOPs, bytes) of every kernel that reaches the backend."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in FREE or func.namespace == "prim":
            return out
        # an out= tensor is written, not read (chain_linear's addmm per chain)
        read = (args, {k: v for k, v in kwargs.items() if k != "out"})
        ins = [a for a in tree_flatten(read)[0] if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        written = outs
        if name.endswith("_") and not name.startswith("_"):  # in place: writes its first argument
            written = [t for t in tree_flatten(args[0])[0] if isinstance(t, torch.Tensor)]
        flops = flop_registry[func.overloadpacket](*args, **kwargs, out_val=out) \
            if func.overloadpacket in flop_registry else _cpu_attention_flops(name, args)
        moved = sum(map(_nbytes, ins)) + sum(map(_nbytes, written))
        if name == "chain_layer_norm_backward":  # its second kernel (the weight's and bias's sums) reads g and x again
            moved += _nbytes(args[0]) + _nbytes(args[1])
        self.rows.append((name, int(flops), moved))
        return out


def _cpu_attention_flops(name: str, args) -> int:
    # torch's FLOP table covers the CUDA attention kernels only; the CPU
    # kernel standing in for them does the same matmuls.
    if name == "_scaled_dot_product_flash_attention_for_cpu":
        return sdpa_flop_count(args[0].shape, args[1].shape, args[2].shape)
    if name == "_scaled_dot_product_flash_attention_for_cpu_backward":
        return sdpa_backward_flop_count(args[0].shape, args[1].shape, args[2].shape, args[3].shape)
    return 0


def trace_step(case: dict, precision: str, fused, copies: bool = True):
    """The kernels of one step of the fast engine on ``case`` (bench_llc's);
    ``fused``: "head" (the engine's pass on CUDA), True (the loss kernel,
    the unembedding and loss unfused) or False (the loss's twin). In bf16
    the weights whose one use is autocast's cast enter as the step's bf16
    copies, as in the engine's eager pass (``copies`` False: cast every
    step)."""
    model, chains = case["model"], case["chains"]
    batch = next(iter(case["loader"]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    loss = chain_loss(model, case["loss_fn"], names)
    shapes = [tuple(p.shape) for p in model.parameters()]
    log = KernelLog()
    with settings.using(settings.current().replace(token_loss=("cpu", "cuda") if fused else (),
                                                   bf16_copies=("cpu", "cuda"))):
        # SDPA, layer norm and linear layers folded over chains, as the engine runs them on CUDA
        with FakeTensorMode(), chain_fold.folding({"cpu", "cuda"}, head=None if fused == "head" else set()):
            params = [torch.empty((chains,) + s) for s in shapes]
            centers = [torch.empty(s) for s in shapes]
            fake_batch = _fake_batch(batch, (chains,))
            working, bf16 = _bf16_copies(loss, params, batch, precision, copies)
            # autocast's casts above the folds, as CUDA's autocast sits below torch functions: a fold sees
            # the operands autocast gives the function it takes over
            with log, fused_loss.first_order(), _autocast(precision):
                try:
                    grads, _ = vmapped_grads(loss, 0)(working, fake_batch)
                except RuntimeError as exc:
                    if "INTERNAL ASSERT FAILED" not in str(exc):
                        raise
                    # torch 2.5: the fused loss's vmap rule on fake tensors
                    # under a dispatch mode (real tensors run it).
                    raise Unavailable(f"torch {torch.__version__}: the fake trace stopped on torch's own assert: "
                                      f"{str(exc).splitlines()[0][:160]}") from None
            with log:
                ops.sgld_step_(params, [g.contiguous() for g in grads], centers, eps=case["epsilon"],
                               nbeta=case["nbeta"], gamma=case["gamma"], seed=0, step=0, bf16_copies=bf16)
    return log.rows


def _bf16_copies(loss, params, batch, precision: str, copies: bool):
    """(the parameters the pass takes, the step's bf16_copies) as the engine
    chooses them (llcfast.fastpath.bf16_copies), for stacked ``params``; the
    choice is traced on fake tensors."""
    if precision != "bf16" or not copies:
        return tuple(params), None
    with FakeTensorMode(allow_non_fake_inputs=True), fused_loss.first_order(False), _autocast(precision):
        use = bf16_copies.cast_only(loss, [torch.empty(p.shape[1:]) for p in params], _fake_batch(batch))
    made = bf16_copies.make_copies(params, use)
    return bf16_copies.pass_inputs(params, made), made


def trace_compiled_step(case: dict, precision: str):
    """The kernels of one step of the fast engine with compile=True on
    ``case``: Inductor's kernels for the batched pass (raises Unavailable
    where this torch cannot be driven without a GPU), then the fused update."""
    model, chains = case["model"], case["chains"]
    batch = next(iter(case["loader"]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [tuple(p.shape) for p in model.parameters()]
    params = tuple(torch.empty((chains,) + s) for s in shapes)
    rows = inductor_rows(vmapped_grads(chain_loss(model, case["loss_fn"], names), 0),
                         (params, _fake_batch(batch, (chains,))), lambda: _autocast(precision))
    log = KernelLog()
    with FakeTensorMode():
        params = [torch.empty((chains,) + s) for s in shapes]
        with log:
            ops.sgld_step_(params, [torch.empty_like(p) for p in params], [torch.empty(s) for s in shapes],
                           eps=case["epsilon"], nbeta=case["nbeta"], gamma=case["gamma"], seed=0, step=0)
    return rows + log.rows


def trace_hvp(case: dict, precision: str, probes: int, mode: str = "reverse-over-reverse"):
    """The kernels of one llcfast Hessian pass on ``case``'s model at its
    weights: ``probes`` HVPs in ``mode`` vmapped over the probes, as
    hessian_trace runs them (the primal forward and backward once)."""
    model, batch = case["model"], next(iter(case["loader"]))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    log = KernelLog()
    with FakeTensorMode(allow_non_fake_inputs=True):
        centers = [torch.empty(p.shape) for _, p in named]
        hvp = HVP(model, case["loss_fn"], [_fake_batch(batch)], [n for n, _ in named], centers,
                  retain_graph=False)  # the vmapped passes a GPU runs, not a CPU's retained graph
        vecs = [torch.empty((probes,) + tuple(p.shape)) for _, p in named]
        with log, _autocast(precision):
            hvp._run(vecs, None, probes, hvp._batches[0], mode, eager=True)
    return log.rows


def trace_compiled_hvp(case: dict, precision: str, probes: int, mode: str = "reverse-over-reverse"):
    """trace_hvp's pass as compile=True runs it: Inductor's kernels (raises
    Unavailable where this torch cannot be driven without a GPU)."""
    model, batch = case["model"], next(iter(case["loader"]))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loss = chain_loss(model, case["loss_fn"], [n for n, _ in named])
    centers = tuple(torch.empty(p.shape) for _, p in named)
    vecs = tuple(torch.empty((probes,) + tuple(p.shape)) for _, p in named)
    return inductor_rows(hvp_pass(loss, mode, None, True), (centers, vecs, _fake_batch(batch)),
                         lambda: _autocast(precision))


def trace_loop_hvp(case: dict, precision: str):
    """The kernels of one HVP of a PyHessian-style loop (bench_hessian's):
    a double backward through the retained graph of the gradient."""
    from torch.func import functional_call
    model, loss_fn, batch = case["model"], case["loss_fn"], next(iter(case["loader"]))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    log = KernelLog()
    with FakeTensorMode(allow_non_fake_inputs=True):
        params = {n: torch.empty(p.shape, requires_grad=True) for n, p in named}

        class Swapped:  # loss_fn(model, batch) with the fake parameters
            def __call__(self, *args, **kwargs):
                return functional_call(model, params, args, kwargs)

        with _autocast(precision):
            loss = loss_fn(Swapped(), _fake_batch(batch))
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        v = [torch.empty(p.shape) for p in params.values()]
        with log:
            torch.autograd.grad(grads, list(params.values()), grad_outputs=v, retain_graph=True)
    return log.rows


def _autocast(precision: str):
    return CudaAutocastBf16() if precision == "bf16" else contextlib.nullcontext()


def _fake_batch(batch, lead: tuple = ()):
    """Zeros shaped like ``batch``'s tensors, with ``lead`` dimensions first."""
    return tuple(torch.zeros(lead + tuple(b.shape), dtype=b.dtype) for b in batch)


def _floor_s(rows, precision: str, gpu: str = "H100") -> float:
    bw, peak = HBM_GBPS[gpu] * 1e9, PEAK_TFLOPS[gpu]["fp32" if precision == "fp32" else precision] * 1e12
    return sum(max(b / bw, f / peak) for _, f, b in rows)


def summarize_hessian(case: dict, precision: str, mode: str, probes=(3, 7), per_pass: int = 100,
                      loop=None, compiled: bool = False) -> dict:
    """Per probe: what a pass of probes[1] adds over one of probes[0]
    (bytes, matmul FLOPs, roofline time; passes of 1 or 2 take other matmul
    and copy kernels, from 3 on the growth is linear); what every pass shares
    (the primal); the loop's HVP (``loop``: its trace_loop_hvp rows, which
    no mode changes); and the modelled rate at ``per_pass``."""
    trace = trace_compiled_hvp if compiled else trace_hvp
    small, large = (trace(case, precision, p, mode) for p in probes)
    loop = loop if loop is not None else trace_loop_hvp(case, precision)
    total = lambda rows, i: sum(r[i] for r in rows)  # noqa: E731
    k = probes[1] - probes[0]
    probe_gb = (total(large, 2) - total(small, 2)) / k / 1e9
    probe_gflop = (total(large, 1) - total(small, 1)) / k / 1e9
    probe_ms = 1e3 * (_floor_s(large, precision) - _floor_s(small, precision)) / k
    shared_ms = 1e3 * _floor_s(small, precision) - probes[0] * probe_ms
    loop_ms = 1e3 * _floor_s(loop, precision)
    llcfast_ms = probe_ms + shared_ms / per_pass
    return {"probe_GB": probe_gb, "probe_GFLOP": probe_gflop, "probe_floor_ms": probe_ms,
            "shared_GB": total(small, 2) / 1e9 - probes[0] * probe_gb, "shared_floor_ms": shared_ms,
            "loop_GB": total(loop, 2) / 1e9, "loop_GFLOP": total(loop, 1) / 1e9, "loop_floor_ms": loop_ms,
            "probes_per_pass": per_pass, "floor_ms_per_hvp": llcfast_ms, "max_hvps_per_s": 1e3 / llcfast_ms,
            "loop_max_hvps_per_s": 1e3 / loop_ms}


def summarize(rows, chains: int, precision: str, gpu: str = "H100", top: int = 6) -> dict:
    families = collections.defaultdict(lambda: [0, 0])
    for name, flops, nbytes in rows:
        families[name][0] += 1
        families[name][1] += nbytes
    floor_s = _floor_s(rows, precision, gpu)
    return {
        "kernels": len(rows),
        "matmul_GFLOP": sum(f for _, f, _ in rows) / 1e9,
        "matmul_GB": sum(b for _, f, b in rows if f) / 1e9,
        "other_GB": sum(b for _, f, b in rows if not f) / 1e9,
        "floor_ms_per_chain_step": 1e3 * floor_s / chains,
        "largest": {k: {"kernels": n, "GB": b / 1e9}
                    for k, (n, b) in sorted(families.items(), key=lambda kv: -kv[1][1])[:top]},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small models (a smoke run)")
    p.add_argument("--device", default="cpu", help="ignored: the trace needs no device (accepted for the suite)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/traffic_<date>.json)")
    args = p.parse_args(argv)
    cases = [lr_case(8, "cpu", args.quick), lr_case(32, "cpu", args.quick), lm_case(8, "cpu", args.quick)]
    rows, not_counted = [], []
    for case in cases:
        lm = case["name"].startswith("lm")
        # (attention, fused loss): as the engine runs now, then the alternatives.
        variants = [("matmul", "head"), ("matmul", True), ("matmul", False), ("sdpa", "head"), ("sdpa", True)] \
            if lm else [("matmul", True), ("sdpa", True)]
        for precision in ("fp32", "bf16"):
            for attention, fused in variants + [("matmul", None)]:  # None: compiled
                models.set_attention(case["model"], attention)
                try:
                    traced = trace_step(case, precision, fused) if fused is not None \
                        else trace_compiled_step(case, precision)
                except Unavailable as exc:
                    what = f"{case['name']} {precision} {attention} " + ("compiled" if fused is None else
                                                                         loss_label(fused))
                    not_counted.append(f"{what}: {exc}")
                    print(f"{what}: not counted ({exc})", flush=True)
                    continue
                finally:
                    models.set_attention(case["model"], "matmul")
                s = summarize(traced, case["chains"], precision)
                row = {"case": case["name"], "chains": case["chains"], "precision": precision,
                       "attention": attention, "pass": "eager" if fused is not None else "compiled",
                       "loss": loss_label(fused) if lm else "mse"}
                row.update(s)
                rows.append(row)
                print(f"{row['case']:8s} {precision} {row['pass']:8s} {attention:6s} {row['loss']:22s} kernels "
                      f"{s['kernels']:4d}  matmul {s['matmul_GFLOP']:7.1f} GFLOP {s['matmul_GB']:6.2f} GB  other "
                      f"{s['other_GB']:6.2f} GB  floor {s['floor_ms_per_chain_step']:.3f} ms/chain-step", flush=True)
    head = {"device": "H100 model", "torch": torch.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick,
            "llcfast": llcfast.__version__ if hasattr(llcfast, "__version__") else None,
            "bandwidth_GBps": HBM_GBPS["H100"], "peak_tflops": PEAK_TFLOPS["H100"]}
    save_report({"benchmark": "traffic", **head, "rows": rows, "not_counted": not_counted}, args.out,
                "traffic")
    hessian_rows = []
    for make in (lr_case, lm_case):  # bench_hessian's cases
        case = make(1, "cpu", args.quick)
        for precision in ("fp32", "bf16"):
            loop = trace_loop_hvp(case, precision)
            for mode, compiled in [(m, c) for c in (False, True) for m in HVP_MODES]:
                row = {"case": case["name"].split("-")[0], "precision": precision,
                       "pass": "compiled" if compiled else "eager", "hvp_mode": mode}
                try:
                    row.update(summarize_hessian(case, precision, mode, loop=loop, compiled=compiled))
                except Unavailable as exc:
                    print(f"hessian {row['case']} {precision} {mode} compiled: not counted ({exc})", flush=True)
                    continue
                hessian_rows.append(row)
                print(f"hessian {row['case']:3s} {precision} {row['pass']:8s} {mode:21s} per probe "
                      f"{row['probe_GB']:6.2f} GB {row['probe_GFLOP']:6.1f} GFLOP floor "
                      f"{row['probe_floor_ms']:.3f} ms; shared "
                      f"{row['shared_floor_ms']:.3f} ms; loop HVP {row['loop_GB']:6.2f} GB floor "
                      f"{row['loop_floor_ms']:.3f} ms  -> at most {row['max_hvps_per_s']:.0f} HVP/s vs the loop's "
                      f"{row['loop_max_hvps_per_s']:.0f}", flush=True)
    out = None if args.out is None else args.out.replace(".json", "") + "_hessian.json"
    save_report({"benchmark": "traffic_hessian", **head, "rows": hessian_rows}, out, "traffic_hessian")
    return 0


if __name__ == "__main__":
    sys.exit(main())
