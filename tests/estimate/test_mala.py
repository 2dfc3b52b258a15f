"""MALA acceptance (estimate_llc(mala=True)): the fast engine's on-device
values equal the float64 reference's, and both equal the closed form on a
quadratic loss computed from the recorded trajectory; acceptance falls from 1
as epsilon grows; the options it cannot serve are refused by name."""
import math

import numpy as np
import pytest
import torch

import llcfast
from llcfast.estimate.checks import mala_diagnostics
from llc_models import linear_problem, mlp, mse, regression_loader

KW = dict(num_burnin=0, num_chains=3, num_draws=25, gamma=100.0, nbeta=30.0, seed=1, progress=False, mala=True)


@pytest.mark.parametrize("restrict", [None, ["2.*"]])
def test_fast_engine_equals_reference(restrict):
    kw = dict(KW, epsilon=1e-3, restrict=restrict, weight_decay=0.1)
    fast = llcfast.estimate_llc(mlp(), regression_loader(), mse, **kw)
    ref = llcfast.estimate_llc(mlp(), regression_loader(), mse, backend="reference", **kw)
    a, b = fast.diagnostics["mala_acceptance_trace"], ref.diagnostics["mala_acceptance_trace"]
    assert a.shape == (3, 24) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=2e-5)
    assert fast.diagnostics["mala_acceptance"] == pytest.approx(a.mean())
    np.testing.assert_allclose(fast.diagnostics["mala_acceptance_per_chain"], a.mean(1))


def test_equals_the_closed_form_on_a_quadratic_loss():
    """Least squares: U and its gradient in closed form, in float64, on the
    positions the chains actually visited."""
    model, data, x = linear_problem(2, n=64)
    y = data[0][1].double()
    xd = x.double()
    w_star = model.weight.detach().double()[0]
    eps, nbeta, gamma, chains = 2e-3, 30.0, 10.0, 2
    visited = []
    llcfast.estimate_llc(model, data, mse, num_chains=chains, num_draws=40, epsilon=eps, gamma=gamma, nbeta=nbeta,
                         seed=3, progress=False,
                         callbacks=[lambda step, chains, loss, params: visited.append(params["weight"].clone())], num_burnin=0)
    res = llcfast.estimate_llc(model, data, mse, num_chains=chains, num_draws=40, epsilon=eps, gamma=gamma,
                               nbeta=nbeta, seed=3, progress=False, mala=True, num_burnin=0)
    path = torch.stack([w_star.expand(chains, 2)] + [v[:, 0].double() for v in visited[:-1]], dim=1)  # [C, T, 2]

    def u(w):
        r = w @ xd.T - y
        return nbeta * (r ** 2).mean(-1) + 0.5 * gamma * ((w - w_star) ** 2).sum(-1)

    def drift(w):
        r = w @ xd.T - y
        return nbeta * 2 * r @ xd / xd.shape[0] + gamma * (w - w_star)

    w0, w1 = path[:, :-1], path[:, 1:]
    log_a = (u(w0) - u(w1) - ((w0 - w1 + eps / 2 * drift(w1)) ** 2).sum(-1) / (2 * eps)
             + ((w1 - w0 + eps / 2 * drift(w0)) ** 2).sum(-1) / (2 * eps))
    want = log_a.clamp(max=0).exp().numpy()
    got = res.diagnostics["mala_acceptance_trace"]
    assert want.min() < 0.99  # a step size at which acceptance is informative
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_acceptance_falls_from_one_as_epsilon_grows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    full_batch = [(x, torch.sin(x.sum(-1)))]  # one batch: no minibatch noise in U
    rates = [llcfast.estimate_llc(mlp(), full_batch, mse, **dict(KW, num_chains=4, num_draws=150, epsilon=eps))
             .diagnostics["mala_acceptance"] for eps in (1e-5, 1e-4, 1e-3, 3e-3)]
    assert rates[0] > 0.999
    assert all(a > b for a, b in zip(rates, rates[1:])), rates
    assert rates[-1] < 0.95


def test_steps_after_a_divergence_do_not_count():
    trace = np.full((2, 5), 0.5)
    trace[1, 2:] = 0.0
    d = mala_diagnostics(trace, {1: 3})
    assert np.isnan(d["mala_acceptance_trace"][1, 2:]).all()
    assert d["mala_acceptance"] == pytest.approx(0.5)
    assert mala_diagnostics(None, {}) == {}


@pytest.mark.parametrize("kw,exc,match", [
    (dict(sampler="rmsprop_sgld"), ValueError, "sampler='rmsprop_sgld' proposes differently"),
    (dict(bounding_box=1.0), ValueError, "drop bounding_box"),
    (dict(noise_scale=0.0), ValueError, "needs noise"),
    (dict(mala="yes"), TypeError, "mala must be True or False"),
])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_what_mala_cannot_serve_is_refused(kw, exc, match, backend):
    with pytest.raises(exc, match=match):
        llcfast.estimate_llc(mlp(), regression_loader(), mse, **dict(KW, epsilon=1e-3, backend=backend, **kw))


def test_not_recorded_unless_asked():
    res = llcfast.estimate_llc(mlp(), regression_loader(), mse, **dict(KW, epsilon=1e-3, mala=False))
    assert "mala_acceptance" not in res.diagnostics
    assert math.isfinite(res.llc_mean)
