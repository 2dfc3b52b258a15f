"""`llcfast estimate` (one checkpoint: the sweep's number, its checks, its
loss traces, Ctrl-C) and `llcfast bench` (the checkout's benchmark suite)."""
import json
import os
from dataclasses import replace

import pytest

import llcfast
from llcfast.cli import main
from llcfast.pipeline import estimate as estimate_module
from llcfast.pipeline.checkpoints import read_manifest
from llcfast.pipeline.config import RunConfig
from llcfast.pipeline.sweep import sweep
from pipeline_configs import tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("estimate")
    cfg = root / "run.json"
    cfg.write_text(json.dumps(tiny().to_dict()))
    path = str(root / "run")
    assert main(["train", "--config", str(cfg), "--out", path, "--quiet"]) == 0
    return path


def test_train_points_to_estimate_and_sweep(tmp_path, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(tiny(steps=4).to_dict()))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"llcfast sweep {tmp_path / 'r'}" in out and f"llcfast estimate {tmp_path / 'r'}" in out


def _steps(run):
    return [c["step"] for c in json.load(open(os.path.join(run, "manifest.json")))["checkpoints"]]


def _settings(run, **changes):
    """The run's sweep settings with ``changes``."""
    return replace(RunConfig.from_dict(read_manifest(run)["config"]).sweep, **changes)


def test_estimate_gives_the_sweeps_number_with_its_checks_and_traces(run, tmp_path, capsys):
    results = str(tmp_path / "results.jsonl")
    records = sweep(run, settings=_settings(run, num_draws=6, behaviour=False, hessian=True), out=results,
                    device="cpu", progress=False)
    step = _steps(run)[3]
    out = str(tmp_path / "est")
    assert main(["estimate", run, "--step", str(step), "--draws", "6", "--hessian", "--device", "cpu", "--quiet",
                 "--out", out]) == 0
    printed = capsys.readouterr().out
    saved = json.load(open(os.path.join(out, f"estimate_step{step}.json")))
    swept = next(r for r in records if r["step"] == step)
    assert saved["llc_mean"] == swept["llc_mean"] and saved["settings"] == swept["settings"]
    assert saved["llc_per_chain"] == swept["llc_per_chain"]
    assert len(saved["loss_trace"]) == 3 and {len(row) for row in saved["loss_trace"]} == {6}
    assert saved["sweep_settings"]["num_draws"] == 6 and saved["summary"] in printed
    assert f"step {step}: LLC {swept['llc_mean']:.4g}" in printed and "split R-hat" in printed
    for name in ("hessian_trace", "hessian_trace_se", "hessian_top_eig"):
        assert saved[name] == swept[name], name
    assert f"Hessian trace {swept['hessian_trace']:.4g} ± " in printed
    assert os.path.getsize(os.path.join(out, f"estimate_step{step}.png")) > 10_000


def test_estimate_takes_the_last_checkpoint_and_the_llc_overrides(run, capsys):
    assert main(["estimate", run, "--chains", "2", "--draws", "4", "--burnin", "2", "--epsilon", "1e-4",
                 "--sampler", "sgnht:diffusion=0.02", "--init-batches", "3", "--device", "cpu", "--quiet"]) == 0
    last = max(_steps(run))
    assert f"step {last}: LLC" in capsys.readouterr().out
    saved = json.load(open(os.path.join(run, "estimates", f"estimate_step{last}.json")))
    assert len(saved["loss_trace"]) == 2 and len(saved["loss_trace"][0]) == 4
    assert saved["config"]["epsilon"] == 1e-4 and saved["config"]["num_burnin"] == 2
    assert saved["config"]["num_init_batches"] == 3 and saved["sweep_settings"]["num_init_batches"] == 3
    assert saved["config"]["sampler"] == "sgnht" and saved["config"]["sampler_kwargs"] == {"diffusion": 0.02}
    assert "hessian_trace" not in saved  # the run's config asks for none
    assert main(["estimate", run, "--chains", "2", "--draws", "4", "--init-batches", "all", "--device", "cpu",
                 "--quiet"]) == 0
    saved = json.load(open(os.path.join(run, "estimates", f"estimate_step{last}.json")))
    assert saved["sweep_settings"]["num_init_batches"] == "all"
    assert saved["config"]["num_init_batches"] == len(saved["diagnostics"]["init_loss_per_batch"]) == \
        saved["diagnostics"]["loader_batches"] and saved["diagnostics"]["llc_se_from_init_loss"] == 0.0


