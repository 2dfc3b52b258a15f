"""LLCResult arithmetic, divergence bookkeeping, serialisation and plot."""
import json
import math

import numpy as np
import pytest

from llcfast.estimate.result import LLCResult


def quiet_verdict(flat):
    return LLCResult.from_traces(flat, 0.9, 10.0, diagnostics={"llc_se_from_init_loss": 1e-4}).verdict()


def test_llc_from_traces_by_hand():
    r = LLCResult.from_traces([[1.0, 2.0], [3.0, 4.0]], init_loss=1.0, nbeta=2.0)
    np.testing.assert_allclose(r.llc_per_chain, [1.0, 5.0])
    assert r.llc_mean == pytest.approx(3.0)
    assert r.llc_std == pytest.approx(math.sqrt(8.0))
    assert r.diagnostics["diverged_chains"] == []


def test_diverged_chain_is_excluded_and_reported():
    trace = np.random.default_rng(0).normal(1.0, 0.1, (3, 50))
    trace[1, 20:] = np.nan
    r = LLCResult.from_traces(trace, init_loss=0.9, nbeta=10.0)
    assert r.diagnostics["diverged_chains"] == [1]
    assert math.isnan(r.llc_per_chain[1])
    want = 10.0 * (trace[[0, 2]].mean(axis=1) - 0.9)
    assert r.llc_mean == pytest.approx(want.mean())
    assert "rhat" in r.diagnostics and "ess" in r.diagnostics


def test_serialisation_round_trip(tmp_path):
    trace = np.random.default_rng(1).normal(2.0, 0.2, (2, 8))
    trace[0, 5:] = np.nan
    r = LLCResult.from_traces(trace, init_loss=1.5, nbeta=4.0, config={"epsilon": 1e-4}, timings={"total_s": 1.0})
    d = json.loads(r.to_json())
    assert d["llc_per_chain"][0] is None and d["config"]["epsilon"] == 1e-4
    df = r.to_frame()
    assert list(df.columns) == ["chain", "draw", "loss", "llc_chain"] and len(df) == 16


def test_plot_draws_every_chain_and_the_init_loss(tmp_path):
    trace = np.random.default_rng(2).normal(1.0, 0.1, (4, 30))
    r = LLCResult.from_traces(trace, init_loss=0.95, nbeta=10.0)
    path = tmp_path / "trace.png"
    fig = r.plot(path=str(path))
    assert path.stat().st_size > 5000
    assert len(fig.axes[0].lines) == 5
    assert "LLC =" in fig.axes[0].get_title()


def test_bad_trace_shape():
    with pytest.raises(ValueError, match="chains, draws"):
        LLCResult.from_traces(np.zeros(5), init_loss=0.0, nbeta=1.0)


def _status(result, name):
    return {n: ok for n, ok, _ in result.checks()}.get(name, "absent")


def test_summary_passes_stationary_chains_and_flags_what_is_wrong():
    from llcfast.estimate.result import LLCResult
    rng = np.random.default_rng(0)
    flat = 1.0 + 0.01 * rng.standard_normal((8, 400))
    good = LLCResult.from_traces(flat, 0.9, 10.0, config={"nbeta": 10.0})
    assert all(ok is not False for _, ok, _ in good.checks()), good.summary()
    assert "CHECK" not in good.summary() and str(good).startswith("LLC 0.99")
    assert _status(good, "init_loss") == "absent"  # no spread recorded: nothing to judge

    rising = flat + np.linspace(0, 0.05, 400)
    assert _status(LLCResult.from_traces(rising, 0.9, 10.0), "trend") is False
    assert "still rising" in LLCResult.from_traces(rising, 0.9, 10.0).summary()

    broken = flat.copy()
    broken[3, 200:] = np.nan
    res = LLCResult.from_traces(broken, 0.9, 10.0)
    assert _status(res, "divergence") is False and "chains [3] diverged" in res.summary()

    noisy_l0 = LLCResult.from_traces(flat, 0.9, 10.0, diagnostics={"llc_se_from_init_loss": 1.0})
    assert _status(noisy_l0, "init_loss") is False and "raise num_init_batches" in noisy_l0.summary()
    used = LLCResult.from_traces(flat, 0.9, 10.0, diagnostics={"llc_se_from_init_loss": 1.0},
                                 config={"num_init_batches": 4})
    assert "use init_loss='auto' (exact or paired), or raise num_init_batches (it used 4)" in used.summary()
    assert used.verdict() == "verdict: not yet trustworthy; fix the init_loss CHECK above first"
    assert quiet_verdict(flat) == "verdict: trustworthy (every check passed)"
    quiet_l0 = LLCResult.from_traces(flat, 0.9, 10.0, diagnostics={"llc_se_from_init_loss": 1e-4})
    assert _status(quiet_l0, "init_loss") is True

    below = LLCResult.from_traces(flat, 1.1, 10.0)
    assert _status(below, "sign") is False and "negative LLC" in below.summary()

    split = flat.copy()
    split[:4] += 0.05  # half the chains sit elsewhere
    assert _status(LLCResult.from_traces(split, 0.9, 10.0), "rhat") is False
