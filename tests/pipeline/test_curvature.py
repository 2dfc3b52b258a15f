"""The report sets the Hessian statistics' own stage boundaries beside the
LLC's: a statistic whose curve is the LLC's up to scale has the same
boundaries; one that changes elsewhere has its nearest boundaries far away."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from llcfast.pipeline.curvature import boundary_matches, curvature_fits, match_table
from llcfast.pipeline.report import stage_table, write_report

STEPS = np.unique(np.round(np.logspace(0, 5, 60)).astype(int))
X = np.log(STEPS + 1.0)


def _sigmoid(x, center, height):
    return height / (1 + np.exp(-4 * (x - center)))


def records(with_hessian=True, seed=0):
    """LLC: rises at log-step 3 and 8. Trace: an affine copy of it, noise
    and standard errors included, so its fit is the LLC's. Top eigenvalue:
    one rise, at log-step 5.5, where the LLC is on a plateau."""
    rng = np.random.default_rng(seed)
    llc = _sigmoid(X, 3, 20) + _sigmoid(X, 8, 60) + rng.normal(0, 1.0, X.size)
    eig = 10 + _sigmoid(X, 5.5, 50) + rng.normal(0, 0.5, X.size)
    out = []
    for i, s in enumerate(STEPS):
        # llc_std / sqrt(4 chains) = 1: the LLC's standard error; the trace's is 10 times it
        r = {"step": int(s), "llc_mean": float(llc[i]), "llc_std": 2.0, "llc_per_chain": [0.0] * 4,
             "test_loss": 1.0 / (1 + i)}
        if with_hessian:
            r.update(hessian_trace=100 + 10 * float(llc[i]), hessian_trace_se=10.0, hessian_top_eig=float(eig[i]))
        out.append(r)
    return out


def test_boundaries_of_each_statistic_are_set_beside_the_llcs(tmp_path):
    paths = write_report(records(), str(tmp_path))
    fit, curvature = paths["fit"], paths["curvature"]
    assert set(curvature) == {"hessian_trace", "hessian_top_eig"}
    rows = boundary_matches(fit, curvature)
    assert len(rows) == len(fit.boundaries) >= 2
    for row in rows:  # the same curve up to scale and shift: the same boundaries
        assert row["hessian_trace"]["ratio"] == pytest.approx(1.0, rel=1e-4)  # the fits agree to the optimizer's rounding
    # The LLC's outer plateaus end near its rises at log-steps 3 and 8; the
    # top eigenvalue's boundaries lie around its one rise at 5.5, far from both.
    outer = [r for r in rows if not 3.5 < np.log(r["step"] + 1) < 7.5]
    assert len(outer) == 2, [r["step"] for r in rows]
    for row in outer:
        assert abs(np.log(row["hessian_top_eig"]["ratio"])) > 1.0, row
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["llc_boundaries_vs_curvature"][0]["step"] == pytest.approx(fit.boundaries[0])
    assert summary["curvature"]["hessian_trace"]["boundaries"] == pytest.approx(curvature["hessian_trace"].boundaries)
    text = "\n".join(stage_table(fit, curvature))
    assert "nearest Hessian trace boundary" in text and "nearest top eigenvalue boundary" in text


def test_without_hessian_statistics_the_report_has_no_curvature_part(tmp_path):
    paths = write_report(records(with_hessian=False), str(tmp_path))
    assert paths["curvature"] == {}
    assert "curvature" not in json.loads((tmp_path / "summary.json").read_text())
    assert "nearest" not in "\n".join(stage_table(paths["fit"], paths["curvature"]))
    assert curvature_fits(records()[:2]) == {}  # too few checkpoints for a fit


def test_nearest_boundary_is_nearest_on_the_log_axis():
    llc = SimpleNamespace(boundaries=[99.0])
    fits = {"hessian_trace": SimpleNamespace(boundaries=[9.0, 399.0]), "hessian_top_eig": SimpleNamespace(boundaries=[])}
    row, = boundary_matches(llc, fits)
    # 399 is a factor 4 above in step + 1, 9 a factor 10 below
    assert row == {"step": 99.0, "hessian_trace": {"nearest": 399.0, "ratio": 4.0}, "hessian_top_eig": None}
    lines = match_table([row], fits)
    assert "399 (x4)" in lines[1] and "none" in lines[1]
