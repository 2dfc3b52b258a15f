"""Training with checkpoints: the schedule, the manifest, and resumption that
reproduces the uninterrupted run exactly."""
import json
import os

import pytest
import torch

from llcfast.pipeline import checkpoint_steps, preset, train
from llcfast.pipeline.config import RunConfig, load_config
from llcfast.pipeline.training import learning_rate
from pipeline_configs import tiny


def test_checkpoint_steps_merge_log_and_linear():
    steps = checkpoint_steps(1000, 10, 4)
    assert steps[0] == 0 and steps[-1] == 1000
    assert steps == sorted(set(steps))
    assert {250, 500, 750} <= set(steps)
    assert {1, 2, 5, 10, 22, 46, 100, 215, 464} <= set(steps)  # logspace(0, 3, 10), rounded
    assert checkpoint_steps(10, 0, 0) == [0, 10]


def test_one_cycle_schedule_shape():
    cfg = tiny(steps=100)
    lrs = [learning_rate(cfg, s) for s in range(100)]
    peak = max(lrs)
    assert peak == pytest.approx(cfg.train.lr) and lrs.index(peak) == 49
    assert lrs[0] < 0.05 * peak and lrs[-1] < 0.05 * peak
    assert all(a <= b for a, b in zip(lrs[:50], lrs[1:50]))


def _final(run_dir):
    manifest = json.load(open(os.path.join(run_dir, "manifest.json")))
    last = manifest["checkpoints"][-1]
    return manifest, torch.load(os.path.join(run_dir, last["file"]), weights_only=True)


def test_train_writes_checkpoints_and_a_manifest(tmp_path):
    cfg = tiny()
    manifest = train(cfg, str(tmp_path), progress=False)
    assert manifest["complete"]
    steps = [c["step"] for c in manifest["checkpoints"]]
    assert steps == checkpoint_steps(40, 4, 3)
    for c in manifest["checkpoints"]:
        assert os.path.isfile(tmp_path / c["file"])
    assert RunConfig.from_dict(manifest["config"]) == cfg
    assert not any(name.startswith(".tmp-") for name in os.listdir(tmp_path / "checkpoints"))


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    cfg = tiny()
    train(cfg, str(tmp_path / "whole"), progress=False)
    # killed at step 23 (between checkpoints 13 and 27): resumes from 13
    partial = train(cfg, str(tmp_path / "split"), progress=False, stop_at=23)
    assert not partial["complete"] and partial["checkpoints"][-1]["step"] == 13
    # As written before the config's `model` field existed: its default, so the run still resumes.
    path = tmp_path / "split" / "manifest.json"
    old = json.loads(path.read_text())
    del old["config"]["model"]
    path.write_text(json.dumps(old))
    train(cfg, str(tmp_path / "split"), progress=False)
    m1, w1 = _final(tmp_path / "whole")
    m2, w2 = _final(tmp_path / "split")
    assert [c["step"] for c in m1["checkpoints"]] == [c["step"] for c in m2["checkpoints"]]
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k


@pytest.mark.parametrize("failure,at,raised,resume_step", [
    (KeyboardInterrupt(), 17, KeyboardInterrupt, 17),  # Ctrl-C saves the state where it stopped
    # Out of memory: the last checkpoint's state stays the resume point, not the failed step's.
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 20, MemoryError, 13),
], ids=["ctrl-c", "out-of-memory"])
def test_a_stopped_run_resumes_exactly(tmp_path, monkeypatch, failure, at, raised, resume_step):
    cfg = tiny()
    train(cfg, str(tmp_path / "whole"), progress=False)
    from llcfast.pipeline import tasks
    original = tasks.RegressionTask.train_batch

    def fail_at(self, step, *a, **k):
        if step == at:
            raise failure
        return original(self, step, *a, **k)

    monkeypatch.setattr(tasks.RegressionTask, "train_batch", fail_at)
    with pytest.raises(raised) as info:
        train(cfg, str(tmp_path / "split"), progress=False)
    if raised is MemoryError:
        message = str(info.value)
        assert "ran out of cpu memory at step 20 (CUDA out of memory. Tried to allocate 2.00 GiB)" in message
        assert "train.batch_size = 16" in message and "resumes from step 13" in message
    assert torch.load(tmp_path / "split" / "resume.pt", weights_only=True)["step"] == resume_step
    monkeypatch.setattr(tasks.RegressionTask, "train_batch", original)
    train(cfg, str(tmp_path / "split"), progress=False)
    w1, w2 = _final(tmp_path / "whole")[1], _final(tmp_path / "split")[1]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_a_directory_with_another_run_is_refused(tmp_path):
    train(tiny(), str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="holds a run with a different config"):
        train(tiny(steps=50), str(tmp_path), progress=False)


def test_config_errors_name_the_bad_value(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'nope'; allowed"):
        preset("nope")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stepz'\] in train"):
        RunConfig.from_dict({"train": {"stepz": 3}})
    with pytest.raises(ValueError, match="task must be one of"):
        RunConfig.from_dict({"task": "vision"})
    with pytest.raises(ValueError, match="train.lr must be a finite number > 0"):
        RunConfig.from_dict({"train": {"lr": -1}})
    with pytest.raises(ValueError, match="bad model_args"):
        RunConfig.from_dict({"model_args": {"width": 3}}).make_model()
    path = tmp_path / "c.json"
    path.write_text('{"preset": "demo", "train": {"steps": 7}}')
    cfg = load_config(str(path))
    assert cfg.train.steps == 7 and cfg.train.batch_size == preset("demo").train.batch_size
    path.write_text("{not json")
    with pytest.raises(ValueError, match="c.json: not valid JSON"):
        load_config(str(path))


def test_a_non_finite_loss_stops_the_run_and_names_the_learning_rate(tmp_path):
    cfg = RunConfig.from_dict({**tiny().to_dict(), "train": {**tiny().to_dict()["train"], "lr": 1e30}})
    with pytest.raises(FloatingPointError, match=r"training loss became (nan|inf) at step \d+; lower train.lr"):
        train(cfg, str(tmp_path), progress=False)
