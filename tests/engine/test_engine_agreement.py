"""Step for step, the stacked engine walks the same trajectory as the
sequential reference: same minibatches per chain, same (seed, step, chain)
noise, so the parameters after every step agree to fp32 rounding."""
import numpy as np
import pytest
import torch

import llcfast
from llcfast import reference
from llc_models import (TinyTransformer, gpt2_batches, mlp, mse, regression_loader, tiny_gpt2, token_loader,
                        token_loss)

EPS32 = torch.finfo(torch.float32).eps


def record_into(store):
    def cb(step, chains, loss, params):
        for i, c in enumerate(chains):
            store[(c, step)] = (float(loss[i]), {n: p[i].detach().clone() for n, p in params.items()})
    return cb


def run_both(model, loader, loss_fn, **kw):
    ref, fast = {}, {}
    r = reference.estimate_llc(model, loader, loss_fn, progress=False, callbacks=[record_into(ref)], **kw)
    f = llcfast.estimate_llc(model, loader, loss_fn, progress=False, callbacks=[record_into(fast)], backend="fast",
                             **kw)
    return r, f, ref, fast


def assert_same_trajectory(r, f, ref, fast, steps, nbeta, eps):
    """Both backends update with bit-identical arithmetic given the same
    gradient (the fused kernel and its twin), so what differs is the
    gradient's summation order in batched vs per-chain passes: a few ulps of
    each term, scaled by a = eps*nbeta/2 into the parameters. Over a short
    run of this locally contractive map the differences add up at most
    linearly in the steps: per element, steps * 8 ulp of max(|w|, a*|g|, 1)."""
    assert set(ref) == set(fast)
    a = eps * nbeta / 2
    for key in ref:
        (loss_r, p_r), (loss_f, p_f) = ref[key], fast[key]
        assert loss_f == pytest.approx(loss_r, rel=steps * 8 * EPS32, abs=steps * 8 * EPS32), key
        for name in p_r:
            scale = max(1.0, float(p_r[name].abs().max()), a * float(p_r[name].abs().max()))
            diff = float((p_f[name] - p_r[name]).abs().max())
            assert diff <= steps * 8 * EPS32 * scale, (key, name, diff)
    np.testing.assert_allclose(f.loss_trace, r.loss_trace, rtol=steps * 8 * EPS32)
    np.testing.assert_allclose(f.llc_per_chain, r.llc_per_chain, rtol=1e-4, atol=1e-5)
    for stat in ("grad_norm_sq_mean", "distance_sq_mean", "noise_norm_sq_mean"):
        np.testing.assert_allclose(f.diagnostics[stat], r.diagnostics[stat], rtol=1e-4, atol=1e-12)
    assert f.init_loss == r.init_loss


@pytest.mark.filterwarnings("ignore:the LLC estimate is negative")
@pytest.mark.parametrize("chains,restrict", [
    (1, None),
    (3, None),
    (3, ["2.*"]),
    (2, "mask"),
])
def test_mlp(chains, restrict):
    model = mlp()
    if restrict == "mask":
        restrict = {"0.weight": torch.rand(12, 5, generator=torch.Generator().manual_seed(1)) > 0.5,
                    "2.bias": torch.tensor([True])}
    kw = dict(num_chains=chains, num_draws=8, num_burnin=3, steps_between_draws=2, epsilon=1e-3, nbeta=20.0,
              gamma=50.0, weight_decay=0.01, seed=5, restrict=restrict)
    r, f, ref, fast = run_both(model, regression_loader(), mse, **kw)
    assert f.config["backend"] == "fast"
    assert_same_trajectory(r, f, ref, fast, steps=19, nbeta=20.0, eps=1e-3)
    if restrict is not None:
        for name, p in model.named_parameters():
            if isinstance(restrict, dict):
                frozen = ~restrict[name] if name in restrict else torch.ones_like(p, dtype=torch.bool)
            else:
                frozen = torch.full_like(p, not name.startswith("2."), dtype=torch.bool)
            for key, (_, params) in fast.items():
                assert torch.equal(params[name][frozen], p.detach()[frozen]), (key, name)
            assert any(not torch.equal(params[name], p.detach()) for _, params in fast.values()) == \
                bool((~frozen).any()), name


