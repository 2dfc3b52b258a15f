"""Draws on batches of their own (draw_batches="independent", the default):
both backends take the same ones; their expected loss is the full-data loss
at the chain's weights, while the loss of the batch about to drive the step
(draw_batches="step", devinterp 1.x's) reads high with minibatches at a large
nbeta. The chains' paths are the same either way: only the draws differ."""
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import llcfast
from llc_models import mlp, mse, regression_loader


@pytest.mark.parametrize("init_loss", ["exact", "paired"])
@pytest.mark.parametrize("kind", ["list", "shuffled", "sequential"])
def test_fast_and_reference_take_the_same_draws(kind, init_loss):
    base = regression_loader(n=64, batch_size=16)
    loader = {"list": list(base), "shuffled": DataLoader(base.dataset, batch_size=16, shuffle=True),
              "sequential": base}[kind]
    kw = dict(num_chains=3, num_draws=6, num_burnin=2, steps_between_draws=2, epsilon=1e-3, nbeta=5.0, seed=1,
              progress=False, init_loss=init_loss, grad_accum_steps=1)
    fast = llcfast.estimate_llc(mlp(), loader, mse, backend="fast", **kw)
    ref = llcfast.estimate_llc(mlp(), loader, mse, backend="reference", **kw)
    assert fast.config["draw_batches"] == ref.config["draw_batches"] == "independent"
    np.testing.assert_allclose(fast.loss_trace, ref.loss_trace, rtol=1e-5, atol=1e-6)
    if init_loss == "paired":
        np.testing.assert_allclose(fast.init_trace, ref.init_trace, rtol=1e-5, atol=1e-6)
    step = llcfast.estimate_llc(mlp(), loader, mse, backend="fast", draw_batches="step", **kw)
    assert not np.allclose(step.loss_trace, fast.loss_trace)


def test_one_full_batch_has_no_other_batch_to_draw_on():
    x = torch.randn(32, 5)
    r = llcfast.estimate_llc(mlp(), [(x, x.sum(1))], mse, num_chains=2, num_draws=3, num_burnin=0, epsilon=1e-3,
                             nbeta=5.0, progress=False)
    assert r.config["draw_batches"] == "step"


def test_the_devinterp_shim_keeps_devinterps_draws():
    from llcfast.devinterp import estimate_learning_coeff_with_summary
    from devinterp.optim import SGLD
    out = estimate_learning_coeff_with_summary(mlp(), regression_loader(), evaluate=mse, sampling_method=SGLD,
                                               optimizer_kwargs=dict(lr=1e-3, localization=100.0, nbeta=5.0),
                                               num_chains=2, num_draws=3, verbose=False, seed=0)
    assert np.isfinite(out["llc/mean"])
    with pytest.raises(ValueError, match=r"draw_batches must be one of \('independent', 'step'\), got 'next'"):
        llcfast.estimate_llc(mlp(), regression_loader(), mse, draw_batches="next", progress=False)


def test_independent_draws_are_unbiased_for_the_full_data_loss_where_step_draws_read_high():
    """Least squares on 1,000 samples in minibatches of 50 at nbeta 200, 16 x
    m / log m: the minibatch noise heats the chains, and each chain tracks
    the batches it was just driven by. At every draw the full-data loss at
    the same weights is computed from the callbacks; the independent draw
    minus it averages to zero within its error, the step draw minus it does
    not. The standard errors come from the chains' own means (independent)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 5, generator=g)
    y = x @ torch.randn(5, generator=g) + 0.5 * torch.randn(1000, generator=g)
    model = torch.nn.Linear(5, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution.T)
    loader = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True)
    burn, draws, chains = 300, 300, 8
    full = []

    def record(step, chains, loss, params):
        full.append(((torch.einsum("cod,nd->cn", params["weight"], x) - y) ** 2).mean(1).clone())

    kw = dict(num_chains=chains, num_draws=draws, num_burnin=burn, epsilon=4e-4, gamma=1.0, nbeta=200.0, seed=2,
              progress=False, callbacks=[record], trust_checks=False)
    gaps = {}
    for kind in ("independent", "step"):
        full.clear()
        with pytest.warns(UserWarning, match="heats the chains"):
            r = llcfast.estimate_llc(model, loader, mse, draw_batches=kind, **kw)
        at_weights = torch.stack(full).double()[burn - 1:burn - 1 + draws].T.numpy()  # L_n(w_t), [C, draws]
        gaps[kind] = (r.loss_trace - at_weights).mean(1)  # per chain
    for kind, per_chain in gaps.items():
        se = per_chain.std(ddof=1) / math.sqrt(chains)
        if kind == "independent":
            assert abs(per_chain.mean()) < 4 * se, (per_chain.mean(), se)
        else:
            assert per_chain.mean() > 4 * se, (per_chain.mean(), se)