def test_estimate_errors_name_what_is_wrong(run, tmp_path, capsys):
    assert main(["estimate", run, "--step", "999", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at step 999" in err and str(_steps(run)) in err
    assert main(["estimate", str(tmp_path), "--quiet"]) == 2
    assert "has no manifest.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["estimate", run, "--draws", "0"])
    assert "must be > 0, got 0" in capsys.readouterr().err
    for bad in ("0", "most"):
        with pytest.raises(SystemExit):
            main(["estimate", run, "--init-batches", bad])
        assert f"expected a number of batches >= 1 or 'all', got '{bad}'" in capsys.readouterr().err


def _interrupted_at(at):
    """checkpoint_llc whose chains get Ctrl-C during step ``at`` (from 0): the
    ``at`` steps before it are whole and kept; the one under way is not."""
    def checkpoint_llc(model, loss_fn, batches, s, *, device, progress, engine):
        def interrupt(step, **_):
            if step == at:
                raise KeyboardInterrupt
        return llcfast.estimate_llc(model, batches, loss_fn, num_chains=s.num_chains, num_draws=s.num_draws,
                                    num_burnin=s.num_burnin, epsilon=s.epsilon, gamma=s.gamma, nbeta=s.nbeta,
                                    seed=s.seed, device=device, progress=False, callbacks=[interrupt])
    return checkpoint_llc


def test_ctrl_c_keeps_the_draws_finished(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(estimate_module, "checkpoint_llc", _interrupted_at(5))
    out = str(tmp_path / "est")
    assert main(["estimate", run, "--draws", "8", "--device", "cpu", "--quiet", "--out", out]) == 130
    captured = capsys.readouterr()
    assert "interrupted after 5 of 8 steps" in captured.out and "from the draws finished" in captured.err
    saved = json.load(open(os.path.join(out, f"estimate_step{max(_steps(run))}.json")))
    assert {len(row) for row in saved["loss_trace"]} == {5} and saved["config"]["interrupted"]["steps_done"] == 5

    def hessian_interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.undo()
    monkeypatch.setattr(estimate_module, "checkpoint_hessian", hessian_interrupted)
    assert main(["estimate", run, "--draws", "8", "--hessian", "--device", "cpu", "--quiet", "--out", out]) == 130
    assert "the LLC above is whole" in capsys.readouterr().err
    saved = json.load(open(os.path.join(out, f"estimate_step{max(_steps(run))}.json")))
    assert {len(row) for row in saved["loss_trace"]} == {8} and "hessian_trace" not in saved

    monkeypatch.setattr(estimate_module, "checkpoint_llc", _interrupted_at(2))  # still burning in: nothing to keep
    assert main(["estimate", run, "--draws", "8", "--burnin", "4", "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "burnin")]) == 130
    assert "no draw was finished yet" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "burnin")


def test_bench_runs_the_checkouts_suite_with_its_own_options(tmp_path, capfd, monkeypatch):
    decoy = tmp_path / "benchmarks"  # a folder of the same name where the command is run is not the suite
    decoy.mkdir()
    (decoy / "__main__.py").write_text("print('not the suite')\n")
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--help"]) == 0
    out = capfd.readouterr().out
    assert "python -m benchmarks" in out and "not the suite" not in out
    assert main(["bench", "--only", "nothing"]) == 2  # the suite's own parser refuses it
    assert "invalid choice: 'nothing'" in capfd.readouterr().err
    monkeypatch.setattr(os.path, "isfile", lambda path: False)
    assert main(["bench", "--quick"]) == 2
    assert "is the benchmarks/ folder of a source checkout" in capfd.readouterr().err
