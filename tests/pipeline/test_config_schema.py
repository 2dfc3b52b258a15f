"""One schema for run configs, checked whole at load; data paths read against
the config's folder and fingerprinted in the manifest; and no document,
config or results line, makes loading raise anything but a clear
ValueError or TypeError (hypothesis fuzzing)."""
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from llcfast.pipeline import train
from llcfast.pipeline.config import RunConfig, load_config
from llcfast.pipeline.report import write_report
from llcfast.pipeline.safety import RunFileError
from llcfast.pipeline.sweep import read_results, sweep
from pipeline_configs import tiny


@pytest.mark.parametrize("doc,match", [
    ({"sweep": {"epsilon": -0.001}}, "sweep.epsilon must be a finite number > 0, got -0.001"),
    ({"sweep": {"gamma": "high"}}, "sweep.gamma must be a finite number >= 0, got 'high'"),
    ({"sweep": {"nbeta": 0}}, "sweep.nbeta must be a finite number > 0"),
    ({"sweep": {"num_burnin": -1}}, "sweep.num_burnin must be an int >= 0"),
    ({"sweep": {"seed": 1.5}}, "sweep.seed must be an int >= 0"),
    ({"train": {"steps": True}}, "train.steps must be an int >= 1, got True"),
    ({"train": None}, "train must be an object, got null"),
    ({"sweep": [1]}, r"sweep must be an object, got \[1\]"),
    ({"train": {"betas": 0.9}}, "train.betas must be a list of two numbers"),
    ({"train": {"betas": [0.9, 1.5]}}, r"train.betas must be two numbers in \[0, 1\)"),
    ({"sweep": {"epsilom": 1e-3}}, "did you mean 'epsilon'"),
    ({"seed": -3}, "seed must be an int >= 0"),
])
def test_every_field_is_checked_at_load(doc, match):
    with pytest.raises(ValueError, match=match):
        RunConfig.from_dict(doc)


def test_a_yaml_config_is_told_only_json_is_read(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 3\n")
    with pytest.raises(RunFileError, match=r"run.yaml: not valid JSON \(only JSON is read, not YAML\)"):
        load_config(str(path))


def token_config(tmp_path, tokens_name="tokens.npy"):
    folder = tmp_path / "configs"
    folder.mkdir(exist_ok=True)
    np.save(folder / tokens_name, (np.arange(4000) * 7 % 29).astype(np.int64))
    doc = {"task": "tokens", "task_args": {"path": tokens_name, "context": 8},
           "model_args": {"d_model": 8, "heads": 2, "layers": 1},
           "train": {"steps": 3, "batch_size": 4, "log_checkpoints": 1, "linear_checkpoints": 1},
           "sweep": {"num_chains": 2, "num_draws": 3, "llc_sequences": 8, "llc_batch_size": 4, "eval_sequences": 4,
                     "hessian": False, "behaviour": False}}
    path = folder / "run.json"
    path.write_text(json.dumps(doc))
    return path, folder / tokens_name


def test_a_relative_data_path_is_read_against_the_configs_folder(tmp_path, monkeypatch):
    path, tokens = token_config(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    np.save(elsewhere / "tokens.npy", np.zeros(4000, dtype=np.int64))  # same name, other data
    monkeypatch.chdir(elsewhere)
    cfg = load_config(str(path))
    assert cfg.task_args["path"] == str(tokens)


def test_a_sweep_refuses_data_other_than_the_run_was_trained_on(tmp_path):
    path, tokens = token_config(tmp_path)
    run = str(tmp_path / "run")
    manifest = train(load_config(str(path)), run, progress=False)
    assert manifest["data"]["path"] == str(tokens) and len(manifest["data"]["sha256"]) == 64
    np.save(tokens, (np.arange(4000) * 5 % 29).astype(np.int64))  # the file changed since training
    with pytest.raises(RunFileError, match="the run was trained on .*tokens.npy .* nothing was measured"):
        sweep(run, progress=False)
    assert not os.path.exists(os.path.join(run, "results.jsonl"))


def test_a_config_whose_task_cannot_be_made_leaves_no_manifest(tmp_path):
    cfg = RunConfig.from_dict({"task": "tokens", "task_args": {"path": str(tmp_path / "missing.npy")}})
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        train(cfg, str(tmp_path / "run"), progress=False)
    assert not os.path.exists(tmp_path / "run" / "manifest.json")


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10, 10 ** 6) | st.floats(allow_nan=True)
                           | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                     max_size=3), max_leaves=8)
config_keys = st.sampled_from(["task", "task_args", "model_args", "train", "sweep", "seed", "model", "epsilon"])
train_keys = st.sampled_from(["steps", "batch_size", "lr", "schedule", "weight_decay", "betas", "log_checkpoints"])
sweep_keys = st.sampled_from(["num_chains", "num_draws", "num_burnin", "epsilon", "gamma", "nbeta", "seed",
                              "sampler", "sampler_kwargs", "bounding_box", "precision", "num_init_batches",
                              "hessian", "llc_batch_size"])
configs = st.fixed_dictionaries({}, optional={
    "train": st.dictionaries(train_keys, json_values, max_size=3) | json_values,
    "sweep": st.dictionaries(sweep_keys, json_values, max_size=4) | json_values,
}).flatmap(lambda base: st.dictionaries(config_keys, json_values, max_size=2).map(lambda extra: {**extra, **base}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_no_config_document_raises_anything_but_a_clear_error(doc):
    try:
        RunConfig.from_dict(doc)
    except (ValueError, TypeError) as exc:
        assert str(exc) and "\n" not in str(exc)


record_like = st.fixed_dictionaries({}, optional={
    "step": json_values, "checkpoint": json_values, "settings": json_values, "llc_mean": json_values,
    "llc_std": json_values, "test_loss": json_values, "error": json_values})
# Records that pass for sweep records except in one field or another
near_records = st.fixed_dictionaries(
    {"step": st.integers(0, 10 ** 6), "checkpoint": st.just("c"), "settings": st.just("k"),
     "llc_mean": st.floats(-5, 50)},
    optional={k: json_values for k in ("llc_std", "test_loss", "rhat", "ess", "trend_t", "init_loss",
                                       "llc_per_chain", "failed_checks", "warnings", "behaviour", "hessian_trace",
                                       "hessian_top_eigenvalue", "diverged_chains", "seconds")})


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(near_records | record_like | json_values | st.text(max_size=20), max_size=8))
def test_no_results_line_makes_reading_or_reporting_raise_anything_but_a_clear_error(tmp_path, lines):
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(v if isinstance(v, str) else json.dumps(v) for v in lines) + "\n")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = read_results(str(path))
        try:
            write_report(records, str(tmp_path / "report"))
        except ValueError as exc:
            assert str(exc)
