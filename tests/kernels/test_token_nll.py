"""The fused next-token loss (llcfast::token_nll and its backward) against its
pure-torch twin, under vmap and autograd, and inside the fast engine."""
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, strategies as st
from torch.func import grad, grad_and_value, jvp, vmap

import llcfast
from conftest import HAS_CUDA, requires_cuda, requires_extension
from llcfast.fastpath import token_loss as fused_loss
from llcfast.pipeline import models
from llcfast import reference
from sample_inputs import aligned_and_shifted_logits
from fastpaths import set_fastpath

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
# Both sides sum exp in float32 (float64 for float64 logits), in different
# orders: a few float32 roundings of the log-sum-exp. Gradients in bf16 are
# the same float32 number rounded to bf16 either way, or one bf16 step apart.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.bfloat16: dict(rtol=2 ** -7, atol=1e-6)}


requires_vmap_rules = pytest.mark.skipif(
    not fused_loss.VMAP_RULES, reason=f"torch {torch.__version__} has no torch.library.register_vmap (torch >= 2.5): "
    "the fused loss takes its twin under vmap")


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    set_fastpath(monkeypatch, token_loss={"cpu", "cuda"})


def kernel(logits, targets):
    return torch.ops.llcfast.token_nll(logits.contiguous(), targets.contiguous())


def twin_with_grad(logits, targets, g):
    x = logits.detach().clone().requires_grad_()
    nll = reference.token_nll(x, targets)
    (nll * g).sum().backward()
    return nll.detach(), x.grad


@requires_extension
@given(lead=st.lists(st.integers(1, 5), min_size=0, max_size=3), vocab=st.integers(1, 700),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), seed=st.integers(0, 2 ** 16))
def test_kernel_matches_twin(lead, vocab, dtype, seed):
    for device in DEVICES:
        gen = torch.Generator().manual_seed(seed)
        logits = (4 * torch.randn(*lead, vocab, generator=gen, dtype=torch.float64)).to(dtype).to(device)
        targets = torch.randint(0, vocab, tuple(lead), generator=gen).to(device)
        g = torch.rand(tuple(lead), generator=gen, dtype=torch.float64).to(device)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        nll, lse = kernel(logits, targets)
        want_nll, want_grad = twin_with_grad(logits, targets, g.to(acc))
        assert nll.dtype == acc and nll.shape == targets.shape
        torch.testing.assert_close(nll, want_nll, **TOL[acc])
        torch.testing.assert_close(lse, torch.logsumexp(logits.to(acc), -1), **TOL[acc])
        got_grad = torch.ops.llcfast.token_nll_backward(g.to(acc).contiguous(), logits, lse, targets)
        assert got_grad.dtype == dtype
        torch.testing.assert_close(got_grad.to(acc), want_grad.to(acc), **TOL[dtype])


@requires_extension
@pytest.mark.parametrize("device", DEVICES)
def test_masked_vocabulary_and_bad_targets(device):
    logits = torch.randn(4, 9, device=device)
    logits[:, :3] = float("-inf")  # a vocabulary mask, as some models apply
    targets = torch.tensor([3, 8, 5, 4], device=device)
    torch.testing.assert_close(kernel(logits, targets)[0], reference.token_nll(logits, targets))
    # Out of range: NaN (no device-side check), never a read outside the row.
    nll = kernel(logits, torch.tensor([-1, 9, 100, 4], device=device))[0]
    assert torch.isnan(nll[:3]).all() and torch.isfinite(nll[3])
    with pytest.raises(RuntimeError, match="int64"):
        kernel(logits, targets.int())
    with pytest.raises(RuntimeError, match="must have shape"):
        kernel(logits, targets[:2])


