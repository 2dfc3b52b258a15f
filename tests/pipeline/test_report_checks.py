"""Checkpoints whose estimate fails one of LLCResult.checks(): named in each
sweep record, circled on the report, listed in summary.json, results.csv
and on the terminal."""
import json

import numpy as np
import pandas as pd
import pytest

from llcfast.estimate.diagnostics import TREND_T
from llcfast.pipeline import train
from llcfast.pipeline.report import check_lines, plot_report, stage_fit, write_report
from llcfast.pipeline.sweep import sweep
from pipeline_configs import tiny

KNOWN = {"divergence", "rhat", "trend", "init_loss", "sign", "gradient", "step_size"}


def _record(step, llc, failed=(), from_init_loss=0.01):
    return {"step": step, "checkpoint": f"c{step}", "llc_mean": llc, "llc_std": 0.1, "llc_per_chain": [llc] * 4,
            "test_loss": 1.0 / (step + 1), "failed_checks": list(failed), "llc_se_from_init_loss": from_init_loss}


def test_each_record_names_the_checks_its_own_numbers_fail(tmp_path):
    run = str(tmp_path / "run")
    train(tiny(steps=20), run, progress=False)
    with pytest.warns(RuntimeWarning):  # this tiny run's estimates are negative
        records = sweep(run, progress=False)
    assert records and any(r["failed_checks"] for r in records)
    for r in records:
        assert set(r["failed_checks"]) <= KNOWN
        assert ("sign" in r["failed_checks"]) == (r["llc_mean"] < 0)
        assert ("trend" in r["failed_checks"]) == (abs(r["trend_t"]) > TREND_T)
        assert ("divergence" in r["failed_checks"]) == bool(r["diverged_chains"])


def test_the_report_lists_and_circles_the_failing_checkpoints(tmp_path):
    steps = [0, 1, 3, 10, 30, 100, 300, 1000]
    records = [_record(s, 5 + np.log1p(s), ["rhat", "trend"] if s in (3, 300) else []) for s in steps]
    paths = write_report(records, str(tmp_path))
    summary = json.load(open(paths["summary"]))
    assert summary["failed_checks"] == [{"step": 3, "checks": ["rhat", "trend"]},
                                        {"step": 300, "checks": ["rhat", "trend"]}]
    frame = pd.read_csv(paths["csv"])
    assert frame.set_index("step")["failed_checks"].fillna("").to_dict() == {
        s: "rhat, trend" if s in (3, 300) else "" for s in steps}

    lines = check_lines(records)
    assert lines[0].startswith("2 of 8 checkpoints fail a check") and lines[1:3] == ["  step 3: rhat, trend",
                                                                                     "  step 300: rhat, trend"]
    assert "rhat: split R-hat above 1.05" in lines[-1] and "trend: the loss was still drifting" in lines[-1]
    assert not any("init loss" in line for line in lines)
    short = check_lines(records, most=1)
    assert short[1] == "  step 3: rhat, trend" and short[2] == "  ... and 1 more (failed_checks in results.csv)"

    def circled(recs):
        fig = plot_report(recs, stage_fit(recs))
        hits = [line for ax in fig.axes for line in ax.get_lines() if line.get_label().startswith("fails a check")]
        return [list(line.get_xdata()) for line in hits]
    assert circled(records) == [[3.0, 300.0]]
    clean = [_record(s, 5 + np.log1p(s)) for s in steps]
    assert circled(clean) == [] and check_lines(clean) == []
    old = [{k: v for k, v in r.items() if k != "failed_checks"} for r in records]  # records from before the field
    assert circled(old) == [] and json.load(open(write_report(old, str(tmp_path / "old"))["summary"]))[
        "failed_checks"] == []


