"""llcfast.ops.lanczos_step_ (the fused Lanczos recurrence step): kernel ==
twin on every built device, the step's algebra (alpha, orthogonality of the
new vector, beta, the residual it removes), routing of long runs to the twin,
and clear errors for bad input from both the wrapper and the compiled op."""
import pytest
import torch
from hypothesis import given, strategies as st

from llcfast import ops, reference
from conftest import HAS_CUDA, requires_extension

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
ULP = 2.0 ** -23


def random_case(rows, m, n, j, seed, orthonormal, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    basis = torch.zeros(rows, m, n)
    if orthonormal:
        q, _ = torch.linalg.qr(torch.randn(rows, n, j + 1, generator=g, dtype=torch.float64))
        basis[:, : j + 1] = q.transpose(1, 2).float()
    else:
        basis[:, : j + 1] = torch.randn(rows, j + 1, n, generator=g) / n ** 0.5
    w = torch.randn(rows, n, generator=g)
    return basis.to(device), w.to(device)


def run_both(basis, w, j):
    got_b, got_w = basis.clone(), w.clone()
    want_b, want_w = basis.clone(), w.clone()
    got = torch.zeros(basis.shape[0], 2, dtype=torch.float64, device=basis.device)
    want = got.clone()
    ops.lanczos_step_(got_b, got_w, j, got)
    reference.lanczos_step_(want_b, want_w, j, want)
    return (got_b, got_w, got), (want_b, want_w, want)


def assert_step_equal(got, want, basis, w):
    # w is rounded to float32 after each update; the float64 sums behind it
    # differ only in summation order, so at most a couple of ulps of the
    # largest value separate the two.
    (gb, gw, go), (wb, ww, wo) = got, want
    scale = float(w.abs().max()) * (1.0 + float(basis.abs().sum(2).max()) ** 2)
    assert float((gw - ww).abs().max()) <= 8 * ULP * scale
    beta = wo[:, 1].clamp_min(1e-30)
    assert float(((gb - wb).abs().amax(2) / (1 + scale / beta[:, None].float())).max()) <= 8 * ULP
    terms = float((basis.double().abs().sum(1) * w.double().abs()).sum(1).max())
    assert float((go[:, 0] - wo[:, 0]).abs().max()) <= 1e-12 * terms
    torch.testing.assert_close(go[:, 1], wo[:, 1], rtol=1e-5, atol=1e-6 * scale)


@requires_extension
@pytest.mark.parametrize("device", DEVICES)
@given(rows=st.integers(1, 3), m=st.integers(1, 7), n=st.integers(1, 3000), data=st.data())
def test_kernel_equals_twin(device, rows, m, n, data):
    j = data.draw(st.integers(0, m - 1))
    basis, w = random_case(rows, m, n, j, seed=rows * 1000 + m * 10 + j, orthonormal=False, device=device)
    assert_step_equal(*run_both(basis, w, j), basis, w)


@requires_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,m,n,j", [(2, 40, 10_000, 31), (1, 3, 100_003, 2), (70, 4, 33, 1)])
def test_kernel_equals_twin_on_long_rows_and_many_rows(device, rows, m, n, j):
    basis, w = random_case(rows, m, n, j, seed=n, orthonormal=False, device=device)
    assert_step_equal(*run_both(basis, w, j), basis, w)


@pytest.mark.parametrize("fn", [ops.lanczos_step_, reference.lanczos_step_], ids=["ops", "twin"])
@pytest.mark.parametrize("rows,m,n,j", [(3, 8, 500, 0), (2, 8, 5000, 4), (1, 12, 64, 10)])
def test_step_algebra(fn, rows, m, n, j):
    basis, w0 = random_case(rows, m, n, j, seed=7 + j, orthonormal=True)
    w = w0.clone()
    out = torch.zeros(rows, 2, dtype=torch.float64)
    fn(basis, w, j, out)
    v = basis[:, : j + 1].double()
    x0 = w0.double()
    residual = x0 - torch.bmm(v.transpose(1, 2), torch.bmm(v, x0.unsqueeze(2))).squeeze(2)
    torch.testing.assert_close(out[:, 0], (v[:, j] * x0).sum(1), rtol=1e-12, atol=1e-12 * n)
    torch.testing.assert_close(out[:, 1], residual.norm(dim=1), rtol=1e-5, atol=0.0)
    torch.testing.assert_close(w.double(), residual, rtol=0.0, atol=1e-5)
    nxt = basis[:, j + 1].double()
    torch.testing.assert_close(nxt.norm(dim=1), torch.ones(rows, dtype=torch.float64), rtol=1e-6, atol=0.0)
    assert float(torch.bmm(v, nxt.unsqueeze(2)).abs().max()) <= 1e-6
    # the vectors after j + 1 are not touched
    assert torch.equal(basis[:, j + 2:], torch.zeros_like(basis[:, j + 2:]))


def test_last_step_writes_no_vector():
    basis, w = random_case(2, 3, 50, 2, seed=1, orthonormal=True)
    before = basis.clone()
    out = torch.zeros(2, 2, dtype=torch.float64)
    ops.lanczos_step_(basis, w, 2, out)
    assert torch.equal(basis, before)
    assert bool((out[:, 1] > 0).all())


@requires_extension
def test_long_runs_take_the_twin():
    m = ops.LANCZOS_KERNEL_MAX_STEPS + 1
    basis, w = random_case(1, m, 3, 1, seed=2, orthonormal=True)
    out = torch.zeros(1, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="allowed 1..2048"):
        torch.ops.llcfast.lanczos_step_(basis.clone(), w.clone(), 1, out)
    ops.lanczos_step_(basis, w, 1, out)
    assert abs(float(basis[0, 2].double().norm()) - 1.0) < 1e-6


def bad_inputs():
    good = dict(basis=torch.zeros(2, 3, 5), w=torch.zeros(2, 5), j=1, out=torch.zeros(2, 2, dtype=torch.float64))
    yield dict(good, basis=torch.zeros(2, 3, 5, dtype=torch.float64)), TypeError, "basis must be a contiguous torch.float32"
    yield dict(good, basis=torch.zeros(2, 5, 3).transpose(1, 2)), TypeError, "basis must be a contiguous"
    yield dict(good, j=3), ValueError, r"j must be in \[0, 2\], got 3"
    yield dict(good, j=-1), ValueError, r"j must be in \[0, 2\], got -1"
    yield dict(good, w=torch.zeros(2, 4)), TypeError, r"w must be a contiguous torch.float32 tensor of shape \(2, 5\)"
    yield dict(good, out=torch.zeros(2, 2)), TypeError, r"out must be a contiguous torch.float64 tensor of shape \(2, 2\)"
    yield dict(good, basis=torch.zeros(2, 3, 0), w=torch.zeros(2, 0)), ValueError, "must be >= 1"


@pytest.mark.parametrize("kwargs,exc,match", list(bad_inputs()))
def test_bad_input_is_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ops.lanczos_step_(**kwargs)


@requires_extension
@pytest.mark.parametrize("basis,w,j,out,match", [
    (torch.zeros(2, 3, 5, dtype=torch.float64), torch.zeros(2, 5), 0, torch.zeros(2, 2, dtype=torch.float64),
     "basis must be a contiguous float32"),
    (torch.zeros(2, 3, 5), torch.zeros(2, 5), 3, torch.zeros(2, 2, dtype=torch.float64), "j = 3 must index"),
    (torch.zeros(2, 3, 5), torch.zeros(2, 4), 0, torch.zeros(2, 2, dtype=torch.float64),
     r"w must be a contiguous float32 \[2, 5\]"),
    (torch.zeros(2, 3, 5), torch.zeros(2, 5), 0, torch.zeros(2, 3, dtype=torch.float64),
     r"out must be a contiguous float64 \[2, 2\]"),
])
def test_compiled_op_checks_its_input(basis, w, j, out, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.llcfast.lanczos_step_(basis, w, j, out)
