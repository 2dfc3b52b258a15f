"""benchmarks/attention_path.py on a CPU: a Hugging Face GPT-2 keeps its
fused attention under each of the fast engine's transforms (plain autograd,
grad, vmap over chains), and the script says so for each."""
import os
import sys

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import attention_path  # noqa: E402


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_fused_attention_under_every_transform(capsys):
    attention_path.main(["--size", "tiny", "--device", "cpu", "--context", "32"])
    lines = capsys.readouterr().out.splitlines()
    assert "attention implementation 'sdpa'" in lines[0]
    runs = lines[1:]
    assert [r.split(":")[0].strip() for r in runs] == ["plain autograd", "torch.func.grad", "vmap(grad), 2 chains"]
    for r in runs:
        assert "_scaled_dot_product_flash_attention_for_cpu_backward" in r and "aten::softmax" not in r
