"""Sweeps over checkpoints: atomic appends, skipping what is done, bad
checkpoints reported and passed over, the report and its files."""
import json
import os

import numpy as np
import pytest
import torch

from llcfast.pipeline import load_checkpoint, train
from llcfast.pipeline.report import write_report
from llcfast.pipeline.sweep import append_record, read_results, sweep
from pipeline_configs import tiny


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("run"))
    train(tiny(hessian=True), path, progress=False)
    return path


def _lines(path):
    return open(path).read().splitlines()


def test_sweep_measures_every_checkpoint_and_skips_them_on_rerun(run_dir):
    records = sweep(run_dir, progress=False)
    manifest = json.load(open(os.path.join(run_dir, "manifest.json")))
    assert [r["step"] for r in records] == [c["step"] for c in manifest["checkpoints"]]
    for r in records:
        assert len(r["llc_per_chain"]) == 3 and np.isfinite(r["llc_mean"]) and r["test_loss"] > 0
        assert r["hessian_trace"] is not None and r["hessian_top_eig"] is not None
    results = os.path.join(run_dir, "results.jsonl")
    before = _lines(results)
    again = sweep(run_dir, progress=False)
    assert _lines(results) == before  # nothing re-measured
    assert [r["llc_mean"] for r in again] == [r["llc_mean"] for r in records]


def test_a_bad_checkpoint_is_reported_and_the_sweep_goes_on(run_dir, tmp_path):
    import shutil
    copy = str(tmp_path / "run")
    shutil.copytree(run_dir, copy)
    os.remove(os.path.join(copy, "results.jsonl")) if os.path.exists(os.path.join(copy, "results.jsonl")) else None
    manifest = json.load(open(os.path.join(copy, "manifest.json")))
    broken = manifest["checkpoints"][2]["file"]
    open(os.path.join(copy, broken), "wb").write(b"not a checkpoint")
    with pytest.warns(RuntimeWarning, match=f"checkpoint {broken} .* could not be loaded"):  # the bars' warning hook passes it on
        records = sweep(copy, progress=True, hessian=False)
    assert len(records) == len(manifest["checkpoints"]) - 1
    errors = [r for r in read_results(os.path.join(copy, "results.jsonl")) if "error" in r]
    assert [e["checkpoint"] for e in errors] == [broken]
    # fixed file: the rerun measures just that one
    shutil.copy(os.path.join(run_dir, broken), os.path.join(copy, broken))
    records = sweep(copy, progress=False, hessian=False)
    assert len(records) == len(manifest["checkpoints"])


def test_a_torn_last_line_is_skipped_and_the_next_record_starts_fresh(tmp_path):
    path = str(tmp_path / "r.jsonl")
    append_record(path, {"step": 1, "settings": "k", "llc_mean": 1.0})
    with open(path, "a") as f:
        f.write('{"step": 2, "llc')  # killed mid-write
    append_record(path, {"step": 3, "settings": "k", "llc_mean": 2.0})
    with pytest.warns(RuntimeWarning, match="line 2 is incomplete"):
        assert [r["step"] for r in read_results(path)] == [1, 3]


def test_report_writes_figure_tables_and_stages(run_dir, tmp_path):
    records = sweep(run_dir, progress=False)
    paths = write_report(records, str(tmp_path), title="t")
    for key in ("png", "svg", "summary", "csv"):
        assert os.path.getsize(paths[key]) > 1000 if key in ("png", "svg") else os.path.getsize(paths[key]) > 0
    summary = json.load(open(paths["summary"]))
    assert summary["checkpoints"] == len(records) and len(summary["stages"]) >= 1
    import pandas as pd
    frame = pd.read_csv(paths["csv"])
    assert list(frame["step"]) == [r["step"] for r in records]
    with pytest.raises(ValueError, match="no finished checkpoints"):
        write_report([], str(tmp_path))


def test_load_checkpoint_formats(tmp_path):
    model = torch.nn.Linear(3, 2)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch.save({"model": model.state_dict(), "step": 5}, tmp_path / "wrapped.pt")
    torch.save(model, tmp_path / "module.pt")
    for name in ("sd.pt", "wrapped.pt"):
        loaded = load_checkpoint(str(tmp_path / name), lambda: torch.nn.Linear(3, 2))
        assert torch.equal(loaded.weight, model.weight)
    assert torch.equal(load_checkpoint(str(tmp_path / "module.pt"), weights_only=False).weight, model.weight)
    with pytest.raises(ValueError, match="pass weights_only=False"):
        load_checkpoint(str(tmp_path / "module.pt"))
    with pytest.raises(ValueError, match="pass model="):
        load_checkpoint(str(tmp_path / "sd.pt"))
    with pytest.raises(ValueError, match="does not fit the model"):
        load_checkpoint(str(tmp_path / "sd.pt"), torch.nn.Linear(4, 2))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_load_a_hugging_face_checkpoint_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "hf")
    loaded = load_checkpoint(str(tmp_path / "hf"))
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)


