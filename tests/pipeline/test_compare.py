"""llcfast compare: several runs' sweeps side by side, each with its own
stage fit, the first run's boundaries beside the others' nearest, and the
LLC's spread across runs at the steps they share."""
import json
import math
import os
import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from llcfast.cli import main
from llcfast.pipeline import train
from llcfast.pipeline.compare import across_runs, compare_runs, comparison_lines
from llcfast.pipeline.curvature import boundary_matches
from llcfast.pipeline.report import stage_fit
from llcfast.pipeline.sweep import sweep
from pipeline_configs import tiny

STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def _records(rise_at: float, seed: int, key: str = "k0", steps=STEPS, chains: int = 4) -> list:
    """An LLC that rises by 40 around log(step + 1) = rise_at, plus noise."""
    rng = np.random.default_rng(seed)
    out = []
    for s in steps:
        llc = 40 / (1 + math.exp(-3 * (math.log(s + 1) - rise_at))) + rng.normal(0, 0.5)
        per_chain = list(llc + rng.normal(0, 1.0, chains))
        out.append({"step": s, "settings": key, "llc_mean": float(np.mean(per_chain)),
                    "llc_std": float(np.std(per_chain, ddof=1)), "llc_per_chain": per_chain,
                    "test_loss": 3 - llc / 20, "failed_checks": []})
    return out


def _write(run_dir, *sweeps):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "results.jsonl"), "w") as f:
        for records in sweeps:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return str(run_dir)


def test_each_run_gets_its_own_fit_and_the_spread_across_runs_is_measured(tmp_path):
    runs = [_records(3.0, 0), _records(3.4, 1), _records(3.2, 2, steps=STEPS[1:])]
    dirs = [_write(tmp_path / f"seed{i}", r) for i, r in enumerate(runs)]
    done = compare_runs(dirs, str(tmp_path / "out"))
    summary = done["summary"]
    assert [r["label"] for r in summary["runs"]] == ["seed0", "seed1", "seed2"] and summary["same_settings"]
    for run, records in zip(summary["runs"], runs):
        assert run["boundaries"] == stage_fit(records).boundaries and run["checkpoints"] == len(records)
        assert run["final_step"] == 4096 and run["final_llc"] == records[-1]["llc_mean"]
    fits = [stage_fit(r) for r in runs]
    assert fits[0].boundaries  # the rise makes boundaries to compare
    expected = boundary_matches(fits[0], {"seed1": fits[1], "seed2": fits[2]})
    assert summary["boundaries_vs_first"] == json.loads(json.dumps(expected))
    # step 0 is missing from the third run: only the other 13 steps are compared
    shared = summary["across_runs"]
    assert [r["step"] for r in shared] == STEPS[1:]
    at = {r["step"]: r for r in shared}[64]
    values = [next(r for r in rec if r["step"] == 64) for rec in runs]
    llc = [v["llc_mean"] for v in values]
    assert at["llc_mean"] == pytest.approx(np.mean(llc))
    assert at["llc_sd_across_runs"] == pytest.approx(np.std(llc, ddof=1))
    se = [v["llc_std"] / 2 for v in values]
    assert at["llc_se_within_runs"] == pytest.approx(math.sqrt(np.mean(np.square(se))))
    paths = done["paths"]
    assert os.path.getsize(paths["png"]) > 10_000 and os.path.getsize(paths["svg"]) > 10_000
    assert json.load(open(paths["json"]))["across_runs"] == shared
    points = pd.read_csv(paths["csv"])
    assert len(points) == sum(len(r) for r in runs) and set(points["run"]) == {"seed0", "seed1", "seed2"}
    lines = comparison_lines(summary)
    assert lines[1].split()[:3] == ["seed0", "14", f"{runs[0][-1]['llc_mean']:.1f}"]
    assert "At the 13 steps every run measured, the LLC's sd across runs is " in lines[-1]
    assert not any("different settings" in line for line in lines)