def test_bad_arguments_name_the_problem():
    with pytest.raises(TypeError, match="logits must be"):
        llcfast.fastpath.token_loss.token_nll(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="targets must be an integer"):
        llcfast.fastpath.token_loss.token_nll(torch.zeros(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match=r"targets must have shape \(3,\)"):
        llcfast.fastpath.token_loss.token_nll(torch.zeros(3, 4), torch.zeros(3, 1, dtype=torch.int64))


@requires_extension
@requires_vmap_rules
@pytest.mark.parametrize("device", DEVICES)
def test_vmapped_gradients_equal_the_twin(kernel_on_cpu, device):
    torch.manual_seed(0)
    w = torch.randn(3, 8, 13, device=device)  # three chains' unembedding
    h = torch.randn(3, 5, 7, 8, device=device)  # each chain's own batch of features
    t = torch.randint(0, 13, (3, 5, 7), device=device)

    def loss(w, h, t):
        return fused_loss.token_nll(h @ w, t).mean()

    want = vmap(grad_and_value(loss))(w, h, t)
    with fused_loss.first_order():
        got = vmap(grad_and_value(loss))(w, h, t)
        shared = vmap(grad_and_value(loss), in_dims=(0, None, None))(w, h[0], t[0])  # one batch for all chains
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for c in range(3):
        torch.testing.assert_close(shared[0][c], grad(loss)(w[c], h[0], t[0]), rtol=1e-5, atol=1e-6)


@requires_extension
def test_twin_outside_first_order_keeps_second_derivatives(kernel_on_cpu):
    """Forward-over-reverse (the Hessian's HVP) runs through the twin."""
    torch.manual_seed(1)
    w, v = torch.randn(6, 11, dtype=torch.float64), torch.randn(6, 11, dtype=torch.float64)
    h, t = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 11, (20,))

    def loss(w):
        return fused_loss.token_nll(h @ w, t).mean()

    _, hvp = jvp(grad(loss), (w,), (v,))
    exact = torch.autograd.functional.hessian(loss, w).reshape(66, 66) @ v.reshape(-1)
    torch.testing.assert_close(hvp.reshape(-1), exact)


@requires_extension
@requires_vmap_rules
def test_engine_runs_the_kernel_with_the_twins_numbers(kernel_on_cpu, monkeypatch):
    torch.manual_seed(0)
    model = models.AttentionOnlyLM(vocab=50, d_model=16, heads=2, context=16)
    data = [(torch.randint(0, 50, (4, 9)),) for _ in range(6)]
    kw = dict(num_burnin=0, num_chains=3, num_draws=6, epsilon=1e-3, nbeta=50.0, gamma=100.0, seed=3, progress=False,
              backend="fast")
    calls = []
    real_apply = fused_loss._TokenNLL.apply
    monkeypatch.setattr(fused_loss._TokenNLL, "apply", lambda *a: calls.append(1) or real_apply(*a))
    fused = llcfast.estimate_llc(model, data, models.next_token_loss, **kw)
    assert calls, "the fast engine did not take the fused kernel"
    set_fastpath(monkeypatch, token_loss=set())
    twin = llcfast.estimate_llc(model, data, models.next_token_loss, **kw)
    assert fused.loss_trace.shape == twin.loss_trace.shape
    # A handful of steps from the same noise: apart by float32 rounding only.
    torch.testing.assert_close(torch.as_tensor(fused.loss_trace), torch.as_tensor(twin.loss_trace),
                               rtol=1e-5, atol=1e-6)
    assert math.isclose(fused.llc_mean, twin.llc_mean, rel_tol=1e-3, abs_tol=1e-3)


@requires_extension
def test_torch_without_vmap_rules_takes_the_twin(kernel_on_cpu, monkeypatch):
    """On torch < 2.5 the kernel has no batching rule, and vmap would run it
    chain by chain behind a warning: the twin serves instead."""
    monkeypatch.setattr(fused_loss, "VMAP_RULES", False)
    calls = []
    real_apply = fused_loss._TokenNLL.apply
    monkeypatch.setattr(fused_loss._TokenNLL, "apply", lambda *a: calls.append(1) or real_apply(*a))
    torch.manual_seed(2)
    w, h, t = torch.randn(3, 8, 13), torch.randn(3, 5, 8), torch.randint(0, 13, (3, 5))

    def loss(w, h, t):
        return fused_loss.token_nll(h @ w, t).mean()

    with fused_loss.first_order():
        got = vmap(grad_and_value(loss))(w, h, t)
    assert not calls
    for a, b in zip(got, vmap(grad_and_value(loss))(w, h, t)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_imports_and_samples_on_a_torch_without_register_vmap():
    """torch 2.4 has no torch.library.register_vmap: the package must import
    and the LM sample there (run in a process whose torch lacks it)."""
    code = (
        "import torch\n"
        "if hasattr(torch.library, 'register_vmap'):\n"
        "    del torch.library.register_vmap\n"
        "import llcfast\n"
        "from llcfast.fastpath import token_loss as fused_loss\n"
        "from llcfast.pipeline import models\n"
        "assert not fused_loss.VMAP_RULES\n"
        "torch.manual_seed(0)\n"
        "model = models.AttentionOnlyLM(vocab=30, d_model=8, heads=2, context=8)\n"
        "data = [(torch.randint(0, 30, (2, 6)),) for _ in range(3)]\n"
        "r = llcfast.estimate_llc(model, data, models.next_token_loss, num_chains=2, num_draws=3, epsilon=1e-3,\n"
        "                         nbeta=10.0, progress=False, backend='fast')\n"
        "assert r.loss_trace.shape == (2, 3), r.loss_trace.shape\n")
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@given(lead=st.lists(st.integers(1, 5), min_size=0, max_size=3), vocab=st.integers(1, 300),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), seed=st.integers(0, 2 ** 16))
def test_inductor_form_matches_twin(lead, vocab, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(*lead, vocab, generator=gen, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, vocab, tuple(lead), generator=gen)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.rand(tuple(lead), generator=gen, dtype=acc)
    x = logits.clone().requires_grad_()
    nll = fused_loss.token_nll_for_inductor(x, targets)
    (nll * g).sum().backward()
    want_nll, want_grad = twin_with_grad(logits, targets, g)
    assert nll.dtype == acc
    torch.testing.assert_close(nll.detach(), want_nll, **TOL[acc])
    torch.testing.assert_close(x.grad.to(acc), want_grad.to(acc), **TOL[dtype])


def test_inductor_form_masks_second_derivatives_and_bad_targets():
    logits = torch.randn(4, 9)
    logits[:, :3] = float("-inf")
    targets = torch.tensor([3, 8, 5, 4])
    torch.testing.assert_close(fused_loss.token_nll_for_inductor(logits, targets), reference.token_nll(logits, targets))
    nll = fused_loss.token_nll_for_inductor(logits, torch.tensor([-1, 9, 100, 4]))
    assert torch.isnan(nll[:3]).all() and torch.isfinite(nll[3])  # as the kernel: NaN, not a silent value
    torch.manual_seed(1)
    w, v = torch.randn(6, 11, dtype=torch.float64), torch.randn(6, 11, dtype=torch.float64)
    h, t = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 11, (20,))
    hvps = [jvp(grad(lambda w: f(h @ w, t).mean()), (w,), (v,))[1]
            for f in (fused_loss.token_nll_for_inductor, reference.token_nll)]
    torch.testing.assert_close(hvps[0], hvps[1])