@pytest.mark.filterwarnings("ignore:the LLC estimate is negative")
@pytest.mark.parametrize("chains,restrict", [(3, None), (2, ["blocks.0.attn.*", "unembed.bias"])])
def test_small_transformer(chains, restrict):
    model = TinyTransformer()
    kw = dict(num_burnin=0, num_chains=chains, num_draws=10, epsilon=1e-3, nbeta=8.0, gamma=100.0, seed=11, restrict=restrict)
    r, f, ref, fast = run_both(model, token_loader(), token_loss, **kw)
    assert f.config["backend"] == "fast"
    assert_same_trajectory(r, f, ref, fast, steps=10, nbeta=8.0, eps=1e-3)


@pytest.mark.filterwarnings("ignore:the LLC estimate is negative")
def test_hugging_face_gpt2_without_loss_fn():
    model = tiny_gpt2()
    kw = dict(num_burnin=0, num_chains=2, num_draws=6, epsilon=1e-4, nbeta=10.0, seed=2)
    r, f, ref, fast = run_both(model, gpt2_batches(), None, **kw)
    assert f.config["backend"] == "fast"
    assert_same_trajectory(r, f, ref, fast, steps=6, nbeta=10.0, eps=1e-4)


class PassLoader:
    """Each pass (iter call) yields batches of its own size, so at one step the
    chains' batches cannot be stacked; the engine then computes that step
    chain by chain. Passes are assigned alike in both backends: pass 0 is
    the loss at w*, pass c + 1 is chain c's."""

    def __init__(self, steps):
        self.steps, self.passes = steps, 0

    def __len__(self):
        return self.steps

    def __iter__(self):
        g = torch.Generator().manual_seed(self.passes)
        size = 6 + self.passes
        self.passes += 1
        for _ in range(self.steps):
            x = torch.randn(size, 5, generator=g)
            yield x, torch.sin(x.sum(-1))


@pytest.mark.filterwarnings("ignore:the LLC estimate is negative")
def test_unstackable_batches_fall_back_per_step():
    model = mlp()
    kw = dict(num_burnin=0, num_chains=3, num_draws=6, epsilon=1e-3, nbeta=20.0, seed=4, num_init_batches=1,
              draw_batches="step")
    ref, fast = {}, {}
    r = reference.estimate_llc(model, PassLoader(6), mse, progress=False, callbacks=[record_into(ref)], **kw)
    f = llcfast.estimate_llc(model, PassLoader(6), mse, progress=False, callbacks=[record_into(fast)], **kw)
    assert_same_trajectory(r, f, ref, fast, steps=6, nbeta=20.0, eps=1e-3)


@pytest.mark.filterwarnings("ignore:the LLC estimate is negative")
@pytest.mark.parametrize("chains", [1, 3])
def test_gradient_accumulation_matches_the_reference_and_one_big_batch(chains):
    """Two micro-batches of 8 per step walk the reference's trajectory, and
    the trajectory of one batch of 16 made of the same rows (the mean loss,
    so the same gradient up to summation order)."""
    kw = dict(num_chains=chains, num_draws=6, num_burnin=2, epsilon=1e-3, nbeta=20.0, gamma=50.0, seed=2)
    micro = regression_loader(n=64, batch_size=8)
    r, f, ref, fast = run_both(mlp(), micro, mse, grad_accum_steps=2, **kw)
    assert f.config["grad_accum_steps"] == 2
    assert_same_trajectory(r, f, ref, fast, steps=8, nbeta=20.0, eps=1e-3)
    big = {}
    llcfast.estimate_llc(mlp(), regression_loader(n=64, batch_size=16), mse, progress=False, backend="fast",
                         callbacks=[record_into(big)], **kw)
    for key in fast:
        assert fast[key][0] == pytest.approx(big[key][0], rel=1e-5)
        for name in fast[key][1]:
            torch.testing.assert_close(fast[key][1][name], big[key][1][name], rtol=1e-5, atol=1e-6)
    # The default nbeta counts the effective batch of 16.
    d = llcfast.estimate_llc(mlp(), micro, mse, num_chains=1, num_draws=2, grad_accum_steps=2, progress=False, num_burnin=0, epsilon=1e-4)
    assert d.config["nbeta"] == pytest.approx(16 / np.log(16))
    with pytest.raises(ValueError, match=r"grad_accum_steps must be in \[1, "):
        llcfast.estimate_llc(mlp(), micro, mse, grad_accum_steps=0, progress=False)