def test_the_figure_draws_the_spread_across_runs(tmp_path):
    from llcfast.pipeline.compare import plot_comparison
    runs = [_records(3.0, 0), _records(3.4, 1), _records(3.2, 2)]
    fits = [stage_fit(r) for r in runs]
    shared = across_runs(runs)
    fig = plot_comparison(runs, fits, ["a", "b", "c"], shared=shared)
    band = [c for c in fig.axes[1].collections if c.get_label() == "mean of the 3 runs ± sd across them"]
    assert len(band) == 1
    corners = band[0].get_paths()[0].vertices
    at = {r["step"]: r for r in shared}[64]
    assert np.isclose(corners[:, 1].max(), max(r["llc_mean"] + r["llc_sd_across_runs"] for r in shared))
    assert any(np.allclose(v, (64, at["llc_mean"] - at["llc_sd_across_runs"])) for v in corners)
    assert len(fig.axes) == 2 + 3  # loss, LLC, one stage strip per run
    fig = plot_comparison(runs, fits, ["a", "b", "c"])
    assert not [c for c in fig.axes[1].collections if "sd across them" in str(c.get_label())]


def test_across_runs_on_known_numbers():
    def rec(step, llc, sd, chains=4):
        return {"step": step, "llc_mean": llc, "llc_std": sd, "llc_per_chain": [0.0] * chains}
    rows = across_runs([[rec(0, 1.0, 2.0), rec(1, 2.0, 2.0)], [rec(1, 4.0, 4.0), rec(2, 9.0, 1.0)]])
    assert rows == [{"step": 1, "llc_mean": 3.0, "llc_sd_across_runs": pytest.approx(math.sqrt(2)),
                     "llc_se_within_runs": pytest.approx(math.sqrt((1.0 + 4.0) / 2))}]
    assert across_runs([[rec(0, 1.0, 1.0)], [rec(5, 1.0, 1.0)]]) == []


def test_runs_of_one_checkpoint_still_compare(tmp_path):
    dirs = [_write(tmp_path / f"s{i}", _records(3.0, i, steps=[5])) for i in range(2)]
    summary = compare_runs(dirs, str(tmp_path / "out"))["summary"]
    assert [r["step"] for r in summary["across_runs"]] == [5] and summary["boundaries_vs_first"] == []
    assert comparison_lines(summary)[-1].startswith("At the step every run measured, the LLC's sd across runs is")


def test_the_latest_sweep_of_each_run_or_the_one_asked_for(tmp_path, capsys):
    a = _write(tmp_path / "a", _records(3.0, 0, key="k0"))
    b = _write(tmp_path / "b", _records(3.0, 1, key="k0"), _records(3.0, 2, key="k1"))
    out = str(tmp_path / "out")
    summary = compare_runs([a, b], out)["summary"]
    assert [r["settings"] for r in summary["runs"]] == ["k0", "k1"] and not summary["same_settings"]
    assert summary["settings_differences"] is None  # records without sweep_settings: only their keys tell
    assert "swept with different settings {'a': 'k0', 'b': 'k1'}" in comparison_lines(summary)[-1]
    assert compare_runs([a, b], out, settings="k0")["summary"]["same_settings"]
    with pytest.raises(ValueError,
                       match=r"settings key 'k1' matches no sweep in .*a.results\.jsonl; its sweeps: \['k0'\]"):
        compare_runs([a, b], out, settings="k1")


def test_settings_that_differ_are_named_and_hessian_ones_ignored(tmp_path):
    def swept(seed, **settings):
        base = dict(num_chains=4, num_draws=150, epsilon=1e-3, hessian=True, hessian_probes=16, behaviour=True)
        return [dict(r, sweep_settings=dict(base, **settings)) for r in _records(3.0, seed, key=f"k{seed}")]
    a = _write(tmp_path / "a", swept(0))
    b = _write(tmp_path / "b", swept(1, hessian=False, hessian_probes=4, behaviour=False))
    c = _write(tmp_path / "c", swept(2, num_draws=300))
    out = str(tmp_path / "out")
    summary = compare_runs([a, b], out)["summary"]
    assert not summary["same_settings"] and summary["settings_differences"] == {}
    assert not any("different settings" in line for line in comparison_lines(summary))
    summary = compare_runs([a, b, c], out)["summary"]
    assert summary["settings_differences"] == {"num_draws": {"a": 150, "b": 150, "c": 300}}
    assert comparison_lines(summary)[-1] == ("The runs were swept with different settings (num_draws {'a': 150, "
                                             "'b': 150, 'c': 300}): their LLCs differ by those too.")