def test_torch_compile_takes_the_inductor_form(monkeypatch):
    calls = []
    form = fused_loss.token_nll_for_inductor
    monkeypatch.setattr(fused_loss, "token_nll_for_inductor", lambda *a: calls.append(1) or form(*a))
    torch.manual_seed(2)
    w, h, t = torch.randn(8, 13), torch.randn(5, 7, 8), torch.randint(0, 13, (5, 7))

    def loss(w, h, t):
        return fused_loss.token_nll(h @ w, t).mean()

    torch._dynamo.reset()  # a cached graph would skip the trace that calls the form
    got = torch.compile(grad_and_value(loss), dynamic=False)(w, h, t)
    assert calls, "torch.compile did not trace the Inductor form"
    for a, b in zip(got, grad_and_value(loss)(w, h, t)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@requires_cuda
def test_cuda_kernel_large_vocabulary_bf16():
    """The benchmark LM's shape: many rows of 5000, bf16 under autocast."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 512, 5000, device="cuda")).to(torch.bfloat16)
    targets = torch.randint(0, 5000, (2, 512), device="cuda")
    nll, lse = kernel(logits, targets)
    torch.testing.assert_close(nll, reference.token_nll(logits, targets), rtol=1e-5, atol=1e-5)
    g = torch.rand(2, 512, device="cuda")
    _, want = twin_with_grad(logits, targets, g)
    got = torch.ops.llcfast.token_nll_backward(g, logits, lse, targets)
    torch.testing.assert_close(got.float(), want.float(), **TOL[torch.bfloat16])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_cuda_wide_accesses_equal_element_accesses(dtype):
    """Rows that start on 16-byte boundaries are read 16 bytes at a time; the
    same logits one element off those boundaries are read element by
    element. Both give the same numbers, -inf, +inf and NaN included."""
    logits, targets, aligned, shifted = aligned_and_shifted_logits(dtype)
    rows = logits.shape[0]
    t = targets.cuda()
    wide, narrow = kernel(aligned, t), kernel(shifted, t)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.rand(rows, dtype=acc, device="cuda")
    grads = [torch.ops.llcfast.token_nll_backward(g, x, lse, t) for x, (_, lse) in ((aligned, wide), (shifted, narrow))]
    pairs = [(wide[0], narrow[0], acc), (wide[1], narrow[1], acc), (grads[0].to(acc), grads[1].to(acc), dtype)]
    for a, b, tol in pairs:
        assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b))
        finite = torch.isfinite(a)
        torch.testing.assert_close(a[finite], b[finite], **TOL[tol])
    finite_rows = torch.isfinite(wide[1])
    torch.testing.assert_close(wide[0][finite_rows], reference.token_nll(logits, targets).to(acc).cuda()[finite_rows],
                               **TOL[acc])
