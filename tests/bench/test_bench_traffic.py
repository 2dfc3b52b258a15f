"""benchmarks/bench_traffic.py: its byte and FLOP counts on ops with known
answers, and the comparisons its table rests on."""
import contextlib
import os
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import bench_traffic  # noqa: E402
from bench_llc import lm_case  # noqa: E402
from inductor_trace import Unavailable, inductor_rows  # noqa: E402

from conftest import requires_extension  # noqa: E402
from llcfast.fastpath import token_loss as fused_loss  # noqa: E402


def test_counts_bytes_and_flops_of_known_ops():
    log = bench_traffic.KernelLog()
    with FakeTensorMode():
        a, b = torch.empty(1000), torch.empty(1000)
        x, w = torch.empty(64, 32), torch.empty(32, 16)
        with log:
            a + b  # reads 2 x 4000 bytes, writes 4000
            x @ w
            a.expand(8, 1000).sum(0)  # an expanded operand is read once
            a.view(10, 100).t()  # views move nothing
            out = torch.empty(64, 16)
            torch.addmm(torch.empty(16), x, w, out=out)  # out= is written, not read (chain_linear's addmm)
    names = [r[0] for r in log.rows]
    assert names == ["add", "mm", "sum", "addmm"]
    assert log.rows[0][1:] == (0, 12000)
    assert log.rows[1][1] == 2 * 64 * 32 * 16
    assert log.rows[2][2] == 4000 + 4000
    assert log.rows[3][2] == 4 * (16 + 64 * 32 + 32 * 16 + 64 * 16)


@requires_extension
@pytest.mark.skipif(not fused_loss.VMAP_RULES, reason=f"torch {torch.__version__} has no "
                    "torch.library.register_vmap (torch >= 2.5): the engine runs the fused loss's twin")
@pytest.mark.filterwarnings("ignore:the loader holds")
def test_fused_loss_and_bf16_show_in_the_counts():
    case = lm_case(2, "cpu", quick=True)
    with count_or_skip():
        fused_rows = bench_traffic.trace_step(case, "fp32", True)
    unfused_rows = bench_traffic.trace_step(case, "fp32", False)
    assert {"token_nll", "token_nll_backward"} <= {r[0] for r in fused_rows}
    assert "_log_softmax" in {r[0] for r in unfused_rows} and "_log_softmax" not in {r[0] for r in fused_rows}
    fused, unfused = (bench_traffic.summarize(rows, 2, "fp32") for rows in (fused_rows, unfused_rows))
    bf16 = bench_traffic.summarize(bench_traffic.trace_step(case, "bf16", True), 2, "bf16")
    assert fused["other_GB"] < unfused["other_GB"]
    assert fused["matmul_GFLOP"] == pytest.approx(unfused["matmul_GFLOP"])
    assert bf16["matmul_GB"] == pytest.approx(fused["matmul_GB"] / 2, rel=0.05)  # same matmuls, 2-byte operands
    assert bf16["kernels"] > fused["kernels"]  # autocast's casts


@requires_extension
@pytest.mark.filterwarnings("ignore:the loader holds")
def test_the_fused_head_saves_a_pass_over_the_logits():
    case = lm_case(2, "cpu", quick=True)
    with count_or_skip():
        head_rows = bench_traffic.trace_step(case, "bf16", "head")
        kernel_rows = bench_traffic.trace_step(case, "bf16", True)
    names = [r[0] for r in head_rows]
    assert "token_nll_grad_" in names and "token_nll" not in names and "token_nll_backward" not in names
    head, kernel = (bench_traffic.summarize(rows, 2, "bf16") for rows in (head_rows, kernel_rows))
    # the logits: [2 chains, 16 x 256 rows... quick: as lm_case builds them], bf16
    model, batch = case["model"], next(iter(case["loader"]))
    tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
    logits_bytes = 2 * tokens.shape[0] * (tokens.shape[1] - 1) * model.unembed.out_features * 2
    saved = (kernel["other_GB"] + kernel["matmul_GB"] - head["other_GB"] - head["matmul_GB"]) * 1e9
    assert saved >= 0.9 * logits_bytes  # one read of the logits less (a few small scaling passes more)
    assert head["matmul_GFLOP"] == pytest.approx(kernel["matmul_GFLOP"])


