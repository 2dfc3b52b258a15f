"""SDPA folded over stacked chains (llcfast.fastpath.attention): the same loss
and gradients as torch's SDPA under the fast engine's vmap(grad), one call
each way for all chains, and torch's own SDPA wherever the fold cannot serve
a call exactly."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch.func import grad, grad_and_value, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import llcfast
from conftest import HAS_CUDA, requires_cuda
from llc_models import gpt2_chains
from llcfast.fastpath import attention as chain_attention, token_loss as fused_loss
from llcfast.pipeline import models
from llcfast.engine.functional import chain_loss, vmapped_grads
from llcfast.engine.sampler import SamplerConfig, _choose_mode
from fastpaths import set_fastpath

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.fixture(autouse=True)
def fold_on_cpu(monkeypatch):
    """The fold runs on CUDA only (on a CPU it costs more than it saves); the
    tests run it on the CPU too, as CUDA's semantics."""
    set_fastpath(monkeypatch, attention={"cpu", "cuda"})
    set_fastpath(monkeypatch, layer_norm={"cpu", "cuda"})


@pytest.fixture
def attend_calls(monkeypatch):
    """The shapes of every SDPA call the fold makes, forward and backward."""
    calls = []
    inner = chain_attention._attend

    def spy(q, k, v, is_causal, scale):
        calls.append(tuple(q.shape))
        return inner(q, k, v, is_causal, scale)

    monkeypatch.setattr(chain_attention, "_attend", spy)
    return calls


def attention_loss(w, x, **sdpa):
    # x [B, T, D] -> q, k, v [B, H, T, E] from one chain's projection w [3 H E, D].
    b, t, _ = x.shape
    q, k, v = (x @ w.t()).view(b, t, 3, 2, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v, **sdpa).square().mean()


def chains_grads(w, x, fold: bool, precision="fp32", **sdpa):
    f = vmap(grad_and_value(lambda w, x: attention_loss(w, x, **sdpa)))
    autocast = torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with autocast, (fused_loss.first_order() if fold else torch.enable_grad()):
            g, loss = f(w, x)
    return g, loss, [str(s.message) for s in seen if "performance drop" in str(s.message)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@given(chains=st.integers(1, 4), batch=st.integers(1, 3), t=st.integers(1, 9), causal=st.booleans(),
       scale=st.sampled_from([None, 0.3]))
def test_same_loss_and_gradients_as_torch_sdpa_under_vmap_grad(device, precision, chains, batch, t, causal, scale):
    g = torch.Generator().manual_seed(chains * 100 + batch * 10 + t)
    w = torch.randn(chains, 3 * 2 * 4, 5, generator=g).to(device)
    x = torch.randn(chains, batch, t, 5, generator=g).to(device)
    sdpa = dict(is_causal=causal, scale=scale)
    want_g, want_loss, _ = chains_grads(w, x, fold=False, precision=precision, **sdpa)
    got_g, got_loss, drops = chains_grads(w, x, fold=True, precision=precision, **sdpa)
    # The same kernel on the same rows, only batched differently: torch's own rounding.
    tol = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=2 ** -7, atol=1e-5)
    torch.testing.assert_close(got_loss, want_loss, **tol)
    torch.testing.assert_close(got_g, want_g, **tol)
    assert drops == []


def test_one_call_each_way_for_all_chains_and_no_fallback_warning(attend_calls):
    chains, batch, t = 3, 2, 6
    w, x = torch.randn(chains, 24, 5), torch.randn(chains, batch, t, 5)
    _, _, drops = chains_grads(w, x, fold=False, is_causal=True)
    assert drops and attend_calls == []  # torch runs SDPA chain by chain under vmap, and says so
    _, _, drops = chains_grads(w, x, fold=True, is_causal=True)
    assert drops == []
    # The forward, then the backward's recomputation: chains folded into the batch of one call each.
    assert attend_calls == [(chains * batch, 2, t, 4)] * 2


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_an_operand_shared_by_all_chains_is_broadcast():
    chains = 3
    q = torch.randn(chains, 2, 2, 5, 4)
    kv = torch.randn(2, 2, 5, 4)

    def loss(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).sum()

    f = vmap(grad(loss, argnums=(0, 1, 2)), in_dims=(0, None, None))
    want = f(q, kv, kv)
    with fused_loss.first_order():
        got = f(q, kv, kv)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra", [dict(attn_mask=torch.ones(5, 5, dtype=torch.bool).tril()), dict(dropout_p=0.5)]
                         + ([dict(enable_gqa=True)] if torch.torch_version.TorchVersion(torch.__version__) >= "2.5"
                            else []))  # SDPA's enable_gqa arrived in torch 2.5
