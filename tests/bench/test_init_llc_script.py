"""benchmarks/init_llc.py: the models it samples are the ones it names, and
its output-layer scale acts on the prediction as it says."""
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import init_llc  # noqa: E402


@pytest.mark.parametrize("size,params", [("paper", 52033), ("demo", 13697)])
def test_sizes_and_the_output_scale(size, params):
    full = init_llc.init_llc(size, seed=0, draws=3, chains=2, unembed_scale=1.0)
    shrunk = init_llc.init_llc(size, seed=0, draws=3, chains=2, unembed_scale=0.1)
    assert full["params"] == shrunk["params"] == params
    # y-hat is linear in the output layer's weight and bias, so E[y-hat^2] scales by 0.1^2 exactly
    assert shrunk["yhat_sq"] == pytest.approx(0.01 * full["yhat_sq"], rel=1e-4)
    assert all(math.isfinite(r[k]) for r in (full, shrunk) for k in ("llc_mean", "llc_std", "se_init"))
