"""llcfast.pipeline.models.use_fused_gelu: Hugging Face's spelled-out tanh GELUs
(GPT-2's gelu_new, gelu_fast) become one-kernel TanhGELU modules, in place,
with the same outputs to rounding."""
import pytest
import torch
from torch import nn

from llcfast.pipeline.models import TanhGELU, use_fused_gelu

transformers = pytest.importorskip("transformers")


def tiny_gpt2(activation):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=3, n_head=2, bos_token_id=0,
                                     eos_token_id=0, activation_function=activation)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_fast"])
def test_spelled_gelus_become_one_kernel_with_the_same_outputs(activation):
    model = tiny_gpt2(activation)
    ids = torch.randint(0, 100, (2, 16))
    before = model(input_ids=ids).logits
    assert use_fused_gelu(model) == 3  # one a block
    assert all(isinstance(block.mlp.act, TanhGELU) for block in model.transformer.h)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    assert use_fused_gelu(model) == 0  # nothing left to replace


def test_other_activations_are_left_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.ReLU())
    assert use_fused_gelu(model) == 0 and isinstance(model[1], nn.GELU)
    assert use_fused_gelu(tiny_gpt2("gelu_pytorch_tanh")) == 0