@pytest.mark.filterwarnings("ignore:the loader holds")
def test_hessian_pass_counts_grow_by_a_constant_per_probe_and_the_modes_differ():
    """From 3 probes on, a probe adds the same traffic whatever the pass
    size (the primal runs once), and the same matmul FLOPs in either HVP
    mode; the loop's HVP is counted from a real double backward."""
    case = lm_case(1, "cpu", quick=True)
    total = lambda rows, i: sum(r[i] for r in rows)  # noqa: E731
    sizes = {p: bench_traffic.trace_hvp(case, "fp32", p) for p in (3, 5, 7)}
    step_35 = total(sizes[5], 2) - total(sizes[3], 2)
    step_57 = total(sizes[7], 2) - total(sizes[5], 2)
    assert step_35 > 0 and step_57 == pytest.approx(step_35, rel=1e-6)
    rr = bench_traffic.summarize_hessian(case, "fp32", "reverse-over-reverse")
    fr = bench_traffic.summarize_hessian(case, "fp32", "forward-over-reverse")
    assert rr["probe_GFLOP"] == pytest.approx(fr["probe_GFLOP"], rel=0.02)
    assert rr["probe_GB"] != pytest.approx(fr["probe_GB"], rel=0.01)
    assert rr["loop_GB"] > 0 and rr["loop_GFLOP"] == pytest.approx(rr["probe_GFLOP"], rel=0.1)


@contextlib.contextmanager
def count_or_skip():
    """The counts lean on torch's internals (Inductor's, and fake tensors
    through a vmap rule): where this torch cannot be driven so, the trace
    raises Unavailable, naming why, and the test is skipped."""
    try:
        yield
    except Unavailable as exc:
        pytest.skip(str(exc))


def test_inductor_fuses_a_pointwise_chain_into_one_kernel_of_known_bytes():
    from torch._inductor import scheduler
    codegen = scheduler.Scheduler.codegen
    a, b, c = torch.empty(1000), torch.empty(1000), torch.empty(1000)
    with count_or_skip():
        rows = inductor_rows(lambda a, b, c: torch.relu(a * b + c), (a, b, c))
    assert len(rows) == 1 and rows[0][1:] == (0, 4 * 4000)  # reads a, b, c once, writes once: nothing between
    x, w = torch.empty(64, 32), torch.empty(32, 16)
    rows = inductor_rows(lambda x, w: (x @ w).sum(), (x, w))
    assert [r[1] for r in rows if r[1]] == [2 * 64 * 32 * 16]  # the matmul, with its FLOPs, then the sum
    assert len(rows) == 2
    assert scheduler.Scheduler.codegen is codegen  # Inductor is left as it was


@pytest.mark.filterwarnings("ignore:the loader holds")
def test_compiled_step_has_the_eager_matmuls_and_fewer_other_bytes():
    from bench_llc import lr_case
    case = lr_case(2, "cpu", quick=True)
    eager = bench_traffic.summarize(bench_traffic.trace_step(case, "fp32", True), 2, "fp32")
    with count_or_skip():
        rows = bench_traffic.trace_compiled_step(case, "fp32")
    assert rows[-1][0] == "sgld_step_" and "extern_kernels.bmm" in {r[0] for r in rows}
    compiled = bench_traffic.summarize(rows, 2, "fp32")
    assert compiled["matmul_GFLOP"] == pytest.approx(eager["matmul_GFLOP"], rel=0.02)
    assert compiled["kernels"] < eager["kernels"]
    assert compiled["other_GB"] < 0.8 * eager["other_GB"]


@pytest.mark.filterwarnings("ignore:the loader holds")
def test_compiled_hessian_pass_adds_fewer_bytes_per_probe_with_the_same_flops():
    case = lm_case(1, "cpu", quick=True)
    eager = bench_traffic.summarize_hessian(case, "fp32", "reverse-over-reverse", probes=(3, 5))
    with count_or_skip():
        compiled = bench_traffic.summarize_hessian(case, "fp32", "reverse-over-reverse", probes=(3, 5),
                                                   compiled=True)
    assert compiled["probe_GFLOP"] == pytest.approx(eager["probe_GFLOP"], rel=0.02)
    assert 0 < compiled["probe_GB"] < eager["probe_GB"]


@requires_extension
def test_gpt2_rows_count_the_same_matmuls_with_either_gelu(tmp_path):
    """traffic_large.py: the fused GELU changes the elementwise traffic, not
    the matmuls; the MFU at the floor follows from 6 x params x tokens."""
    pytest.importorskip("transformers")
    import json
    import traffic_large
    out = tmp_path / "t.json"
    traffic_large.main(["--quick", "--out", str(out)])
    rows = {r["activation"]: r for r in json.loads(out.read_text())["rows"]}
    fused, spelled = rows["gelu_pytorch_tanh"], rows["gelu_new"]
    assert fused["matmul_GFLOP"] == spelled["matmul_GFLOP"] and fused["kernels"] < spelled["kernels"]
    assert fused["other_GB"] < spelled["other_GB"]
    assert 0 < fused["saved_GB_per_chain"] < spelled["saved_GB_per_chain"]  # gelu_new saves its fp32 intermediates
    for r in rows.values():
        want = r["model_GFLOP"] / (r["floor_ms_per_chain_step"] / 1e3) / traffic_large.MEASURED_BF16_TFLOPS / 1e3
        assert r["mfu_at_floor"] == pytest.approx(want)
