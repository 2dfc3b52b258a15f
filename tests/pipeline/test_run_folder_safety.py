"""Run folders from elsewhere: writes stay inside the run folder and never go
through a symbolic link; names a manifest turns into paths are checked;
one process at a time holds a run folder; a Ctrl-C at any point of a
training step resumes to the same weights; malformed records are named."""
import json
import os
import signal
import socket

import pytest
import torch

from llcfast.pipeline import train
from llcfast.pipeline.checkpoints import read_manifest
from llcfast.pipeline.report import write_report
from llcfast.pipeline.safety import LOCK, RunFileError, RunLocked, run_lock
from llcfast.pipeline.sweep import append_record, read_results
from pipeline_configs import tiny


def outside_file(tmp_path):
    target = tmp_path / "outside" / "authorized_keys"
    target.parent.mkdir()
    target.write_text("precious\n")
    return target


def test_a_results_file_linked_elsewhere_is_not_appended_to(tmp_path):
    target = outside_file(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(target, run / "results.jsonl")
    with pytest.raises(RunFileError, match="results.jsonl is a symbolic link; llcfast does not write through links"):
        append_record(str(run / "results.jsonl"), {"step": 1, "checkpoint": "$(touch PWNED)", "settings": "k"})
    assert target.read_text() == "precious\n"


def test_report_files_linked_elsewhere_are_refused_and_left_alone(tmp_path):
    target = outside_file(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(target, out / "results.csv")
    records = [{"step": s, "checkpoint": f"c{s}", "settings": "k", "llc_mean": 1.0 + s / 10, "llc_std": 0.1,
                "test_loss": 1.0 / (s + 1)} for s in range(6)]
    with pytest.raises(RunFileError, match="results.csv is a symbolic link; llcfast does not write through links"):
        write_report(records, str(out))
    assert target.read_text() == "precious\n" and os.path.islink(out / "results.csv")


def manifest_with(tmp_path, checkpoints, config=True):
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    doc = {"version": 1, "checkpoints": checkpoints, **({"config": tiny().to_dict()} if config else {})}
    (run / "manifest.json").write_text(json.dumps(doc))
    return str(run)


@pytest.mark.parametrize("checkpoints,match", [
    ([{"step": "9/../../../pwn_est", "file": "checkpoints/a.pt"}], r"checkpoints\[0\] must be an object with an "
                                                                   "integer 'step'"),
    ([{"step": True, "file": "checkpoints/a.pt"}], "integer 'step'"),
    ([{"step": 3, "file": "../../outside.pt"}], r"checkpoints\[0\].file '../../outside.pt' is not a safe relative"),
    ([{"step": 3, "file": "$(touch PWNED)"}], "is not a safe relative path"),
    ([{"step": 3, "file": "/etc/passwd"}], "is not a safe relative path"),
    ("many", "'checkpoints' must be a list"),
])
def test_manifest_names_that_would_become_unsafe_paths_are_refused(tmp_path, checkpoints, match):
    run = manifest_with(tmp_path, checkpoints)
    with pytest.raises(RunFileError, match="manifest.json: .*" + match):
        read_manifest(run)


def test_a_checkpoint_folder_linked_out_of_the_run_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    run = manifest_with(tmp_path, [{"step": 3, "file": "checkpoints/step_3.pt"}])
    os.symlink(tmp_path / "elsewhere", os.path.join(run, "checkpoints"))
    with pytest.raises(RunFileError, match="outside the run folder"):
        read_manifest(run)


@pytest.mark.parametrize("text,match", [
    ("{", "not valid JSON"),
    ("[]", "expected a JSON object, got list"),
    ('{"checkpoints": []}', "has no 'config' object"),
])
def test_a_malformed_manifest_is_named_in_one_line(tmp_path, text, match):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(text)
    with pytest.raises(RunFileError, match=match) as info:
        read_manifest(str(run))
    assert str(info.value).startswith(str(run / "manifest.json")) and "\n" not in str(info.value)


def test_lines_that_are_not_records_are_named_and_skipped(tmp_path):
    path = tmp_path / "results.jsonl"
    good = {"step": 2, "checkpoint": "c", "settings": "k", "llc_mean": 1.5}
    lines = ["null", "[1, 2]", '{"step": 1}', json.dumps(dict(good, step="2")), json.dumps(good),
             json.dumps({"step": 3, "checkpoint": "c", "settings": "k", "error": "OSError: gone"})]
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(RuntimeWarning) as seen:
        records = read_results(str(path))
    assert records == [good, json.loads(lines[-1])]
    messages = [str(w.message) for w in seen]
    assert any("line 1 is not a record (a JSON NoneType, not a record object)" in m for m in messages)
    assert any("line 3 is not a record (its 'settings' is None, not a string)" in m for m in messages)
    assert any("line 4 is not a record (its step '2' is not an integer >= 0)" in m for m in messages)


def test_a_second_holder_of_a_run_folder_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    with run_lock(str(tmp_path), "sweep"):
        with pytest.raises(RunLocked, match=rf"in use by `llcfast sweep` \(process {os.getpid()} on "):
            with run_lock(str(tmp_path), "sweep"):
                pass
    assert not (tmp_path / LOCK).exists()
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    (tmp_path / LOCK).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "command": "train"}))
    with pytest.warns(RuntimeWarning, match=f"taking over a stale lock of process {dead}"):
        with run_lock(str(tmp_path), "sweep"):
            assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()


