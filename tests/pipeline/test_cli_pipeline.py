"""The pipeline's command line: help with examples, clear errors, and the
train -> sweep -> report -> calibrate chain on a tiny run (the full demo is
the README's main job)."""
import json
import os
import sys
import warnings

import pytest

from llcfast.cli import main
from llcfast.pipeline.demo import demo
from pipeline_configs import tiny


@pytest.mark.parametrize("command", ["demo", "train", "sweep", "estimate", "report", "calibrate", "info"])
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_errors_say_what_is_wrong(tmp_path, capsys):
    assert main(["sweep", str(tmp_path)]) == 2
    assert "has no manifest.json" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "run `llcfast sweep" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.json"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", str(tmp_path), "--chains", "0"])
    assert "must be > 0, got 0" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["train", "--preset", "demo", "--out", str(blocker / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llcfast train: error: [Errno") and "a_file/run" in err and "Traceback" not in err


def test_train_sweep_report_calibrate_from_the_command_line(tmp_path, capsys):
    cfg_path = tmp_path / "run.json"
    cfg_path.write_text(json.dumps(tiny().to_dict()))
    run = str(tmp_path / "run")
    assert main(["train", "--config", str(cfg_path), "--out", run, "--quiet"]) == 0
    assert main(["sweep", run, "--quiet", "--draws", "6"]) == 0
    assert main(["sweep", run, "--quiet", "--draws", "6", "--sampler", "sgnht:diffusion=0.02", "--bounding-box",
                 "1", "--no-behaviour"]) == 0
    by_sampler = {}
    for line in open(os.path.join(run, "results.jsonl")):
        r = json.loads(line)
        by_sampler.setdefault(r["settings"], []).append("behaviour" in r)
    assert sorted(map(set, by_sampler.values()), key=sorted) == [{False}, {True}]  # --no-behaviour: none measured
    # engine options do not change the settings key: a new draw count (and precision) makes a new sweep
    assert main(["sweep", run, "--quiet", "--draws", "5", "--mala", "--compile", "--precision", "bf16"]) == 0
    engine_records = [json.loads(line) for line in open(os.path.join(run, "results.jsonl"))][-1:]
    assert 0.0 <= engine_records[0]["mala_acceptance"] <= 1.0
    assert main(["sweep", run, "--quiet", "--sampler", "hmc"]) == 2
    assert "sampler must be one of" in capsys.readouterr().err
    assert main(["sweep", run, "--quiet", "--sampler", "sgnht:diffusion=x"]) == 2
    assert "--sampler 'sgnht:diffusion=x': expected NAME" in capsys.readouterr().err
    assert main(["report", run]) == 0
    out = capsys.readouterr().out
    assert "stage" in out and "report.png" in out
    assert os.path.isfile(os.path.join(run, "report.png"))
    # Three sweeps in one file: the latest is reported, one checkpoint each, and --settings picks another.
    assert "holds sweeps with 3 different settings" in out
    manifest = json.load(open(os.path.join(run, "manifest.json")))
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["checkpoints"] == len(manifest["checkpoints"])
    records = [json.loads(line) for line in open(os.path.join(run, "results.jsonl"))]
    first = records[0]["settings"]
    assert main(["report", run, "--settings", first]) == 0 and f"reporting {first}" in capsys.readouterr().out
    assert main(["report", run, "--settings", "nope"]) == 2
    assert "matches no sweep" in capsys.readouterr().err
    assert main(["calibrate", run, "--quiet", "--epsilons", "1e-4", "1e-3", "--gammas", "10", "--draws", "6"]) == 0
    assert "epsilon" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(run, "calibration", "calibration.png"))
    assert main(["calibrate", run, "--step", "999", "--quiet"]) == 2
    assert "no checkpoint at step 999" in capsys.readouterr().err
    assert main(["calibrate", run, "--quiet", "--epsilons", "1e-4", "--gammas", "10", "--draws", "6", "--samplers",
                 "sgld", "rmsprop_sgld:alpha=0.9999", "sgnht:diffusion=0.02"]) == 0
    out = capsys.readouterr().out
    assert "rmsprop_sgld(alpha=0.9999)" in out and "sgnht(diffusion=0.02)" in out
    assert main(["calibrate", run, "--quiet", "--samplers", "sgnht:diffusion"]) == 2
    assert "expected NAME or NAME:KEY=NUMBER" in capsys.readouterr().err


def test_demo_pipeline_writes_the_report(tmp_path):
    out = str(tmp_path / "demo")
    paths = demo(out, config=tiny(steps=30), progress=False)
    for name in ("report.png", "report.svg", "summary.json", "results.csv", "results.jsonl", "manifest.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    summary = json.load(open(paths["summary"]))
    assert summary["checkpoints"] == len(json.load(open(os.path.join(out, "manifest.json")))["checkpoints"])
    assert "train" in summary["seconds"] and summary["stages"]


def test_running_out_of_memory_is_a_message_not_a_traceback(tmp_path, capsys, monkeypatch):
    run = str(tmp_path / "run")
    cfg_path = tmp_path / "run.json"
    cfg_path.write_text(json.dumps(tiny().to_dict()))
    assert main(["train", "--config", str(cfg_path), "--out", run, "--quiet"]) == 0
    import torch
    from llcfast.pipeline import sweep as sweep_module

    def planner_refuses(*a, **k):
        raise MemoryError("one chain needs 9.0 GiB but 4.0 GiB are free; lower the batch size")

    monkeypatch.setattr(sweep_module, "estimate_llc", planner_refuses)
    assert main(["sweep", run, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llcfast sweep: error: one chain needs 9.0 GiB") and "--precision bf16" in err
    assert "Traceback" not in err

    def torch_runs_out(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB\nmore detail")

    monkeypatch.setattr(sweep_module, "estimate_llc", torch_runs_out)
    assert main(["sweep", run, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "error: out of device memory (CUDA out of memory. Tried to allocate 1.00 GiB)" in err
    assert "more detail" not in err and "--no-hessian" in err


def test_warnings_from_the_command_line_are_one_line_without_our_source(capsys, monkeypatch):
    def printing(message, category, filename, lineno, file=None, line=None):  # as Python prints outside pytest
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    def warns(args):
        warnings.warn("step 0: the LLC estimate is negative", RuntimeWarning)
        return 0
    monkeypatch.setattr(warnings, "showwarning", printing)
    monkeypatch.setattr("llcfast.cli._info", warns)
    before = warnings.formatwarning
    assert main(["info"]) == 0
    assert capsys.readouterr().err == "llcfast: RuntimeWarning: step 0: the LLC estimate is negative\n"
    assert warnings.formatwarning is before



def test_every_option_of_every_command_says_what_it_does():
    import argparse
    from llcfast.cli import build_parser
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, sub in commands.choices.items():
        if name == "bench":  # the benchmark suite documents its own options
            continue
        assert sub.description or sub.epilog, f"llcfast {name} has neither a description nor examples"
        missing += [f"{name} {a.option_strings or a.dest}" for a in sub._actions
                    if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, missing