def test_calls_the_fold_cannot_serve_exactly_go_to_torch(extra, attend_calls):
    q = torch.randn(2, 2, 5, 4)
    with fused_loss.first_order() as mode:
        F.scaled_dot_product_attention(q, q, q, **extra)
    assert mode.folded == 0 and attend_calls == []


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_a_cpu_is_left_to_torch_by_default(monkeypatch, attend_calls):
    set_fastpath(monkeypatch, attention={"cuda"})
    w, x = torch.randn(2, 24, 5), torch.randn(2, 2, 6, 5)
    with fused_loss.first_order() as mode:
        vmap(grad(lambda w, x: attention_loss(w, x, is_causal=True)))(w, x)
    assert mode.folded == 0 and attend_calls == []


def test_mismatched_leading_dimensions_go_to_torch(attend_calls):
    q, kv = torch.randn(2, 2, 5, 4), torch.randn(1, 2, 5, 4)  # torch broadcasts k and v; the fold would not
    with fused_loss.first_order():
        out = F.scaled_dot_product_attention(q, kv, kv)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, kv, kv))
    assert attend_calls == []


@pytest.mark.skipif(not hasattr(torch, "get_autocast_dtype"), reason="torch before the device-generic autocast queries")
def test_autocast_dtype_asks_the_device_generic_query(recwarn):
    """Where torch has torch.get_autocast_dtype the fold asks it, not the
    per-device queries torch deprecates (a misspelt name once sent every
    call down the fallback, behind a DeprecationWarning)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert chain_attention.autocast_dtype("cpu") == torch.bfloat16
    assert chain_attention.autocast_dtype("cpu") is None
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


def test_outside_first_order_sdpa_is_torchs_and_twice_differentiable():
    # On its math backend, as the Hessian passes run it: torch's fused kernels have no second derivative either.
    q = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)

    def second_derivative():
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True).square().sum()
        (g,) = torch.autograd.grad(out, q, create_graph=True)
        return torch.autograd.grad(g.sum(), q)[0]

    with sdpa_kernel(SDPBackend.MATH):
        assert torch.isfinite(second_derivative()).all()
    with sdpa_kernel(SDPBackend.MATH), fused_loss.first_order(), \
            pytest.raises(RuntimeError, match="no derivative of its own"):
        second_derivative()


def lm_batches(n, batch=3, seq=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 40, (batch, seq), generator=g) for _ in range(n)]


def lm(attention):
    torch.manual_seed(0)
    return models.AttentionOnlyLM(vocab=40, d_model=16, heads=2, layers=2, context=32, attention=attention)


def test_choose_mode_keeps_the_mode_only_for_passes_that_fold_a_call(monkeypatch):
    cfg = SamplerConfig(num_chains=2, steps=1, epsilon=1e-4, nbeta=10.0, gamma=100.0, weight_decay=0.0,
                        noise_scale=1.0, seed=0)
    batch = lm_batches(1)[0].expand(2, 3, 17)
    # The LM's 3 layer norms (2 blocks and the final one) and 2 attention calls, each folded once a pass.
    cases = [("sdpa", {"cpu"}, {"sdpa": 2, "layer_norm": 3}), ("matmul", {"cpu"}, {"layer_norm": 3}),
             ("sdpa", set(), {"sdpa": 2}), ("matmul", set(), {})]
    for attention, norm_devices, want in cases:
        set_fastpath(monkeypatch, layer_norm=norm_devices)
        model = lm(attention)
        names = [n for n, _ in model.named_parameters()]
        params = [p.detach().expand((2,) + p.shape).clone() for p in model.parameters()]
        loss = chain_loss(model, models.next_token_loss, names)
        assert _choose_mode(loss, params, (batch, 0, None), cfg, torch.device("cpu")) == ("vmap", want)


def test_a_fold_that_breaks_vmap_is_left_out_not_the_batched_pass(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("fold failed")

    monkeypatch.setattr(chain_attention, "folded_sdpa", broken)
    loader = lm_batches(4)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = llcfast.estimate_llc(lm("sdpa"), loader, models.next_token_loss, num_chains=2, num_draws=3,
                                 nbeta=5.0, progress=False, num_burnin=0, epsilon=1e-4)
    assert r.config["backend"] == "fast" and torch.isfinite(torch.tensor(r.llc_mean))
    assert not any("one after another" in str(w.message) for w in seen)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.filterwarnings("ignore:the loader holds")
@pytest.mark.parametrize("extra", [{}, dict(chain_chunk=2), dict(restrict=["blocks.0.*"]), dict(grad_accum_steps=2),
                                   dict(mala=True), dict(precision="bf16")])
def test_estimate_llc_with_the_fold_equals_it_without(monkeypatch, attend_calls, extra):
    loader = lm_batches(4)
    # Stacked passes, as on CUDA (a CPU's plan might go chain by chain).
    kwargs = dict(dict(num_burnin=0, num_chains=3, num_draws=4, nbeta=5.0, epsilon=1e-3, progress=False, backend="fast", seed=3,
                       chain_chunk=3), **extra)
    folded = llcfast.estimate_llc(lm("sdpa"), loader, models.next_token_loss, **kwargs)
    assert attend_calls and folded.config["backend"] == "fast" and folded.config["attention_fold"] is True
    monkeypatch.setattr(chain_attention, "_foldable", lambda call: False)
    plain = llcfast.estimate_llc(lm("sdpa"), loader, models.next_token_loss, **kwargs)
    assert "attention_fold" not in plain.config
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.as_tensor(folded.loss_trace), torch.as_tensor(plain.loss_trace), **tol)
    if extra.get("mala"):
        torch.testing.assert_close(torch.as_tensor(folded.diagnostics["mala_acceptance_trace"]),
                                   torch.as_tensor(plain.diagnostics["mala_acceptance_trace"]), **tol)


def test_hugging_face_gpt2_attention_is_folded(attend_calls):
    config, loss, params, batch = gpt2_chains()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want_g, want_loss = vmapped_grads(loss, 0)(params, batch)
    with fused_loss.first_order():
        got_g, got_loss = vmapped_grads(loss, 0)(params, batch)
    assert len(attend_calls) == 2 * config.n_layer  # each layer's forward and its backward, all chains at once
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-6)


@requires_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_fused_kernels_each_way_once_for_all_chains(precision):
    from torch.profiler import ProfilerActivity, profile
    w = torch.randn(4, 3 * 2 * 32, 64, device="cuda")
    x = torch.randn(4, 2, 128, 64, device="cuda")
    chains_grads(w, x, fold=True, precision=precision, is_causal=True)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        chains_grads(w, x, fold=True, precision=precision, is_causal=True)
    names = [e.key for e in prof.key_averages()]
    fused = [n for n in names if ("flash" in n or "efficient" in n or "cudnn" in n) and n.startswith("aten::_")]
    assert fused and not any("_scaled_dot_product_attention_math" in n for n in names)
    counts = {e.key: e.count for e in prof.key_averages() if e.key in fused}
    assert all(c <= 2 for c in counts.values()), counts  # forward + recomputation, not once per chain


@requires_cuda
@pytest.mark.filterwarnings("ignore:the LLC estimate is negative")
def test_cuda_graph_replay_of_the_folded_pass_walks_the_reference_trajectory():
    from llcfast import reference
    from test_engine_agreement import assert_same_trajectory, record_into
    model = lm("sdpa").cuda()
    loader = [b.cuda() for b in lm_batches(4)]
    kw = dict(num_burnin=0, num_chains=3, num_draws=8, epsilon=1e-3, nbeta=5.0, gamma=100.0, seed=2, progress=False, device="cuda")
    ref, graphed = {}, {}
    r = reference.estimate_llc(model, loader, models.next_token_loss, callbacks=[record_into(ref)], **kw)
    with fused_loss.first_order() as probe:  # the fold is what the engine's pass runs here
        vmap(grad(lambda w, x: attention_loss(w, x, is_causal=True)))(torch.randn(2, 24, 5, device="cuda"),
                                                                      torch.randn(2, 2, 6, 5, device="cuda"))
    assert probe.folded == 1
    g = llcfast.estimate_llc(model, loader, models.next_token_loss, callbacks=[record_into(graphed)], backend="fast",
                             cuda_graphs=True, **kw)
    assert g.config["cuda_graphs"] is True
    assert_same_trajectory(r, g, ref, graphed, steps=8, nbeta=5.0, eps=1e-3)
