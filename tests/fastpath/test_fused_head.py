"""The fused unembedding and mean next-token loss (llcfast.fastpath.head) and
its kernel, llcfast::token_nll_grad_, against the composed form and the
kernel's twin, under vmap and autograd, and inside the fast engine."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.func import grad, grad_and_value, vmap
from torch.utils._python_dispatch import TorchDispatchMode

import llcfast
from conftest import HAS_CUDA, requires_cuda, requires_extension
from llcfast.fastpath import fold as chain_fold, head as fused_head, token_loss as fused_loss
from llcfast.pipeline import fused_losses, models
from llcfast import reference
from llcfast.engine.functional import chain_loss, vmapped_grads
from sample_inputs import aligned_and_shifted_logits
from fastpaths import set_fastpath

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
# As in test_token_nll: both sides sum exp in float32 in different orders; a
# bf16 gradient is the same float32 number rounded, or one bf16 step apart.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.bfloat16: dict(rtol=2 ** -7, atol=1e-6)}


@pytest.fixture
def fused_on_cpu(monkeypatch):
    set_fastpath(monkeypatch, head={"cpu", "cuda"})


@requires_extension
@settings(deadline=None)
@given(lead=st.lists(st.integers(1, 5), min_size=0, max_size=3), vocab=st.integers(1, 700),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), scale=st.floats(-3, 3),
       seed=st.integers(0, 2 ** 16))
def test_kernel_matches_twin_and_the_two_kernels(lead, vocab, dtype, scale, seed):
    for device in DEVICES:
        gen = torch.Generator().manual_seed(seed)
        logits = (4 * torch.randn(*lead, vocab, generator=gen, dtype=torch.float64)).to(dtype).to(device)
        targets = torch.randint(0, vocab, tuple(lead), generator=gen).to(device)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        got = logits.clone()
        nll, lse = torch.ops.llcfast.token_nll_grad_(got, targets, scale)
        twin = logits.clone()
        want_nll, want_lse = reference.token_nll_grad_(twin, targets, scale)
        torch.testing.assert_close(nll, want_nll, **TOL[acc])
        torch.testing.assert_close(lse, want_lse, **TOL[acc])
        torch.testing.assert_close(got, twin, **TOL[dtype])
        # the same numbers as the forward kernel and then the backward kernel
        nll2, lse2 = torch.ops.llcfast.token_nll(logits, targets)
        grad2 = torch.ops.llcfast.token_nll_backward(torch.full_like(nll2, scale), logits, lse2, targets)
        assert torch.equal(nll, nll2) and torch.equal(lse, lse2)
        assert torch.equal(got, grad2)


@requires_extension
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_on_infinite_and_nan_rows_and_bad_targets(device):
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[0.0, -inf, 1.0, 2.0], [-inf, -inf, -inf, -inf], [0.0, inf, 1.0, 0.0],
                           [0.0, nan, 1.0, 0.0], [1.0, 2.0, 3.0, 4.0]], device=device)
    targets = torch.tensor([2, 0, 1, 2, 7], device=device)  # the last outside [0, V)
    got = logits.clone()
    nll, lse = torch.ops.llcfast.token_nll_grad_(got, targets, 0.5)
    nll2, lse2 = torch.ops.llcfast.token_nll(logits, targets)
    grad2 = torch.ops.llcfast.token_nll_backward(torch.full_like(nll2, 0.5), logits, lse2, targets)
    torch.testing.assert_close(nll, nll2, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(got, grad2, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(nll[4]) and torch.isfinite(got[4]).all()  # a bad target: NaN loss, softmax as its gradient


@requires_extension
def test_kernel_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="targets must have shape"):
        torch.ops.llcfast.token_nll_grad_(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.llcfast.token_nll_grad_(torch.zeros(4, 3).t(), torch.zeros(3, dtype=torch.long), 1.0)


@requires_cuda
@requires_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_cuda_wide_accesses_equal_element_accesses(dtype):
    """The same logits read 16 bytes an access (aligned rows) and one element
    an access (one element off): the same losses and gradients, -inf, +inf
    and NaN included."""
    _, targets, aligned, shifted = aligned_and_shifted_logits(dtype)
    t = targets.cuda()
    wide, narrow = (torch.ops.llcfast.token_nll_grad_(x, t, 0.25) for x in (aligned, shifted))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for a, b, tol in [(wide[0], narrow[0], acc), (wide[1], narrow[1], acc), (aligned.to(acc), shifted.to(acc), dtype)]:
        assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b))
        finite = torch.isfinite(a)
        torch.testing.assert_close(a[finite], b[finite], **TOL[tol])


def lm(vocab=97, d_model=32, dtype=torch.float64):
    torch.manual_seed(0)
    return models.AttentionOnlyLM(vocab=vocab, d_model=d_model, heads=4, context=32).to(dtype)


def stacked(model, chains=3, spread=0.01, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return tuple(p.detach().expand((chains,) + p.shape)
                 + spread * torch.randn((chains,) + p.shape, generator=gen, dtype=p.dtype) for p in model.parameters())


def head_calls(mode):
    return mode.calls["head"] if mode is not None else 0


@requires_extension
@pytest.mark.parametrize("targets_per_chain", [True, False], ids=["own-batches", "shared-batch"])
def test_batched_loss_and_gradients_equal_the_composed_form(fused_on_cpu, targets_per_chain):
    model = lm()
    loss = chain_loss(model, models.next_token_loss, [n for n, _ in model.named_parameters()])
    params = stacked(model)
    batch = torch.randint(0, 97, (3, 4, 17) if targets_per_chain else (4, 17))
    dims = 0 if targets_per_chain else None
    with chain_fold.folding(head=set()):
        want_g, want_loss = vmapped_grads(loss, dims)(params, batch)
    with fused_loss.first_order() as mode:
        got_g, got_loss = vmapped_grads(loss, dims)(params, batch)
    assert head_calls(mode) == 1  # one fused call for all chains
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_g, want_g, rtol=1e-10, atol=1e-12)


def _head_loss(hidden, weight, bias, targets):
    return fused_head.linear_token_nll_mean(hidden, weight, bias, targets)


@requires_extension
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shared", ["none", "weight", "hidden"])
def test_batching_patterns_and_a_scaled_loss(fused_on_cpu, bias, shared):
    # chains with their own or a shared weight (a restricted run's frozen unembedding) or input; the loss
    # times 3 minus 1 scales the saved gradients by the scalar's own gradient
    gen = torch.Generator().manual_seed(2)
    chains, rows, width, vocab = 3, 14, 6, 23
    hidden = torch.randn(chains, 2, rows // 2, width, generator=gen, dtype=torch.float64)
    weight = torch.randn(chains, vocab, width, generator=gen, dtype=torch.float64)
    b = torch.randn(chains, vocab, generator=gen, dtype=torch.float64) if bias else None
    targets = torch.randint(0, vocab, (chains, 2, rows // 2), generator=gen)
    args = [hidden, weight, b, targets]
    dims = [0, 0, 0 if bias else None, 0]
    if shared == "weight":
        args[1], dims[1] = weight[0], None
    if shared == "hidden":
        args[0], dims[0] = hidden[0], None
    wrt = (0, 1, 2) if bias else (0, 1)

    def scaled(*a):
        return 3 * _head_loss(*a) - 1

    want = vmap(grad_and_value(scaled, argnums=wrt), in_dims=tuple(dims))(*args)
    with fused_loss.first_order() as mode:
        got = vmap(grad_and_value(scaled, argnums=wrt), in_dims=tuple(dims))(*args)
    assert head_calls(mode) == 1
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@requires_extension
def test_only_the_wanted_gradients_are_computed(fused_on_cpu, monkeypatch):
    seen = []
    forward = fused_head._LinearTokenNLLMean.forward
    monkeypatch.setattr(fused_head._LinearTokenNLLMean, "forward",
                        staticmethod(lambda *a: seen.append(a[-2]) or forward(*a)))
    gen = torch.Generator().manual_seed(0)
    h, w, b = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((9, 4), (7, 4), (7,)))
    t = torch.randint(0, 7, (9,), generator=gen)
    with fused_loss.first_order():
        got = grad(_head_loss, argnums=1)(h, w, b, t)
    assert seen == [(False, True, False)]
    torch.testing.assert_close(got, grad(_head_loss, argnums=1)(h, w, b, t), rtol=1e-12, atol=1e-12)


@requires_extension
def test_where_it_does_not_fuse(fused_on_cpu, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    h, w, b = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((9, 4), (7, 4), (7,)))
    t = torch.randint(0, 7, (9,), generator=gen)
    want = reference.token_nll(torch.nn.functional.linear(h, w, b), t).mean()
    tracked = h.clone().requires_grad_()
    cases = {"outside first_order": (False, {"cpu"}, tracked), "no gradient wanted": (True, {"cpu"}, h),
             "device left out": (True, set(), tracked),
             # fp32 without autocast, fewer rows than twice the width: the gradient scalings would cost more
             "too few rows": (True, {"cpu"}, tracked[:7])}
    for name, (inside, devices, hh) in cases.items():
        set_fastpath(monkeypatch, head=devices)
        with fused_loss.first_order() if inside else torch.enable_grad() as mode:
            got = _head_loss(hh, w, b, t[:hh.shape[0]])
        assert head_calls(mode) == 0, name
        want = reference.token_nll(torch.nn.functional.linear(hh, w, b), t[:hh.shape[0]]).mean()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # outside first_order it is twice differentiable: a Hessian-vector product through it
    set_fastpath(monkeypatch, head={"cpu"})
    v = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    hvp = torch.func.jvp(grad(lambda w_: _head_loss(h, w_, b, t)), (w,), (v,))[1]
    want_hvp = torch.func.jvp(grad(lambda w_: reference.token_nll(h @ w_.t() + b, t).mean()), (w,), (v,))[1]
    torch.testing.assert_close(hvp, want_hvp, rtol=1e-10, atol=1e-12)
    # bad targets get the composed form's errors
    with fused_loss.first_order(), pytest.raises(TypeError, match="integer tensor"):
        grad(_head_loss, argnums=1)(h, w, b, t.double())


class _Casts(TorchDispatchMode):
    """Counts the dtype casts (aten._to_copy) that reach the backend."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # the per-chain loss gradients (2 chains) are not counted
        self.count += func.overloadpacket.__name__ == "_to_copy" and args[0].numel() > 2
        return func(*args, **(kwargs or {}))