def test_parts_left_by_a_killed_distributed_sweep_count_as_done_and_are_merged(run_dir, tmp_path):
    import shutil
    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy)
    results = os.path.join(copy, "results.jsonl")
    records = sweep(copy, progress=False)
    lines = _lines(results)
    # As if rank 1 of a killed job had finished the last checkpoint only.
    with open(results, "w") as f:
        f.write("\n".join(lines[:-1]) + "\n")
    with open(results + ".rank1", "w") as f:
        f.write(lines[-1] + "\n")
    again = sweep(copy, progress=False)
    assert not os.path.exists(results + ".rank1")
    assert [r["llc_mean"] for r in again] == [r["llc_mean"] for r in records]
    assert sorted(_lines(results)) == sorted(lines)  # nothing re-measured, the part merged in


def test_sweeps_take_a_sampler_and_keep_older_keys(run_dir, tmp_path):
    from dataclasses import asdict, replace
    import hashlib
    from llcfast.pipeline.config import SweepSettings
    from llcfast.pipeline.sweep import settings_key
    # Default sampler settings leave the key as it was before the sampler fields existed.
    s = SweepSettings()
    later = ("sampler", "sampler_kwargs", "bounding_box", "precision", "num_init_batches", "behaviour", "landscape",
             "landscape_points")
    old = {k: v for k, v in asdict(s).items() if k not in later}
    assert settings_key(s) == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:12]
    assert settings_key(replace(s, sampler="sgnht")) != settings_key(s)
    assert settings_key(replace(s, precision="bf16")) != settings_key(s)
    out = str(tmp_path / "r.jsonl")
    base = sweep(run_dir, progress=False, out=out)
    from llcfast.pipeline import RunConfig
    cfg = RunConfig.from_dict(json.load(open(os.path.join(run_dir, "manifest.json")))["config"])
    nht = sweep(run_dir, progress=False, out=out, settings=replace(cfg.sweep, sampler="sgnht", bounding_box=0.5,
                                                                   sampler_kwargs={"diffusion": 0.02}))
    assert len(nht) == len(base) and [r["llc_mean"] for r in nht] != [r["llc_mean"] for r in base]
    with pytest.raises(ValueError, match="sampler must be one of"):
        sweep(run_dir, progress=False, out=out, settings=replace(cfg.sweep, sampler="hmc"))
    with pytest.raises(ValueError, match="sweep.precision must be one of .*'fp16'"):
        RunConfig.from_dict(dict(cfg.to_dict(), sweep=dict(asdict(cfg.sweep), precision="fp16")))
    with pytest.raises(ValueError, match="sweep: sampler_kwargs: 'alpha' is not a hyperparameter of 'sgnht'"):
        RunConfig.from_dict(dict(cfg.to_dict(), sweep=dict(asdict(cfg.sweep), sampler="sgnht",
                                                           sampler_kwargs={"alpha": 0.9})))


def test_sweep_compile_reaches_the_hessian_passes_and_changes_no_number(run_dir, tmp_path, monkeypatch):
    plain = sweep(run_dir, progress=False, out=str(tmp_path / "plain.jsonl"))
    wrapped = []

    def spy(fn, *args, **kwargs):  # stands in for torch.compile: records what it was given, runs it as is
        wrapped.append(fn.__qualname__)
        return fn

    monkeypatch.setattr(torch, "compile", spy)
    compiled = sweep(run_dir, progress=False, out=str(tmp_path / "compiled.jsonl"), engine={"compile": True})
    assert any(name.startswith("_pass.") for name in wrapped)  # the Hessian's passes
    assert any(not name.startswith("_pass.") for name in wrapped)  # the LLC's
    for a, b in zip(plain, compiled):
        assert a["llc_mean"] == b["llc_mean"] and a["hessian_top_eig"] == pytest.approx(b["hessian_top_eig"])
        assert a["hessian_trace"] == pytest.approx(b["hessian_trace"])


def test_landscape_barriers_are_added_without_measuring_the_llc_again(tmp_path):
    from dataclasses import replace

    from llcfast.pipeline import RunConfig
    path = str(tmp_path / "run")
    train(tiny(), path, progress=False)
    first = sweep(path, progress=False)
    assert all("barrier_final" not in r for r in first)
    cfg = RunConfig.from_dict(json.load(open(os.path.join(path, "manifest.json")))["config"])
    results = os.path.join(path, "results.jsonl")
    lines = len(_lines(results))
    records = sweep(path, progress=False, settings=replace(cfg.sweep, landscape=True, landscape_points=5))
    assert len(_lines(results)) == lines + len(records)  # one newer version of each record, no new estimate
    assert [r["llc_mean"] for r in records] == [r["llc_mean"] for r in first]
    assert records[0]["barrier_prev"] is None and records[-1]["barrier_final"] == 0.0
    assert all(np.isfinite(r["barrier_final"]) and r["barrier_final"] >= 0 for r in records)
    assert all(np.isfinite(r["barrier_prev"]) for r in records[1:])
    again = sweep(path, progress=False, settings=replace(cfg.sweep, landscape=True, landscape_points=5))
    assert len(_lines(results)) == lines + len(records)  # nothing added twice
    assert [r["barrier_prev"] for r in again] == [r["barrier_prev"] for r in records]
    os.makedirs(tmp_path / "report")
    files = write_report(again, str(tmp_path / "report"), title="landscape")
    assert os.path.getsize(files["png"]) > 1000
    header = open(files["csv"]).readline().strip().split(",")
    assert {"barrier_prev", "barrier_final"} <= set(header)
