"""Split R-hat and ESS against values known in closed form."""
import math

import numpy as np
import pytest

from llcfast.estimate.diagnostics import ess, split_rhat


def ar1(rho, chains, draws, seed):
    rng = np.random.default_rng(seed)
    x = np.empty((chains, draws))
    x[:, 0] = rng.standard_normal(chains) / math.sqrt(1 - rho ** 2)
    eps = rng.standard_normal((chains, draws))
    for t in range(1, draws):
        x[:, t] = rho * x[:, t - 1] + eps[:, t]
    return x


def test_plain_split_rhat_by_hand():
    # Two chains of 4 split into [1,2],[3,4],[2,3],[4,5]: n = 2, chain means
    # 1.5, 3.5, 2.5, 4.5 (variance 5/3), within variances all 0.5.
    x = np.array([[1.0, 2, 3, 4], [2, 3, 4, 5]])
    w, b, n = 0.5, 2 * 5 / 3, 2
    want = math.sqrt(((n - 1) / n * w + b / n) / w)
    assert split_rhat(x, rank_normalised=False) == pytest.approx(want, rel=1e-12)


def test_iid_chains_have_rhat_one_and_full_ess():
    x = np.random.default_rng(0).standard_normal((4, 5000))
    assert split_rhat(x) < 1.01
    # ESS of iid draws is the draw count; its sampling spread is a few percent.
    assert ess(x) == pytest.approx(20000, rel=0.1)


@pytest.mark.parametrize("rho", [0.5, 0.9])
def test_ar1_ess_matches_closed_form(rho):
    x = ar1(rho, 4, 40000, seed=1)
    want = x.size * (1 - rho) / (1 + rho)
    assert ess(x, rank_normalised=False) == pytest.approx(want, rel=0.15)
    assert ess(x) == pytest.approx(want, rel=0.15)


def test_disagreeing_chains_are_flagged():
    x = np.random.default_rng(2).standard_normal((4, 2000))
    x[0] += 2.0
    assert split_rhat(x) > 1.1
    trend = np.random.default_rng(3).standard_normal((4, 2000)) + np.linspace(0, 3, 2000)
    assert split_rhat(trend) > 1.1  # splitting catches a drift inside each chain


@pytest.mark.parametrize("bad,match", [
    (np.zeros(10), "chains, draws"),
    (np.zeros((2, 3)), "at least 4 draws"),
    (np.array([[1.0, np.nan, 2, 3]]), "NaN or Inf"),
])
def test_bad_traces(bad, match):
    with pytest.raises(ValueError, match=match):
        split_rhat(bad)
