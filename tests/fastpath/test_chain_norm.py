"""Layer norm with a weight and bias per chain (llcfast::chain_layer_norm and
its backward) against its pure-torch twin and torch's own layer norm; the
fold (llcfast.fastpath.norm) under the fast engine's vmap(grad), one kernel
call each way for all chains; and torch's layer norm wherever the fold
cannot serve a call exactly."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.func import grad, vmap

import llcfast
from conftest import HAS_CUDA, requires_cuda, requires_extension
from llc_models import gpt2_folded_against_torch
from llcfast.fastpath import (fold as chain_fold, token_loss as fused_loss)
from llcfast.pipeline import models
from llcfast import reference
from fastpaths import set_fastpath

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
pytestmark = requires_extension


@pytest.fixture(autouse=True)
def fold_on_cpu(monkeypatch):
    """The fold runs on CUDA only (on a CPU torch's kernels are faster); the
    tests run it on the CPU too, as CUDA's semantics."""
    set_fastpath(monkeypatch, layer_norm={"cpu", "cuda"})


def case(chains, rows, features, dtype, device="cpu", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3.0 + 2.0 * torch.randn(chains, rows, features, generator=g, dtype=torch.float64))
    w = 1.0 + 0.5 * torch.randn(chains, features, generator=g, dtype=torch.float64)
    b = torch.randn(chains, features, generator=g, dtype=torch.float64) if bias else None
    grad_y = torch.randn(chains, rows, features, generator=g, dtype=torch.float64)
    cast = (lambda t: None if t is None else t.to(device=device, dtype=dtype))
    return cast(x), cast(w), cast(b), cast(grad_y)


def torch_layer_norm(x, w, b, eps, grad_y):
    """Per chain through F.layer_norm and autograd: (y, dx, dw, db)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    y = torch.stack([F.layer_norm(leaves[0][c], (x.shape[-1],), leaves[1][c], leaves[2][c] if b is not None else None,
                                  eps) for c in range(x.shape[0])])
    grads = torch.autograd.grad(y, leaves, grad_y)
    return (y.detach(),) + tuple(grads) + ((None,) if b is None else ())


def errors(got, want):
    """Largest error over the largest value, per output (values near 0, as
    the weight's gradient for a single feature, where xhat is 0, count
    against 1); None where either side has no such output."""
    return [0.0 if g is None or w is None else
            ((g.double() - w.double()).abs().max() / w.double().abs().max().clamp_min(1.0)).item()
            for g, w in zip(got, want)]


shapes = st.tuples(st.integers(1, 4), st.integers(1, 40), st.sampled_from([1, 3, 31, 32, 33, 97, 256, 300]),
                   st.booleans())


@settings(max_examples=25, deadline=None)
@given(shapes)
def test_kernel_equals_the_twin_and_torch_in_float64(shape):
    chains, rows, features, bias = shape
    x, w, b, gy = case(chains, rows, features, torch.float64, bias=bias)
    y, mean, rstd = torch.ops.llcfast.chain_layer_norm(x, w, b, 1e-5)
    got = (y,) + torch.ops.llcfast.chain_layer_norm_backward(gy, x, mean, rstd, w)
    ty, tmean, trstd = reference.chain_layer_norm(x, w, b, 1e-5)
    twin = (ty,) + reference.chain_layer_norm_backward(gy, x, tmean, trstd, w)
    want = torch_layer_norm(x, w, b, 1e-5, gy)
    for name, e in zip("y dx dw db".split(), errors(got, want)):
        assert e < 1e-12, (name, e)
    for name, e in zip("y dx dw db".split(), errors(twin, want)):
        assert e < 1e-12, (name, e)
    torch.testing.assert_close(mean, x.mean(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_float32_error_is_torchs_own(device, bias):
    """Against float64, the kernel's float32 results are off by no more than
    a small multiple of what torch's own float32 layer norm is off by."""
    for chains, rows, features in [(3, 97, 1025), (2, 33, 256), (1, 5, 7)]:
        x64, w64, b64, g64 = case(chains, rows, features, torch.float64, device=device, bias=bias)
        exact = torch_layer_norm(x64, w64, b64, 1e-5, g64)
        f32 = [None if t is None else t.float() for t in (x64, w64, b64, g64)]
        y, mean, rstd = torch.ops.llcfast.chain_layer_norm(f32[0], f32[1], f32[2], 1e-5)
        mine = (y,) + torch.ops.llcfast.chain_layer_norm_backward(f32[3], f32[0], mean, rstd, f32[1])
        torchs = torch_layer_norm(*f32[:3], 1e-5, f32[3])
        for name, e_mine, e_torch in zip("y dx dw db".split(), errors(mine, exact), errors(torchs, exact)):
            assert e_mine <= 4 * e_torch + 1e-6, (name, chains, rows, features, e_mine, e_torch)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_is_the_float32_result_rounded(device):
    x, w, b, gy = case(2, 37, 300, torch.bfloat16, device=device)
    y, mean, rstd = torch.ops.llcfast.chain_layer_norm(x, w, b, 1e-5)
    dx, dw, db = torch.ops.llcfast.chain_layer_norm_backward(gy, x, mean, rstd, w)
    ty, tmean, trstd = reference.chain_layer_norm(x, w, b, 1e-5)
    tdx, tdw, tdb = reference.chain_layer_norm_backward(gy, x, tmean, trstd, w)
    assert y.dtype == dx.dtype == dw.dtype == torch.bfloat16 and mean.dtype == torch.float32
    torch.testing.assert_close(mean, tmean, rtol=1e-5, atol=1e-5)
    for got, want in ((y, ty), (dx, tdx), (dw, tdw), (db, tdb)):  # one bf16 rounding of nearby float32 numbers
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -7 * want.float().abs().max())


