"""`llcfast import`: a folder of Hugging Face checkpoints trained elsewhere,
with its token file, becomes a run that estimate, sweep and report take."""
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from llcfast.cli import main
from llcfast.pipeline.models import hf_next_token_loss
from llcfast.pipeline.checkpoints import load_checkpoint, read_manifest
from llcfast.pipeline.config import RunConfig

transformers = pytest.importorskip("transformers")
VOCAB, POSITIONS = 40, 16
SMALL = ["--llc-sequences", "16", "--llc-batch-size", "4", "--eval-sequences", "8", "--chains", "2", "--draws", "4",
         "--epsilon", "1e-4", "--gamma", "100", "--nbeta", "10", "--init-batches", "all"]


def _tokens(n=6000, seed=0):
    """A bigram chain (each token mostly followed by the next id), so training lowers the loss."""
    g = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.uint16)
    out[0] = 0
    for i in range(1, n):
        out[i] = (out[i - 1] + 1) % VOCAB if g.random() < 0.8 else g.integers(VOCAB)
    return out

# What the first test's import, sweep and report leave beside the checkpoints
NOT_CHECKPOINTS = ("manifest.json", "results.jsonl", "estimates", "report*", "summary.json", "results.csv")


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """Three checkpoints of a tiny GPT-2 trained on the token file, named as HF Trainer names them."""
    root = tmp_path_factory.mktemp("hf")
    tokens = _tokens()
    np.save(root / "tokens.npy", tokens)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=POSITIONS, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rows = torch.from_numpy(np.lib.stride_tricks.sliding_window_view(tokens[:5000].astype(np.int64),
                                                                     POSITIONS + 1)[::7].copy())
    run = root / "run"
    for step in range(41):
        if step % 20 == 0:
            model.save_pretrained(run / f"checkpoint-{step}")
        batch = rows[torch.randint(len(rows), (16,))]
        opt.zero_grad()
        hf_next_token_loss(model, batch).backward()
        opt.step()
    return str(run), str(root / "tokens.npy")


def test_import_then_estimate_sweep_and_report(hf_run, capsys):
    run, tokens = hf_run
    assert main(["import", run, "--tokens", tokens, *SMALL]) == 0
    out = capsys.readouterr().out
    assert "3 checkpoints (steps 0 to 40), sequences of 16 tokens" in out and f"llcfast estimate {run}" in out
    cfg = RunConfig.from_dict(read_manifest(run)["config"])
    assert cfg.model == "hf" and cfg.task_args["vocab"] == VOCAB and not cfg.sweep.behaviour

    assert main(["sweep", run, "--device", "cpu", "--quiet"]) == 0
    records = [json.loads(line) for line in open(os.path.join(run, "results.jsonl"))]
    assert [r["step"] for r in records] == [0, 20, 40]
    assert all(np.isfinite(r["llc_mean"]) and "behaviour" not in r for r in records)
    # Training on the bigram chain lowered the held-out loss: the checkpoints and the token file belong together.
    assert records[0]["test_loss"] > records[-1]["test_loss"] + 0.2
    assert records[0]["test_loss"] == pytest.approx(np.log(VOCAB), abs=0.3)

    assert main(["estimate", run, "--step", "20", "--quiet"]) == 0
    est = json.load(open(os.path.join(run, "estimates", "estimate_step20.json")))
    assert est["llc_mean"] == records[1]["llc_mean"]  # the sweep's number, bit for bit

    assert main(["report", run]) == 0
    assert os.path.isfile(os.path.join(run, "report.png"))


def test_loaded_checkpoints_are_fp32_in_eval_mode_and_quiet(hf_run, capfd):
    from transformers.utils import logging as hf_logging
    assert hf_logging.is_progress_bar_enabled()
    model = load_checkpoint(os.path.join(hf_run[0], "checkpoint-20"))
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert "Loading weights" not in capfd.readouterr().err  # no bar of transformers' own under the sweep's
    assert hf_logging.is_progress_bar_enabled()  # the user's setting is left as it was


def test_reimport_picks_up_new_checkpoints_and_keeps_settings_and_data(hf_run, tmp_path, capsys):
    import shutil
    run = str(tmp_path / "run")
    shutil.copytree(hf_run[0], run, ignore=shutil.ignore_patterns("checkpoint-40", *NOT_CHECKPOINTS))
    assert main(["import", run, "--tokens", hf_run[1], "--context", "12", *SMALL]) == 0
    assert [c["step"] for c in read_manifest(run)["checkpoints"]] == [0, 20]
    first = RunConfig.from_dict(read_manifest(run)["config"])
    assert main(["sweep", run, "--device", "cpu", "--quiet"]) == 0
    shutil.copytree(os.path.join(hf_run[0], "checkpoint-40"), os.path.join(run, "step_40"))
    assert main(["import", run, "--tokens", hf_run[1]]) == 0  # no options: the first import's stand
    assert [(c["step"], c["file"]) for c in read_manifest(run)["checkpoints"]] == [
        (0, "checkpoint-0"), (20, "checkpoint-20"), (40, "step_40")]
    assert RunConfig.from_dict(read_manifest(run)["config"]) == first
    assert main(["import", run, "--tokens", hf_run[1], "--draws", "6"]) == 0
    again = RunConfig.from_dict(read_manifest(run)["config"])
    assert again.sweep == replace(first.sweep, num_draws=6) and again.task_args == first.task_args
    _fails(["import", run, "--tokens", hf_run[1], "--context", "16"], capsys, "holds results measured on other data")


def _fails(argv, capsys, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"llcfast {argv[0]}: error: " in err and message in err, err


def test_bad_runs_and_token_files_are_named(hf_run, tmp_path, capsys):
    run, tokens = hf_run
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "checkpoint-5").mkdir()
    _fails(["import", str(tmp_path / "empty"), "--tokens", tokens], capsys,
           "holds no Hugging Face checkpoint folders (1 such folders lack config.json)")
    big = tmp_path / "big.npy"
    np.save(big, np.array([0, VOCAB] * 1000, dtype=np.uint16))
    _fails(["import", run, "--tokens", str(big)], capsys,
           f"holds token id {VOCAB}, but the model's vocabulary has {VOCAB} ids")
    _fails(["import", run, "--tokens", tokens, "--context", "64"], capsys,
           "context 64 exceeds the model's 16 positions")
    _fails(["import", run, "--tokens", str(tmp_path / "none.npy")], capsys, "token file")
    _fails(["import", run, "--tokens", tokens, "--llc-sequences", "4", "--llc-batch-size", "8"], capsys,
           "sweep.llc_batch_size (8) must be <= sweep.llc_sequences (4)")


def test_an_llcfast_run_is_not_overwritten_and_an_imported_one_not_trained(hf_run, tmp_path, capsys):
    import shutil
    run = str(tmp_path / "run")
    shutil.copytree(hf_run[0], run, ignore=shutil.ignore_patterns(*NOT_CHECKPOINTS))
    with open(os.path.join(run, "manifest.json"), "w") as f:
        json.dump({"config": {"task": "regression"}, "checkpoints": []}, f)
    _fails(["import", run, "--tokens", hf_run[1]], capsys, "already holds an llcfast training run")
    os.remove(os.path.join(run, "manifest.json"))
    assert main(["import", run, "--tokens", hf_run[1], *SMALL]) == 0
    config = tmp_path / "c.json"
    config.write_text(json.dumps(read_manifest(run)["config"]))
    _fails(["train", "--config", str(config), "--out", str(tmp_path / "t"), "--quiet"], capsys,
           "llcfast trains its own models only")
