"""estimate_llc (the fast engine) against exact answers.

Tolerances come from the chains' own spread: the per-chain estimates are
independent, so their mean has standard error llc_std / sqrt(chains) and must
land within 4 of them of the exact value (a 1-in-15000 false alarm per test).
The hyperparameters are chosen as the README advises, so that SGLD's own
bias (step size, unmixed chains) stays well below that error: see the
R-hat check in each test."""
import math

import pytest

import llcfast
from llcfast.estimate.quadrature import localized_llc_2d
from llc_models import TwoParam, exact_sgld_llc, linear_problem, mse, orthogonal_noise_data


def within_standard_error(result, want, k=4.0):
    chains = len(result.llc_per_chain)
    tol = k * result.llc_std / math.sqrt(chains)
    assert abs(result.llc_mean - want) < tol, (result.llc_mean, want, tol)


@pytest.mark.parametrize("d", [2, 10, 50])
def test_regular_model_has_llc_d_over_2(d):
    model, loader, x = linear_problem(d)
    # eps * (2 nbeta s_max + gamma) / 2 <= 0.1: the README's step-size rule.
    nbeta, gamma, eps = 50.0, 1.0, 1e-3
    want = exact_sgld_llc(x, nbeta, gamma, eps)
    # gamma and eps move the exact finite-eps value only slightly from d/2.
    assert abs(want - d / 2) < 0.05 * d / 2
    r = llcfast.estimate_llc(model, loader, mse, num_chains=16, num_draws=1500, num_burnin=500, epsilon=eps,
                             gamma=gamma, nbeta=nbeta, num_init_batches=1, seed=3, progress=False, backend="fast")
    within_standard_error(r, want)
    assert r.diagnostics["rhat"] < 1.05
    assert r.diagnostics["diverged_chains"] == []


@pytest.mark.parametrize("k", [1, 2])
def test_two_parameter_singular_model_matches_quadrature(k):
    """f = a b^k x at its singular minimum a = b = 0 (K = a^2 b^(2k); the
    asymptotic learning coefficients are 1/2 with multiplicity 2 and 1/4).
    At finite n the target is the localized posterior mean of
    nbeta (L - L0), computed here by 2-D quadrature."""
    n = 1000
    x, y = orthogonal_noise_data(n)
    sxx, syy = float((x * x).mean()), float((y * y).mean())
    nbeta, gamma = n / math.log(n), 10.0  # full batch: the default nbeta m / log m with m = n
    want = localized_llc_2d(lambda a, b: syy + a ** 2 * b ** (2 * k) * sxx, (0.0, 0.0), nbeta=nbeta, gamma=gamma)
    # The trapezoid rule has converged: twice the nodes give the same value.
    finer = localized_llc_2d(lambda a, b: syy + a ** 2 * b ** (2 * k) * sxx, (0.0, 0.0), nbeta=nbeta, gamma=gamma,
                             points=4001)
    assert abs(finer - want) < 1e-6
    r = llcfast.estimate_llc(TwoParam(k), [(x.float(), y.float())], mse, num_chains=64, num_draws=2000,
                             num_burnin=1000, epsilon=1e-3, gamma=gamma, num_init_batches=1, seed=1,
                             progress=False, backend="fast")
    assert r.config["nbeta"] == pytest.approx(nbeta)
    assert r.diagnostics["rhat"] < 1.05
    within_standard_error(r, want)


def test_quadrature_of_a_regular_quadratic_is_exact():
    """For L = (s1 a^2 + s2 b^2) the localized tempered posterior is Gaussian:
    the exact value is sum_i nbeta s_i / (2 nbeta s_i + gamma)."""
    s1, s2, nbeta, gamma = 1.3, 0.4, 200.0, 10.0
    want = sum(nbeta * s / (2 * nbeta * s + gamma) for s in (s1, s2))
    got = localized_llc_2d(lambda a, b: s1 * a ** 2 + s2 * b ** 2, (0.0, 0.0), nbeta=nbeta, gamma=gamma)
    assert got == pytest.approx(want, rel=1e-9)
    stretched = localized_llc_2d(lambda a, b: s1 * a ** 2 + s2 * b ** 2, (0.0, 0.0), nbeta=nbeta, gamma=gamma,
                                 stretch=6.0, points=3001)
    assert stretched == pytest.approx(want, rel=1e-6)


def test_quadrature_approaches_the_asymptotic_coefficient_slowly():
    """For K = a^2 b^4 (lambda = 1/4, multiplicity 1) the finite-n value
    rises towards 1/4 as nbeta grows; it must never overshoot it."""
    values = [localized_llc_2d(lambda a, b: a ** 2 * b ** 4, (0.0, 0.0), nbeta=nb, gamma=1.0, points=2001, stretch=8)
              for nb in (1e2, 1e4, 1e6)]
    assert values[0] < values[1] < values[2] < 0.25
    assert 0.25 - values[2] < 0.01


def test_the_gibbs_sampler_for_reduced_rank_regression_matches_quadrature():
    """With M = H = N = 1, RRR is f = a b x: the blocked Gibbs sampler's value
    must match 2-D quadrature of the same posterior."""
    import torch
    from llcfast.estimate.rrr_exact import rrr_exact_llc
    x, y = orthogonal_noise_data(1000)
    sxx, syy = float((x * x).mean()), float((y * y).mean())
    nbeta, gamma = 1000 / math.log(1000), 10.0
    want = localized_llc_2d(lambda a, b: syy + a ** 2 * b ** 2 * sxx, (0.0, 0.0), nbeta=nbeta, gamma=gamma)
    zero = torch.zeros(1, 1, dtype=torch.float64)
    got, se = rrr_exact_llc(x[:, None], y[:, None], zero, zero, nbeta=nbeta, gamma=gamma, chains=8, sweeps=3000,
                            burnin=200)
    assert abs(got - want) < 4 * se, (got, want, se)


@pytest.mark.parametrize("shape,rank,want", [((5, 4, 6), 0, 9.0), ((3, 4, 3), 1, 4.5), ((1, 1, 1), 1, 0.5),
                                             ((2, 1, 6), 1, 3.5), ((3, 5, 2), 2, 3.0)])
def test_aoyagis_formula_on_known_cases(shape, rank, want):
    """(3, 4, 3) at rank 1: the deep linear network's 4.5; (1, 1, 1) at rank
    1 is regular with one effective parameter; (2, 1, 6) at rank 1 has
    H (M + N - 1) = 7 parameters, 7 / 2; (3, 5, 2) at full rank 2: M N / 2."""
    from llcfast.estimate.rrr_exact import aoyagi_rrr
    assert aoyagi_rrr(*shape, rank) == want