def test_one_runs_two_sweeps_side_by_side(tmp_path, capsys):
    """One key per run: the same run under two settings, labelled by key."""
    run = _write(tmp_path / "run", _records(3.0, 0, key="k0"), _records(3.0, 1, key="k1"))
    other = _write(tmp_path / "other", _records(3.0, 2, key="k0"))
    summary = compare_runs([run, run], str(tmp_path / "out"), settings=["k0", "k1"])["summary"]
    assert [r["label"] for r in summary["runs"]] == ["run:k0", "run:k1"]
    assert [r["settings"] for r in summary["runs"]] == ["k0", "k1"]
    first = [json.loads(line) for line in open(os.path.join(run, "results.jsonl"))][:len(STEPS)]
    assert summary["runs"][0]["final_llc"] == first[-1]["llc_mean"]
    # None: that run's latest sweep
    summary = compare_runs([other, run], str(tmp_path / "out"), settings=["k0", None])["summary"]
    assert [r["settings"] for r in summary["runs"]] == ["k0", "k1"]
    with pytest.raises(ValueError, match=r"name the same sweep more than once"):
        compare_runs([run, run], str(tmp_path / "out"), settings=["k1", None])
    out = str(tmp_path / "cli")
    assert main(["compare", run, run, "--settings", "k0", "k1", "--out", out]) == 0
    assert "run:k1" in capsys.readouterr().out
    assert main(["compare", run, other, "--settings", "k0", "--out", out]) == 0  # one key for every run


def test_bad_input_is_named(tmp_path):
    a = _write(tmp_path / "a", _records(3.0, 0))
    b = _write(tmp_path / "b", _records(3.0, 1))
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"comparing needs two runs or more, got 1"):
        compare_runs([a], out)
    with pytest.raises(ValueError, match=r"name the same sweep more than once; give each run once, or one settings"):
        compare_runs([a, os.path.join(a, ".")], out)
    with pytest.raises(ValueError, match=r"3 settings keys \['k0', 'k0', None\] for 2 runs"):
        compare_runs([a, b], out, settings=["k0", "k0", None])
    with pytest.raises(ValueError, match=r"1 labels \['x'\] for 2 runs"):
        compare_runs([a, b], out, labels=["x"])
    with pytest.raises(ValueError, match=r"the labels \['x', 'x'\] repeat"):
        compare_runs([a, b], out, labels=["x", "x"])
    os.makedirs(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match=r"c.results\.jsonl does not exist; run `llcfast sweep .*c` first"):
        compare_runs([a, str(tmp_path / "c")], out)
    # Two runs both called seed0 in different folders: the paths tell them apart.
    same = [_write(tmp_path / p / "seed0", _records(3.0, i)) for i, p in enumerate(("x", "y"))]
    labels = [r["label"] for r in compare_runs(same, out)["summary"]["runs"]]
    assert len(set(labels)) == 2 and all(label.endswith("seed0") for label in labels)
    # ... also when their keys differ: a key alone would read as one run's two sweeps
    other = _write(tmp_path / "z" / "seed0", _records(3.0, 5, key="k9"))
    labels = [r["label"] for r in compare_runs([same[0], other], out)["summary"]["runs"]]
    assert labels == [os.path.relpath(same[0]), os.path.relpath(other)]


def test_cli_compares_two_trained_and_swept_seeds(tmp_path, capsys):
    dirs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny runs give negative LLCs
        for seed in (0, 1):
            run = str(tmp_path / f"seed{seed}")
            train(replace(tiny(steps=20), seed=seed), run, progress=False)
            sweep(run, settings=replace(tiny().sweep, behaviour=False), progress=False)
            dirs.append(run)
    out = str(tmp_path / "cmp")
    assert main(["compare", *dirs, "--out", out, "--labels", "s0", "s1"]) == 0
    printed = capsys.readouterr().out
    assert "steps every run measured" in printed and os.path.join(out, "compare.png") in printed
    summary = json.load(open(os.path.join(out, "compare.json")))
    swept = [[json.loads(line) for line in open(os.path.join(d, "results.jsonl"))] for d in dirs]
    assert [r["checkpoints"] for r in summary["runs"]] == [len(s) for s in swept]
    assert [r["final_llc"] for r in summary["runs"]] == [s[-1]["llc_mean"] for s in swept]
    assert swept[0][-1]["llc_mean"] != swept[1][-1]["llc_mean"]  # the seeds differ
    assert summary["same_settings"] and summary["settings_differences"] == {}
    assert swept[0][-1]["sweep_settings"]["num_draws"] == tiny().sweep.num_draws
    assert main(["compare", dirs[0], "--out", out]) == 2
    assert "comparing needs two runs or more, got 1" in capsys.readouterr().err
