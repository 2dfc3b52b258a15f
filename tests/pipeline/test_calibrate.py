"""Calibration: flags for diverging, drifting and negative settings, and the
recommendation rule."""
import math
import os

import numpy as np
import pytest

from llc_models import exact_sgld_llc, linear_problem, mse
from llcfast.estimate.diagnostics import trend_t
from llcfast.pipeline.calibrate import _recommend, calibrate, sampler_grid


def test_trend_statistic_separates_drift_from_stationary_noise():
    rng = np.random.default_rng(0)
    stationary = rng.normal(0, 1, (8, 200))
    drifting = stationary + np.linspace(0, 2, 200)
    assert abs(trend_t(stationary)) < 3
    assert trend_t(drifting) > 10
    assert math.isnan(trend_t(stationary[:2]))  # too few chains to tell


def _row(eps, gamma, llc, se=0.5, flags=(), sampler="sgld"):
    return {"sampler": sampler, "epsilon": eps, "gamma": gamma, "nbeta": 10.0, "llc_mean": llc, "llc_std": se * 2, "llc_se": se,
            "flags": list(flags)}


def test_recommendation_takes_the_largest_epsilon_on_the_plateau():
    rows = [_row(1e-4, 1, 4.0), _row(1e-3, 1, 5.0), _row(3e-3, 1, 5.2), _row(1e-2, 1, 9.0),
            _row(3e-2, 1, math.nan, flags=["diverged"])]
    best, reason = _recommend(rows)
    assert best["epsilon"] == 3e-3 and "agrees with those of all smaller" in reason
    # A plateau is looked for within one sampler: another sampler's rows do not count.
    other = [_row(1e-4, 1, 5.2, sampler="sgnht")] + [dict(r, epsilon=r["epsilon"] * 10) for r in rows[2:3]]
    best, _ = _recommend(other)
    assert best["sampler"] == "sgld" and best["epsilon"] == 3e-2
    best, reason = _recommend([_row(1e-3, 1, 5, flags=["negative LLC"])])
    assert best is None and "every setting" in reason


def test_calibrate_flags_divergence_and_recommends_a_healthy_setting(tmp_path):
    model, loader, x = linear_problem(4, n=256, seed=0)
    res = calibrate(model, loader, mse, epsilons=[1e-3, 3e-3, 1e-2, 0.5], gammas=[1.0], nbetas=[50.0],
                    num_chains=4, num_draws=400, num_burnin=200, progress=False)
    rows = {r["epsilon"]: r for r in res.rows}
    assert rows[0.5]["flags"] == ["diverged"]
    assert res.recommended is not None and res.recommended["epsilon"] < 0.5
    rec = res.recommended
    exact = exact_sgld_llc(x, rec["nbeta"], rec["gamma"], rec["epsilon"])  # d/2 = 2 up to step-size bias
    assert abs(rec["llc_mean"] - exact) < 4 * rec["llc_se"]
    for r in res.rows:
        if r["epsilon"] < rec["epsilon"]:
            assert abs(r["llc_mean"] - rec["llc_mean"]) <= max(2 * math.hypot(r["llc_se"], rec["llc_se"]),
                                                               0.1 * abs(r["llc_mean"]))
    res.plot(str(tmp_path / "c.png"), str(tmp_path / "t.png"))
    assert os.path.getsize(tmp_path / "c.png") > 1000 and os.path.getsize(tmp_path / "t.png") > 1000
    assert "recommended: sampler=sgld epsilon=" in res.describe()
    with pytest.raises(ValueError, match="epsilons must be a non-empty list of numbers > 0"):
        calibrate(model, loader, mse, epsilons=[0.0], gammas=[1.0])


def test_samplers_and_their_hyperparameters_are_grid_axes(tmp_path):
    model, loader, x = linear_problem(4, n=256, seed=0)
    grid = ["sgld"] + sampler_grid("rmsprop_sgld", alpha=[0.99, 0.9999]) + [("sgnht", {"diffusion": 0.01})]
    assert grid[1:3] == [("rmsprop_sgld", {"alpha": 0.99}), ("rmsprop_sgld", {"alpha": 0.9999})]
    res = calibrate(model, loader, mse, epsilons=[1e-4, 3e-4], gammas=[1.0], nbetas=[50.0], samplers=grid,
                    num_chains=4, num_draws=300, num_burnin=100, progress=False)
    labels = [r["sampler"] for r in res.rows]
    assert labels == ["sgld"] * 2 + ["rmsprop_sgld(alpha=0.99)"] * 2 + ["rmsprop_sgld(alpha=0.9999)"] * 2 + \
        ["sgnht(diffusion=0.01)"] * 2
    # Different samplers really ran: their estimates at the same (epsilon, gamma) differ.
    by = {(r["sampler"], r["epsilon"]): r["llc_mean"] for r in res.rows}
    assert len({round(by[(lab, 1e-4)], 9) for lab in set(labels)}) == 4
    res.plot(str(tmp_path / "c.png"), str(tmp_path / "t.png"))
    assert "sgnht(diffusion=0.01)" in res.describe()
    with pytest.raises(ValueError, match="'alpha' is not a hyperparameter of 'sgnht'"):
        calibrate(model, loader, mse, epsilons=[1e-3], gammas=[1.0], samplers=[("sgnht", {"alpha": 0.9})])


def test_an_interrupted_grid_resumes_from_its_record(tmp_path, monkeypatch):
    """Each finished setting is appended to the record (NaNs of a diverged
    setting included); a rerun reads those back and runs only the rest."""
    import llcfast.pipeline.calibrate as cal
    model, loader, _ = linear_problem(3, n=128, seed=1)
    kw = dict(epsilons=[1e-3, 0.5, 3e-3], gammas=[1.0], nbetas=[50.0], num_chains=3, num_draws=40, progress=False)
    whole = calibrate(model, loader, mse, **kw)
    assert whole.rows[1]["flags"] == ["diverged"] and np.isnan(whole.traces[("sgld", 1.0, 50.0, 0.5)]).any()
    record = str(tmp_path / "settings.jsonl")
    real, calls, stop = cal.estimate_llc, [], [3]

    def stops_at_the_third(*args, **kwargs):
        calls.append(kwargs["epsilon"])
        if len(calls) == stop[0]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(cal, "estimate_llc", stops_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, loader, mse, record=record, **kw)
    assert len(open(record).read().splitlines()) == 2  # 1e-3 and the diverged 0.5
    calls.clear()
    stop[0] = None
    resumed = calibrate(model, loader, mse, record=record, **kw)
    assert calls == [3e-3]
    for a, b in zip(resumed.rows, whole.rows):
        assert a["flags"] == b["flags"] and a["epsilon"] == b["epsilon"]
        np.testing.assert_array_equal([a["llc_mean"], a["rhat"]], [b["llc_mean"], b["rhat"]])
    for k, trace in whole.traces.items():
        np.testing.assert_array_equal(resumed.traces[k], trace)  # NaNs of the diverged chains too
    assert resumed.recommended == whole.recommended
    calibrate(model, loader, mse, record=record, **dict(kw, num_draws=41))  # other settings: measured anew
    assert calls[1:] == [1e-3, 0.5, 3e-3]
