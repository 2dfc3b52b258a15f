"""benchmarks/bench_traffic.py: its byte and FLOP counts on ops with known
answers, and the comparisons its table rests on."""
import os
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_traffic  # noqa: E402
from bench_llc import lm_case  # noqa: E402

from conftest import requires_extension  # noqa: E402


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
    names = [r[0] for r in log.rows]
    assert names == ["add", "mm", "sum"]
    assert log.rows[0][1:] == (0, 12000)
    assert log.rows[1][1] == 2 * 64 * 32 * 16
    assert log.rows[2][2] == 4000 + 4000


@requires_extension
@pytest.mark.filterwarnings("ignore:the loader holds")
def test_fused_loss_and_bf16_show_in_the_counts():
    case = lm_case(2, "cpu", quick=True)
    fused_rows, unfused_rows = (bench_traffic.trace_step(case, "fp32", f) for f in (True, False))
    assert {"token_nll", "token_nll_backward"} <= {r[0] for r in fused_rows}
    assert "_log_softmax" in {r[0] for r in unfused_rows} and "_log_softmax" not in {r[0] for r in fused_rows}
    fused, unfused = (bench_traffic.summarize(rows, 2, "fp32") for rows in (fused_rows, unfused_rows))
    bf16 = bench_traffic.summarize(bench_traffic.trace_step(case, "bf16", True), 2, "bf16")
    assert fused["other_GB"] < unfused["other_GB"]
    assert fused["matmul_GFLOP"] == pytest.approx(unfused["matmul_GFLOP"])
    assert bf16["matmul_GB"] == pytest.approx(fused["matmul_GB"] / 2, rel=0.05)  # same matmuls, 2-byte operands
    assert bf16["kernels"] > fused["kernels"]  # autocast's casts
