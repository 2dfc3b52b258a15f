"""benchmarks/bench_large.py on a CPU with a tiny GPT-2: the row it writes,
llcfast's own warnings kept in it, and devinterp running out of memory
recorded in the row instead of ending the benchmark."""
import json
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import bench_large  # noqa: E402
from llcfast.fastpath import settings  # noqa: E402

ARGS = ["--sizes", "tiny", "--device", "cpu", "--draws", "2", "--context", "32", "--batch", "2"]


def test_a_row_per_size_with_the_plan_and_llcfasts_warnings(tmp_path):
    out = tmp_path / "large.json"
    bench_large.main(ARGS + ["--skip-devinterp", "--out", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    assert row["size"] == "tiny" and row["batch"] == 2 and row["draws"] == 2 and row["ms_per_chain_step"] > 0
    assert isinstance(row["llcfast_warnings"], list) and "speedup_vs_devinterp" not in row
    assert row["activation"] == "gelu_pytorch_tanh"  # GPT-2's GELU as one kernel (bench_large.ACTIVATIONS)


def test_either_gelu_is_the_same_function():
    pytest.importorskip("transformers")
    fused, spelled = (bench_large.gpt2("tiny", 16, a) for a in ("gelu_pytorch_tanh", "gelu_new"))
    ids = torch.randint(0, 50257, (2, 16))
    torch.testing.assert_close(fused(input_ids=ids).logits, spelled(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_devinterp_out_of_memory_is_recorded(tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(bench_large, "run_devinterp", out_of_memory)
    out = tmp_path / "large.json"
    bench_large.main(ARGS + ["--out", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    assert row["devinterp_error"] == "out of memory: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert "speedup_vs_devinterp" not in row and "devinterp ran out of memory" in capsys.readouterr().out


def test_no_fold_is_recorded_and_undone(tmp_path, fold_as_on_cuda):
    folds = []
    for extra in ([], ["--no-norm-fold"], ["--no-linear-fold"], ["--no-head-fusion"], ["--no-fold"], ["--hf-loss"]):
        out = tmp_path / "large.json"
        bench_large.main(ARGS + ["--skip-devinterp", "--out", str(out)] + extra)
        row = json.loads(out.read_text())["rows"][0]
        folds.append((row["attention_fold"], row["layer_norm_fold"], row["linear_fold"], row["head_fusion"],
                      row["loss"]))
        after = settings.current()  # the benchmark's variants are undone
        assert after.attention == after.layer_norm == after.linear == after.head == ("cpu", "cuda")
    ours, own = "hf_next_token_loss", "model's .loss"
    assert folds == [(True, True, True, True, ours), (True, False, True, True, ours), (True, True, False, True, ours),
                     (True, True, True, False, ours), (False, False, False, False, ours),
                     (True, True, True, False, own)]