def test_a_training_run_held_by_another_process_is_refused(tmp_path):
    with run_lock(str(tmp_path), "sweep"):
        with pytest.raises(RunLocked, match="in use by `llcfast sweep`"):
            train(tiny(), str(tmp_path), progress=False)


def _final_weights(run_dir):
    manifest = json.load(open(os.path.join(run_dir, "manifest.json")))
    return [torch.load(os.path.join(run_dir, c["file"]), weights_only=True) for c in manifest["checkpoints"]]


POINTS = ["before the step", "after the forward", "inside the optimizer, before its update",
          "inside the optimizer, after its update", "after the step"]


@pytest.mark.parametrize("point", POINTS)
def test_ctrl_c_at_every_point_of_a_training_step_resumes_to_the_same_checkpoints(tmp_path, monkeypatch, point):
    """A real SIGINT, sent from inside the step at each point (no timing
    race): training stops, and the resumed run writes every checkpoint
    bit-identical to an uninterrupted run's."""
    cfg = tiny()
    train(cfg, str(tmp_path / "whole"), progress=False)
    import importlib
    train_module = importlib.import_module("llcfast.pipeline.training")
    real_step, real_update = train_module._train_step, torch.optim.AdamW.step
    state = {"armed": False}

    def interrupt(where):
        if state["armed"] and where == point:
            state["armed"] = False
            os.kill(os.getpid(), signal.SIGINT)

    def step(model, opt, loss_fn, batch):
        state["armed"] = state.get("count", 0) == 17
        state["count"] = state.get("count", 0) + 1
        interrupt("before the step")

        def loss(m, b):
            out = loss_fn(m, b)
            interrupt("after the forward")
            return out
        value = real_step(model, opt, loss, batch)
        interrupt("after the step")
        return value

    def update(self, *a, **k):
        interrupt("inside the optimizer, before its update")
        out = real_update(self, *a, **k)
        interrupt("inside the optimizer, after its update")
        return out

    # Ctrl-C as a terminal delivers it (a job started in the background inherits SIGINT ignored)
    monkeypatch.setattr(train_module, "_train_step", step)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    monkeypatch.setattr(torch.optim.AdamW, "step", update)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, str(tmp_path / "split"), progress=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    train(cfg, str(tmp_path / "split"), progress=False)
    whole, split = _final_weights(tmp_path / "whole"), _final_weights(tmp_path / "split")
    assert len(whole) == len(split)
    for a, b in zip(whole, split):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_sweep_with_unloadable_checkpoints_exits_non_zero_naming_them(tmp_path, capsys):
    from llcfast.cli import main
    run = str(tmp_path / "run")
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(tiny(steps=10).to_dict()))
    assert main(["train", "--config", str(cfg_path), "--out", run, "--quiet"]) == 0
    manifest = read_manifest(run)
    broken = manifest["checkpoints"][1]
    with open(os.path.join(run, broken["file"]), "wb") as f:
        f.write(b"not a checkpoint")
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match="could not be loaded"):
        assert main(["sweep", run, "--quiet", "--draws", "4"]) == 1
    err = capsys.readouterr().err
    assert "1 checkpoint(s) could not be measured" in err and f"step {broken['step']} ({broken['file']})" in err