def test_the_init_loss_error_is_reported_once_not_circled(tmp_path):
    # Its batches are the same at every checkpoint: a property of the settings, said once with its range.
    steps = [0, 1, 3, 10, 30, 100]
    records = [_record(s, 5 + np.log1p(s), ["init_loss"] + (["sign"] if s == 10 else []), from_init_loss=0.1 * (i + 1))
               for i, s in enumerate(steps)]
    fig = plot_report(records, stage_fit(records))
    circled = [list(line.get_xdata()) for ax in fig.axes for line in ax.get_lines()
               if line.get_label().startswith("fails a check")]
    assert circled == [[10.0]]
    lines = check_lines(records)
    assert lines[:2] == ["1 of 6 checkpoints fail a check of their estimate (circled in red on the report; llcfast "
                         "estimate RUN --step N shows one):", "  step 10: sign"]
    assert lines[-1].startswith("At 6 of 6 checkpoints the init loss's error exceeds the chains' standard error "
                                "(± 0.1 to 0.6 in LLC, against ± 0.05 to 0.05)")
    assert "--init-batches" in lines[-1]


def test_num_init_batches_reaches_the_estimate_and_keeps_older_keys(tmp_path):
    from dataclasses import replace
    from llcfast.pipeline.config import RunConfig, SweepSettings
    from llcfast.pipeline.sweep import settings_key
    base = SweepSettings()
    assert settings_key(replace(base, num_init_batches=None)) == settings_key(base)
    assert settings_key(replace(base, num_init_batches=8)) != settings_key(base)
    for bad in (0, "most", 2.5):
        with pytest.raises(ValueError,
                           match=f"sweep.num_init_batches must be null, \"all\" or an int >= 1, got {bad!r}"):
            RunConfig.from_dict({"sweep": {"num_init_batches": bad}})
    assert RunConfig.from_dict({"sweep": {"num_init_batches": "all"}}).sweep.num_init_batches == "all"
    run = str(tmp_path / "run")
    train(tiny(steps=4), run, progress=False)
    with pytest.warns(RuntimeWarning):
        records = sweep(run, settings=replace(tiny().sweep, num_init_batches=2, behaviour=False), progress=False)
    spreads = [r["llc_se_from_init_loss"] for r in records]
    assert all(np.isfinite(spreads)) and all(s > 0 for s in spreads)  # 2 of the LLC set's 4 batches
    # The default is the exact loss at w*: the LLC set holds 4 batches, so "all" is 4, with no error left.
    with pytest.warns(RuntimeWarning):
        default = sweep(run, settings=replace(tiny().sweep, behaviour=False), progress=False)
    assert [r["settings"] for r in records] != [r["settings"] for r in default]
    with pytest.warns(RuntimeWarning):
        every = sweep(run, settings=replace(tiny().sweep, num_init_batches="all", behaviour=False), progress=False)
    assert [r["llc_mean"] for r in every] == [r["llc_mean"] for r in default]
    assert [r["llc_se_from_init_loss"] for r in every] == [r["llc_se_from_init_loss"] for r in default] \
        == [0.0] * len(records)
    assert all("init_loss" not in r["failed_checks"] for r in every)


def test_results_csv_has_the_standard_error_and_stages_count_from_one(tmp_path):
    import json
    import pandas as pd
    steps = [0, 1, 3, 10, 30, 100, 300, 1000]
    records = [_record(s, 5 + np.log1p(s)) for s in steps]
    records[2]["llc_per_chain"] = [7.0, None, 7.2, 7.1]  # a diverged chain is left out of the count
    paths = write_report(records, str(tmp_path))
    frame = pd.read_csv(paths["csv"])
    np.testing.assert_allclose(frame["llc_se"], [0.1 / 2] * 2 + [0.1 / np.sqrt(3)] + [0.1 / 2] * 5)
    summary = json.load(open(paths["summary"]))
    assert [s["stage"] for s in summary["stages"]] == list(range(1, len(summary["stages"]) + 1))
    assert all("index" not in s for s in summary["stages"])