def test_bad_arguments_say_what_is_wrong():
    x, w, b, gy = case(2, 4, 6, torch.float32)
    with pytest.raises(RuntimeError, match=r"x must be \[chains, rows, features\]"):
        torch.ops.llcfast.chain_layer_norm(x[0], w, b, 1e-5)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[chains, features\] = \[2, 6\], got \[6\]"):
        torch.ops.llcfast.chain_layer_norm(x, w[0], b, 1e-5)
    with pytest.raises(RuntimeError, match="bias must have x's dtype Float, got Double"):
        torch.ops.llcfast.chain_layer_norm(x, w, b.double(), 1e-5)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        torch.ops.llcfast.chain_layer_norm(x.transpose(1, 2).contiguous().transpose(1, 2), w, b, 1e-5)
    _, mean, rstd = torch.ops.llcfast.chain_layer_norm(x, w, b, 1e-5)
    with pytest.raises(RuntimeError, match=r"mean and rstd must be contiguous Float of shape \[2, 4\]"):
        torch.ops.llcfast.chain_layer_norm_backward(gy, x, mean.double(), rstd, w)


def norm_loss(x, w, b, gy):
    return (F.layer_norm(x, (x.shape[-1],), w, b) * gy).sum()


def chain_grads(args, in_dims, fold):
    f = vmap(grad(norm_loss, argnums=(0, 1, 2)), in_dims=in_dims + (None,))
    with chain_fold.folding(layer_norm={"cpu", "cuda"} if fold else set()), fused_loss.first_order() as mode:
        out = f(*args)
    return out, mode.calls.get("layer_norm", 0)


@pytest.mark.parametrize("in_dims", [(0, 0, 0), (None, 0, 0), (0, None, None), (0, 0, None)],
                         ids=["all per chain", "shared input", "shared weight and bias", "weight per chain"])