@requires_extension
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32-weight", "bf16-weight"])
def test_under_autocast_operands_are_cast_once(fused_on_cpu, weight_dtype):
    # each operand is cast to bf16 once, inside the function (not also to learn the dtypes); a weight that is
    # already bf16 (the engine's working copy) beside fp32 activations fuses too, with the composed form's values
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 40, 8, generator=gen)
    weight = torch.randn(30, 8, generator=gen).to(weight_dtype)
    bias = torch.randn(30, generator=gen).to(weight_dtype)
    targets = torch.randint(0, 30, (2, 40), generator=gen)
    pass_ = vmap(grad_and_value(_head_loss, argnums=(0, 1, 2)), in_dims=(0, None, None, 0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with _Casts() as composed_casts:
            want = pass_(hidden, weight, bias, targets)
        with fused_loss.first_order() as mode, _Casts() as casts:
            got = pass_(hidden, weight, bias, targets)
    assert head_calls(mode) == 1
    # autocast casts each fp32 operand, the logits up and their gradient down, and the operands' gradients
    # back; the fusion casts each fp32 operand once and scales its gradient back into fp32 in one pass
    fp32_operands = sum(t.dtype == torch.float32 for t in (hidden, weight, bias))
    assert composed_casts.count == 2 * fp32_operands + 2 and casts.count == fp32_operands
    # bf16 logits with the bias added before rounding (the fusion) or after (torch's linear on a CPU)
    torch.testing.assert_close(got[1], want[1], rtol=2 ** -8, atol=0)
    for g, w in zip(got[0], want[0]):
        assert g.dtype == w.dtype
        # products of bf16 operands (each rounded to 2^-9 relative) with the logits' gradient rounded in
        # different places: compared as whole tensors
        assert ((g.float() - w.float()).norm() / w.float().norm()).item() < 2 ** -6


@requires_extension
def test_the_logits_are_not_kept_for_the_backward(fused_on_cpu, monkeypatch):
    from llcfast.engine.planner import measure_saved_tensors
    set_fastpath(monkeypatch, token_loss={"cpu"})  # the composed form with the fused loss kernel
    model = lm(vocab=2000, d_model=16, dtype=torch.float32)
    tokens = torch.randint(0, 2000, (4, 33))
    logits_bytes = 4 * 32 * 2000 * 4

    def saved(fused):
        with fused_loss.first_order(), chain_fold.folding(head=None if fused else set()):
            return measure_saved_tensors(lambda: fused_losses.next_token_loss_fast(model, tokens))

    (total, largest), (total_composed, largest_composed) = saved(True), saved(False)
    assert largest_composed == logits_bytes  # the loss keeps the logits
    assert largest < logits_bytes / 4 and total < total_composed - logits_bytes / 2


@requires_extension
@pytest.mark.filterwarnings("ignore:the loader holds")
@pytest.mark.filterwarnings("ignore:the LLC estimate is negative")
@pytest.mark.parametrize("extra", [{}, dict(restrict=["unembed.*"]), dict(restrict=["blocks.*"]),
                                   dict(grad_accum_steps=2), dict(precision="bf16")],
                         ids=["plain", "restrict-head", "restrict-body", "accum", "bf16"])
def test_estimate_llc_with_the_fusion_equals_it_without(fold_as_on_cuda, extra):
    model = lm(vocab=40, d_model=16, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    loader = [torch.randint(0, 40, (3, 17), generator=g) for _ in range(4)]
    kwargs = dict(dict(num_burnin=0, num_chains=3, num_draws=4, nbeta=5.0, epsilon=1e-3, progress=False, backend="fast", seed=3),
                  **extra)
    fused = llcfast.estimate_llc(model, loader, models.next_token_loss, **kwargs)
    with chain_fold.folding(head=set()):
        plain = llcfast.estimate_llc(model, loader, models.next_token_loss, **kwargs)
    assert fused.config.get("head_fusion") is True and "head_fusion" not in plain.config
    if extra.get("precision") == "bf16":
        # bf16 logits with the bias added before rounding (the fusion) or after (torch's batched linear on a CPU)
        torch.testing.assert_close(fused.loss_trace, plain.loss_trace, rtol=2 ** -8, atol=1e-5)
    else:
        torch.testing.assert_close(fused.loss_trace, plain.loss_trace, rtol=1e-5, atol=1e-6)


def test_hidden_then_unembedding_is_the_forward():
    model = lm(dtype=torch.float32)
    tokens = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(model.unembed(model.hidden(tokens)), model(tokens), rtol=0, atol=0)


@requires_extension
def test_hugging_face_gpt2_loss_is_its_own_and_fused(fused_on_cpu):
    from llc_models import gpt2_chains, tiny_gpt2
    model = tiny_gpt2().double()
    ids = torch.randint(0, 40, (3, 12))
    want = model(input_ids=ids, labels=ids).loss  # whose cross-entropy runs in float32 (Hugging Face upcasts)
    for batch in (ids, (ids,), {"input_ids": ids}, {"input_ids": ids, "labels": ids.clone()}):
        torch.testing.assert_close(models.hf_next_token_loss(model, batch), want.double(), rtol=1e-6, atol=1e-6)
    _, loss, params, batch = gpt2_chains()
    with chain_fold.folding(head=set()):
        want_g, want_loss = vmapped_grads(loss, 0)(params, batch)
    with fused_loss.first_order() as mode:
        got_g, got_loss = vmapped_grads(loss, 0)(params, batch)
    assert head_calls(mode) == 1
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-5)


def test_hugging_face_batches_it_cannot_score():
    pytest.importorskip("transformers")
    from llc_models import tiny_gpt2
    model = tiny_gpt2()
    ids = torch.randint(0, 40, (2, 8))
    with pytest.raises(ValueError, match="attention masks pass loss_fn=None"):
        models.hf_next_token_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    masked = ids.clone()
    masked[:, :3] = -100
    with pytest.raises(ValueError, match="-100 masks"):
        models.hf_next_token_loss(model, {"input_ids": ids, "labels": masked})
