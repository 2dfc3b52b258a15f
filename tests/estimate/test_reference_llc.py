"""The sequential reference estimator against an exact answer, and its
handling of bad input, divergence and restriction."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from llcfast import reference
from llc_models import exact_sgld_llc, linear_problem, mse


@pytest.mark.parametrize("d", [2, 10])
def test_regular_model_hits_exact_value_near_d_over_2(d):
    model, loader, x = linear_problem(d)
    nbeta, gamma, eps = 50.0, 1.0, 2e-4
    want = exact_sgld_llc(x, nbeta, gamma, eps)
    assert abs(want - d / 2) < 0.05 * d / 2  # gamma and eps shift it only slightly from d/2
    r = reference.estimate_llc(model, loader, mse, num_chains=4, num_draws=1500, num_burnin=300, epsilon=eps,
                               gamma=gamma, nbeta=nbeta, num_init_batches=1, seed=3, progress=False)
    # Tolerance from the chains' own spread: 4 standard errors of their mean.
    tol = 4 * r.llc_std / math.sqrt(4)
    assert abs(r.llc_mean - want) < tol, (r.llc_mean, want, tol)
    assert r.diagnostics["diverged_chains"] == []
    assert r.loss_trace.shape == (4, 1500) and np.isfinite(r.loss_trace).all()
    with torch.no_grad():
        assert r.init_loss == pytest.approx(float(mse(model, loader[0])), rel=1e-6)


@pytest.mark.filterwarnings("ignore:the LLC estimate is negative")  # 5 draws: only restriction is checked
def test_restricted_parameters_stay_at_w_star():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    data = [(torch.randn(32, 3), torch.randn(32))]
    final = {}
    def cb(step, chains, loss, params):
        final.update({chains[0]: {k: v[0].clone() for k, v in params.items()}})
    reference.estimate_llc(model, data, mse, num_chains=2, num_draws=5, epsilon=1e-3, nbeta=10.0,
                           restrict=["2.*"], progress=False, callbacks=[cb], num_burnin=0)
    for c in range(2):
        assert torch.equal(final[c]["0.weight"], model[0].weight) and torch.equal(final[c]["0.bias"], model[0].bias)
        assert not torch.equal(final[c]["2.weight"], model[2].weight)


def test_divergent_chains_are_reported_not_fatal():
    model, loader, _ = linear_problem(2)
    with pytest.warns(RuntimeWarning, match="diverged"):
        r = reference.estimate_llc(model, loader, mse, num_chains=2, num_draws=200, epsilon=5.0, nbeta=50.0,
                                   progress=False, num_burnin=0)
    assert r.diagnostics["diverged_chains"] == [0, 1]
    assert math.isnan(r.llc_mean)


def test_negative_llc_warns():
    model, loader, _ = linear_problem(2)
    with torch.no_grad():
        model.weight.add_(0.5)  # w* is no longer the minimum: the chains walk downhill
    with pytest.warns(RuntimeWarning, match="negative"):
        r = reference.estimate_llc(model, loader, mse, num_chains=2, num_draws=200, num_burnin=0, epsilon=1e-3,
                                   nbeta=50.0, gamma=1.0, progress=False)
    assert r.llc_mean < 0


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_chains=0), ValueError, "num_chains"),
    (dict(nbeta=0.0), ValueError, "nbeta must be > 0"),
    (dict(nbeta=-1.0), ValueError, "nbeta must be > 0"),
    (dict(epsilon=0.0), ValueError, "epsilon must be > 0"),
    (dict(num_draws=0), ValueError, "num_draws"),
    (dict(restrict=["nope*"]), ValueError, "matches no parameter"),
])
def test_bad_arguments(kwargs, exc, match):
    model, loader, _ = linear_problem(2)
    with pytest.raises(exc, match=match):
        reference.estimate_llc(model, loader, mse, progress=False, **kwargs)


def test_bad_loader_and_loss():
    model, loader, _ = linear_problem(2)
    with pytest.raises(ValueError, match="no batches"):
        reference.estimate_llc(model, [], mse, nbeta=1.0, progress=False, num_burnin=0, epsilon=1e-4, num_chains=4)
    with pytest.raises(ValueError, match="scalar tensor"):
        reference.estimate_llc(model, loader, lambda m, b: m(b[0]), nbeta=1.0, progress=False)
    with pytest.raises(ValueError, match="loss at w\\* is nan"):
        reference.estimate_llc(model, loader, lambda m, b: mse(m, b) * float("nan"), nbeta=1.0, progress=False)