def test_fold_under_vmap_grad_is_torchs_vmap(in_dims):
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 33) if in_dims[0] == 0 else torch.randn(2, 5, 33)
    w = 1 + torch.randn(3, 33) if in_dims[1] == 0 else 1 + torch.randn(33)
    b = torch.randn(3, 33) if in_dims[2] == 0 else torch.randn(33)
    gy = torch.randn(2, 5, 33)
    folded, calls = chain_grads((x, w, b, gy), in_dims, fold=True)
    plain, plain_calls = chain_grads((x, w, b, gy), in_dims, fold=False)
    assert calls == 1 and plain_calls == 0
    for got, want in zip(folded, plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_kernel_call_each_way_for_all_chains(monkeypatch):
    seen = []
    for name in ("chain_layer_norm", "chain_layer_norm_backward"):
        op = getattr(torch.ops.llcfast, name)
        monkeypatch.setattr(torch.ops.llcfast, name, (lambda op, name: lambda *a: seen.append(
            (name, tuple(a[0].shape))) or op(*a))(op, name))
    x, w, b, gy = torch.randn(4, 3, 7, 16), torch.randn(4, 16), torch.randn(4, 16), torch.randn(3, 7, 16)
    chain_grads((x, w, b, gy), (0, 0, 0), fold=True)
    assert seen == [("chain_layer_norm", (4, 21, 16)), ("chain_layer_norm_backward", (4, 21, 16))]


def test_calls_it_cannot_serve_go_to_torch():
    x, w, b = torch.randn(2, 3, 8), torch.randn(8), torch.randn(8)
    with fused_loss.first_order() as mode:
        F.layer_norm(x, (8,), None, None)  # no weight: torch's own rule is one kernel already
        F.layer_norm(x, (3, 8), torch.randn(3, 8), torch.randn(3, 8))  # two normalized dimensions
        F.layer_norm(x.bfloat16(), (8,), w, b)  # mixed dtypes
        with chain_fold.folding(layer_norm={"cuda"}):
            F.layer_norm(x, (8,), w, b)  # a device the fold does not serve
        assert mode.calls.get("layer_norm", 0) == 0
        y = F.layer_norm(x, (8,), w, b, 1e-3)
        assert mode.calls["layer_norm"] == 1
    torch.testing.assert_close(y, F.layer_norm(x, (8,), w, b, 1e-3), rtol=1e-6, atol=1e-6)


def test_second_derivative_is_refused_and_torchs_layer_norm_keeps_it():
    x, w, b = torch.randn(3, 8), torch.randn(8, requires_grad=True), torch.randn(8)

    def loss(w):
        return F.layer_norm(x, (8,), w, b).pow(3).sum()

    with fused_loss.first_order(), pytest.raises(RuntimeError, match="no derivative of its own"):
        grad(lambda w: grad(loss)(w).sum())(w.detach())
    h = torch.func.hessian(loss)(w.detach())  # outside first_order: torch's layer norm
    assert h.shape == (8, 8) and torch.isfinite(h).all()


def lm():
    torch.manual_seed(0)
    return models.AttentionOnlyLM(vocab=40, d_model=16, heads=2, layers=2, context=32, attention="sdpa")


def lm_batches(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 40, (3, 17), generator=g) for _ in range(n)]


@pytest.mark.filterwarnings("ignore:the loader holds")
@pytest.mark.filterwarnings("ignore:the LLC estimate is negative")
@pytest.mark.parametrize("extra", [{}, dict(chain_chunk=2), dict(restrict=["blocks.0.*"]), dict(grad_accum_steps=2),
                                   dict(precision="bf16")])
def test_estimate_llc_with_the_fold_equals_it_without(monkeypatch, extra):
    set_fastpath(monkeypatch, attention={"cpu", "cuda"})
    kwargs = dict(dict(num_burnin=0, num_chains=3, num_draws=4, nbeta=5.0, epsilon=1e-3, progress=False, backend="fast", seed=3,
                       chain_chunk=3), **extra)
    folded = llcfast.estimate_llc(lm(), lm_batches(4), models.next_token_loss, **kwargs)
    assert folded.config["layer_norm_fold"] is True and folded.config["attention_fold"] is True
    with chain_fold.folding(layer_norm=set()):
        plain = llcfast.estimate_llc(lm(), lm_batches(4), models.next_token_loss, **kwargs)
    assert "layer_norm_fold" not in plain.config
    torch.testing.assert_close(torch.as_tensor(folded.loss_trace), torch.as_tensor(plain.loss_trace),
                               rtol=1e-5, atol=1e-6)


def test_hugging_face_gpt2_layer_norms_are_folded():
    config, calls = gpt2_folded_against_torch("layer_norm")
    assert calls["layer_norm"] == 2 * config.n_layer + 1  # two a block, and the final one


@requires_cuda
def test_cuda_kernels_equal_the_cpu_kernels_and_replay_in_a_graph():
    for chains, rows, features in [(3, 1000, 1), (2, 4111, 257), (1, 9, 768), (8, 33, 4096)]:
        x, w, b, gy = case(chains, rows, features, torch.float32)
        y, mean, rstd = torch.ops.llcfast.chain_layer_norm(x, w, b, 1e-5)
        cpu = (y, mean, rstd) + torch.ops.llcfast.chain_layer_norm_backward(gy, x, mean, rstd, w)
        xc, wc, bc, gc = (t.cuda() for t in (x, w, b, gy))
        y, mean, rstd = torch.ops.llcfast.chain_layer_norm(xc, wc, bc, 1e-5)
        cuda = (y, mean, rstd) + torch.ops.llcfast.chain_layer_norm_backward(gc, xc, mean, rstd, wc)
        for got, want in zip(cuda, cpu):  # float32 sums in other orders
            torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            gy2 = torch.ops.llcfast.chain_layer_norm(xc, wc, bc, 1e-5)
            replayed = torch.ops.llcfast.chain_layer_norm_backward(gc, xc, gy2[1], gy2[2], wc)
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(replayed, cuda[3:]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)  # no atomics: the same sums in the same order