def test_a_locked_run_folder_is_one_line_from_the_command_line_and_a_traceback_with_debug(tmp_path, capsys):
    from llcfast.cli import main
    run = str(tmp_path / "run")
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(tiny(steps=4).to_dict()))
    assert main(["train", "--config", str(cfg_path), "--out", run, "--quiet"]) == 0
    capsys.readouterr()
    with run_lock(run, "train"):
        assert main(["sweep", run, "--quiet"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("llcfast sweep: error: ") and err.count("\n") == 1 and "in use by `llcfast train`" in err
        with pytest.raises(RunLocked):
            main(["--debug", "sweep", run, "--quiet"])
    (tmp_path / "run" / "manifest.json").write_text("{")
    assert main(["sweep", run, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "manifest.json: not valid JSON" in err


def test_a_truncated_resume_state_and_a_truncated_checkpoint_are_named_with_what_to_do(tmp_path, capsys):
    from llcfast.cli import main
    from llcfast.pipeline import load_checkpoint
    cfg = tiny(steps=40)
    run = tmp_path / "run"
    train(cfg, str(run), progress=False, stop_at=20)
    resume = run / "resume.pt"
    resume.write_bytes(resume.read_bytes()[:100])
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    capsys.readouterr()
    assert main(["train", "--config", str(cfg_path), "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resume.pt: cannot be resumed from" in err and "delete it" in err
    checkpoint = run / read_manifest(str(run))["checkpoints"][-1]["file"]
    checkpoint.write_bytes(checkpoint.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated or corrupt") as info:
        load_checkpoint(str(checkpoint), lambda: cfg.make_model())
    assert "weights_only=False" not in str(info.value)


def test_a_non_finite_loss_in_the_hessian_is_named_as_such():
    import llcfast
    from llc_models import mse
    model = torch.nn.Linear(2, 1)
    x = torch.randn(8, 2)
    with pytest.raises(ValueError, match="the loss is nan at these weights; its Hessian is not defined"):
        llcfast.hessian_trace(model, mse, [(x, torch.full((8,), float("nan")))], num_probes=2, progress=False)


def test_the_three_attacks_from_the_command_line_leave_outside_files_alone(tmp_path, capsys):
    """A run folder someone sent: results.jsonl linked to a shell rc file,
    results.csv linked to authorized_keys, a manifest step that climbs out
    of the folder. Each command stops with one line; nothing outside changes."""
    from llcfast.cli import main
    run = tmp_path / "run"
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(tiny(steps=4).to_dict()))
    assert main(["train", "--config", str(cfg_path), "--out", str(run), "--quiet"]) == 0
    rc, keys = tmp_path / "bashrc", tmp_path / "authorized_keys"
    rc.write_text("# rc\n")
    keys.write_text("ssh-ed25519 AAAA me\n")
    os.symlink(rc, run / "results.jsonl")
    capsys.readouterr()
    assert main(["sweep", str(run), "--quiet"]) == 2
    assert "results.jsonl is a symbolic link" in capsys.readouterr().err
    os.unlink(run / "results.jsonl")
    assert main(["sweep", str(run), "--quiet", "--draws", "3"]) == 0
    os.symlink(keys, run / "results.csv")
    capsys.readouterr()
    assert main(["report", str(run)]) == 2
    assert "results.csv is a symbolic link" in capsys.readouterr().err
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["checkpoints"][-1]["step"] = "9/../../../pwn_est"
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert main(["estimate", str(run)]) == 2  # the last checkpoint, whose step is the attack
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be an object with an integer 'step'" in err
    assert rc.read_text() == "# rc\n" and keys.read_text() == "ssh-ed25519 AAAA me\n"
    assert not list(tmp_path.glob("pwn_est*")) and not list(tmp_path.parent.glob("pwn_est*"))
