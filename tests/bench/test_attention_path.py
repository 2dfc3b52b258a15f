"""benchmarks/attention_path.py on a CPU: a Hugging Face GPT-2 keeps its
fused attention under each of the fast engine's transforms (plain autograd,
grad, vmap over chains, the engine's folded pass), and the script says so
for each, with how many calls each took."""
import os
import sys

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import attention_path  # noqa: E402
from fastpaths import set_fastpath


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_fused_attention_under_every_transform(capsys, monkeypatch):
    set_fastpath(monkeypatch, attention={"cpu", "cuda"})  # as on CUDA
    attention_path.main(["--size", "tiny", "--device", "cpu", "--context", "32"])
    lines = capsys.readouterr().out.splitlines()
    assert "attention implementation 'sdpa'" in lines[0]
    runs = lines[1:]
    assert [r.split(":")[0].strip() for r in runs] == ["plain autograd", "torch.func.grad", "vmap(grad), 2 chains",
                                                       "engine's pass, 2 chains"]
    backward = "aten::_scaled_dot_product_flash_attention_for_cpu_backward x"
    layers = attention_path.SIZES["tiny"]["n_layer"]
    counts = []
    for r in runs:
        assert backward in r and "aten::softmax" not in r
        counts.append(int(r.split(backward)[1].split("'")[0]))
    # Once a layer, except under torch's vmap, which runs it once a chain (the profiler also counts the batched
    # call that falls back); the engine's pass folds the chains into one call.
    assert counts[:2] == [layers, layers] and counts[2] >= 2 * layers and counts[3] == layers
