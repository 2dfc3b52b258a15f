"""Linear layers over stacked chains with the bias inside the matmul
(llcfast.fastpath.linear): under the fast engine's vmap(grad) the fold equals
torch's own vmap of F.linear and torch.addmm, runs one addmm a chain and no
add over the output, leaves to torch every call it cannot serve, and leaves
estimate_llc's numbers as they were."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap
from torch.utils._python_dispatch import TorchDispatchMode

import llcfast
from conftest import requires_cuda
from llc_models import gpt2_folded_against_torch
from llcfast.fastpath import (fold as chain_fold, linear as chain_linear, token_loss as fused_loss)
from llcfast.pipeline import models
from fastpaths import set_fastpath


@pytest.fixture(autouse=True)
def fold_on_cpu(monkeypatch):
    """The fold runs on CUDA only, for layers of at least
    MIN_OUTPUTS_PER_CHAIN outputs a chain; the tests run it on the CPU and
    for small layers too, as CUDA's semantics."""
    set_fastpath(monkeypatch, linear={"cpu", "cuda"})
    monkeypatch.setattr(chain_linear, "MIN_OUTPUTS_PER_CHAIN", 0)


class Kernels(TorchDispatchMode):
    """The ATen ops that run, with their output shapes."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func.overloadpacket.__name__, tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out


def case(chains=3, lead=(2, 5), features=4, outputs=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((chains,) + lead + (features,), generator=g, dtype=dtype)
    w = torch.randn(chains, outputs, features, generator=g, dtype=dtype)
    b = torch.randn(chains, outputs, generator=g, dtype=dtype)
    return x, w, b


def linear_loss(w, b, x):
    return (F.linear(x, w, b) ** 2).sum()


def conv1d_loss(w, b, x):  # Hugging Face's Conv1D: its weight is [in, out]
    return (torch.addmm(b, x.reshape(-1, x.shape[-1]), w.transpose(0, 1)) ** 2).sum()


def per_chain_grads(loss, in_dims, x, w, b):
    """vmap over chains of the gradients in w, b and x."""
    args = (w if in_dims[1] is not None else w[0], b if in_dims[2] is not None else b[0],
            x if in_dims[0] is not None else x[0])
    return vmap(grad(loss, argnums=(0, 1, 2)), in_dims=(in_dims[1], in_dims[2], in_dims[0]))(*args)


@pytest.mark.parametrize("loss", [linear_loss, conv1d_loss], ids=["linear", "addmm"])
@pytest.mark.parametrize("in_dims", [(0, 0, 0), (None, 0, 0), (0, None, None), (0, 0, None), (0, None, 0),
                                     (None, None, 0)],
                         ids=["all", "shared-x", "shared-weight", "shared-bias", "shared-w-only", "bias-only"])
def test_fold_under_vmap_grad_is_torchs_vmap(loss, in_dims):
    x, w, b = case()
    want = per_chain_grads(loss, in_dims, x, w, b)
    with fused_loss.first_order() as mode:
        got = per_chain_grads(loss, in_dims, x, w, b)
    assert mode.calls["linear"] == 1
    for g, t in zip(got, want):
        torch.testing.assert_close(g, t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lead", [(), (7,), (2, 3, 5)], ids=["1-d", "2-d", "4-d"])
def test_any_number_of_leading_dimensions(lead):
    x, w, b = case(lead=lead)
    f = vmap(lambda w, b, x: F.linear(x, w, b))
    with fused_loss.first_order() as mode:
        got = f(w, b, x)
    assert mode.calls["linear"] == 1 and got.shape == (3,) + lead + (6,)
    torch.testing.assert_close(got, f(w, b, x), rtol=1e-12, atol=1e-12)


def test_one_addmm_a_chain_and_no_add_over_the_output():
    x, w, b = case(chains=4, lead=(16,), dtype=torch.float32)
    step = vmap(grad(linear_loss, argnums=(0, 1)))
    for fold in (True, False):
        with chain_fold.folding(linear=None if fold else set()), fused_loss.first_order(), Kernels() as k:
            step(w, b, x)
        output_sized = [name for name, shape in k.ops if shape == (4, 16, 6)]
        if fold:
            assert [name for name, _ in k.ops].count("addmm") == 4 and "add" not in output_sized
        else:
            assert "addmm" not in [name for name, _ in k.ops] and "add" in output_sized


def test_gradients_come_back_in_the_layout_of_the_weight():
    x, w, b = case(dtype=torch.float32)
    with fused_loss.first_order():
        dw, _, _ = per_chain_grads(linear_loss, (0, 0, 0), x, w, b)
        dm, _, _ = per_chain_grads(conv1d_loss, (0, 0, 0), x, w.transpose(1, 2).contiguous().transpose(1, 2), b)
    assert dw.is_contiguous()  # a linear layer's weight is [out, in]: no copy before the sampler's update
    assert dm.transpose(1, 2).is_contiguous()  # Conv1D's is [in, out]


def test_calls_it_cannot_serve_go_to_torch(monkeypatch):
    x, w, b = case(dtype=torch.float32)
    calls = [lambda w, b, x: F.linear(x, w),  # no bias: torch's batched matmul is the whole layer
             lambda w, b, x: torch.addmm(b, x[0], w.t(), beta=0.5),
             lambda w, b, x: torch.addmm(b, x[0], w.t(), alpha=2.0),
             lambda w, b, x: torch.addmm(b.expand(x.shape[1], -1), x[0], w.t())]  # a 2-D input
    for call in calls:
        f = vmap(call)
        with fused_loss.first_order() as mode:
            got = f(w, b, x)
        assert mode.calls["linear"] == 0
        torch.testing.assert_close(got, f(w, b, x))
    mixed = vmap(lambda w, b, x: F.linear(x, w.double(), b.double()))  # torch's own error, not the fold's
    with pytest.raises(RuntimeError) as plain:
        mixed(w, b, x)
    with fused_loss.first_order() as mode, pytest.raises(RuntimeError) as folded:
        mixed(w, b, x)
    assert str(folded.value) == str(plain.value) and mode.calls["linear"] == 0
    f = vmap(lambda w, b, x: F.linear(x, w, b))
    for devices, smallest in [(set(), 0), ({"cpu"}, 2 * 5 * 6 + 1)]:  # device left out; layer too small
        set_fastpath(monkeypatch, linear=devices)
        monkeypatch.setattr(chain_linear, "MIN_OUTPUTS_PER_CHAIN", smallest)
        with fused_loss.first_order() as mode:
            f(w, b, x)
        assert mode.calls["linear"] == 0
    monkeypatch.setattr(chain_linear, "MIN_OUTPUTS_PER_CHAIN", 2 * 5 * 6)  # exactly large enough
    with fused_loss.first_order() as mode:
        f(w, b, x)
    assert mode.calls["linear"] == 1


def test_autocast_casts_as_torchs_linear_does():
    x, w, b = case(chains=2, lead=(8,), dtype=torch.float32)
    step = vmap(grad(lambda w, b, x: F.linear(x, w, b).float().pow(2).sum(), argnums=(0, 1)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = step(w, b, x)
        with fused_loss.first_order() as mode:
            got = step(w, b, x)
        with fused_loss.first_order():
            y = vmap(lambda w, b, x: F.linear(x, w, b))(w, b, x)
    assert mode.calls["linear"] == 1 and y.dtype == torch.bfloat16
    for g, t in zip(got, want):
        assert g.dtype == t.dtype == torch.float32
        # the fold adds the bias before rounding to bf16, torch's vmap after: the outputs are a bf16
        # rounding (2^-8 relative) apart, and the gradients, products of outputs and inputs, two
        torch.testing.assert_close(g, t, rtol=0, atol=2 * 2 ** -8 * t.abs().max().item())


def test_second_derivatives_pass_through_the_fold():
    x, w, b = case(chains=1, lead=(4,))
    f = (lambda w: linear_loss(w, b[0], x[0]))
    v = torch.randn_like(w[0])
    hvp = grad(lambda w: (grad(f)(w) * v).sum())  # reverse over reverse: the backward is torch ops
    want = hvp(w[0])
    with fused_loss.first_order() as mode:
        got = hvp(w[0])
    assert mode.calls["linear"] >= 1
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def lm():
    torch.manual_seed(0)
    return models.AttentionOnlyLM(vocab=40, d_model=16, heads=2, layers=2, context=16)


def lm_batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 40, (4, 9), generator=g),) for _ in range(n)]


@pytest.mark.filterwarnings("ignore:the loader holds")
@pytest.mark.filterwarnings("ignore:the LLC estimate is negative")
@pytest.mark.parametrize("extra", [{}, dict(restrict=["blocks.0.*"]), dict(grad_accum_steps=2),
                                   dict(precision="bf16")], ids=["plain", "restrict", "accum", "bf16"])
def test_estimate_llc_with_the_fold_equals_it_without(monkeypatch, extra):
    set_fastpath(monkeypatch, attention={"cpu", "cuda"})
    set_fastpath(monkeypatch, layer_norm={"cpu", "cuda"})
    kwargs = dict(dict(num_burnin=0, num_chains=3, num_draws=4, nbeta=5.0, epsilon=1e-3, progress=False, backend="fast", seed=3,
                       chain_chunk=3), **extra)
    folded = llcfast.estimate_llc(lm(), lm_batches(4), models.next_token_loss, **kwargs)
    assert folded.config["linear_fold"] is True
    with chain_fold.folding(linear=set()):
        plain = llcfast.estimate_llc(lm(), lm_batches(4), models.next_token_loss, **kwargs)
    assert "linear_fold" not in plain.config
    # in bf16 the logits are a bf16 rounding (2^-8 relative) apart (the bias added before rounding or after)
    tol = dict(rtol=2 ** -8, atol=0) if extra.get("precision") == "bf16" else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.as_tensor(folded.loss_trace), torch.as_tensor(plain.loss_trace), **tol)


def test_hugging_face_gpt2_conv1d_layers_are_folded():
    config, calls = gpt2_folded_against_torch("linear")
    assert calls["linear"] == 4 * config.n_layer  # qkv, attention out, MLP in and out; lm_head has no bias


@requires_cuda
def test_cuda_fold_equals_torch_and_replays_in_a_graph():
    x, w, b = (t.cuda() for t in case(chains=4, lead=(64, 33), features=96, outputs=1000, dtype=torch.float32))
    step = vmap(grad(linear_loss, argnums=(0, 1)))
    want = step(w, b, x)
    with fused_loss.first_order() as mode:
        got = step(w, b, x)
    assert mode.calls["linear"] == 1
    for g, t in zip(got, want):
        torch.testing.assert_close(g, t, rtol=1e-4, atol=1e-4 * t.abs().max().item())
    f = vmap(lambda w, b, x: F.linear(x, w, b))
    with fused_loss.first_order():
        eager = f(w, b, x)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            captured = f(w, b, x)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)
