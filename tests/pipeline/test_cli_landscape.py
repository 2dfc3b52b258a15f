"""`llcfast landscape`: the straight path between two checkpoints gives the
barrier the sweep records; two runs (seeds) with alignment; ablations with
heads; what is wrong with a call is named."""
import json
import os
from dataclasses import replace

import pytest

from llcfast.cli import main
from pipeline_configs import tiny


def train(root, seed):
    cfg = root / f"run{seed}.json"
    # the landscape's sequences are the first hessian_batch of the evaluation set: here all of it
    cfg.write_text(json.dumps(replace(tiny(steps=20, hessian_batch=64), seed=seed).to_dict()))
    path = str(root / f"seed{seed}")
    assert main(["train", "--config", str(cfg), "--out", path, "--quiet"]) == 0
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("landscape")
    return train(root, 0), train(root, 1)


def steps_of(run):
    return [c["step"] for c in json.load(open(os.path.join(run, "manifest.json")))["checkpoints"]]


@pytest.mark.filterwarnings("ignore")
def test_consecutive_checkpoints_give_the_sweeps_barrier(runs, capsys):
    run = runs[0]
    steps = steps_of(run)
    assert main(["sweep", run, "--landscape", "--quiet"]) == 0
    records = [json.loads(line) for line in open(os.path.join(run, "results.jsonl"))]
    recorded = {r["step"]: r for r in records}
    start, end = steps[0], steps[1]
    capsys.readouterr()
    assert main(["landscape", run, "--step", str(start), "--to-step", str(end), "--points", "9", "--quiet"]) == 0
    out = capsys.readouterr().out
    saved = json.load(open(os.path.join(run, "landscape", f"path_step{start}_to_step{end}.json")))
    assert saved["barrier"] == pytest.approx(recorded[end]["barrier_prev"], rel=1e-6, abs=1e-12)
    # on the sequences the test loss is taken on: the path's ends are the two checkpoints' test losses
    assert saved["loss"][0] == pytest.approx(recorded[start]["test_loss"], rel=1e-5)
    assert saved["loss"][-1] == pytest.approx(recorded[end]["test_loss"], rel=1e-5)
    assert recorded[start]["test_loss"] != pytest.approx(recorded[end]["test_loss"], rel=1e-3)
    assert f"from step {start} to step {end}" in out and len(saved["loss"]) == 9
    assert os.path.getsize(os.path.join(run, "landscape", f"path_step{start}_to_step{end}.png")) > 0


def test_two_seeds_aligned_and_the_ablations(runs, tmp_path, capsys):
    a, b = runs
    assert main(["landscape", a, "--to", b, "--align", "weights", "--ablate", "--heads", "--out", str(tmp_path),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    last_b = steps_of(b)[-1]
    assert f"to {b} step {last_b}, aligned by weights: barrier" in out and "head 0." in out
    saved = json.load(open(tmp_path / f"path_step{steps_of(a)[-1]}_to_seed1_step{last_b}.json"))
    assert saved["align"] == "weights" and saved["to"]["run"] == b
    ablation = json.load(open(tmp_path / f"ablation_step{steps_of(a)[-1]}.json"))
    assert set(ablation["loss"]) == {"none", "drop 0", "head 0.0", "head 0.1"}


def test_what_is_wrong_is_named(runs, capsys):
    run = runs[0]
    assert main(["landscape", run]) == 2
    assert "nothing to measure: give a checkpoint to end in (--to-step" in capsys.readouterr().err
    assert main(["landscape", run, "--to-step", str(steps_of(run)[-1])]) == 2
    assert "to itself is flat" in capsys.readouterr().err
    assert main(["landscape", run, "--to-step", "12345"]) == 2
    assert "no checkpoint at step 12345" in capsys.readouterr().err
