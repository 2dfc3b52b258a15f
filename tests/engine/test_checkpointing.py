"""Activation checkpointing (estimate_llc(activation_checkpointing=...)):
the chosen blocks recompute their forward pass during the backward pass, the
chains walk the same trajectory as without it, the user's model is left as
it was, and bad choices are named."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import llcfast
from llcfast.engine import checkpointing
from llc_models import TinyTransformer, gpt2_batches, mlp, mse, regression_loader, tiny_gpt2, token_loader, token_loss

KW = dict(num_burnin=0, num_chains=3, num_draws=6, epsilon=1e-3, gamma=100.0, nbeta=20.0, seed=4, progress=False)


def test_same_trajectory_as_without_and_the_modules_are_recorded():
    model = TinyTransformer()
    plain = llcfast.estimate_llc(model, token_loader(), token_loss, **KW)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="llcfast: this model cannot be batched")  # asked for: no warning
        ckpt = llcfast.estimate_llc(model, token_loader(), token_loss, activation_checkpointing=True, **KW)
    assert ckpt.config["activation_checkpointing"] == ["blocks.0", "blocks.1"]
    assert ckpt.config["backend"] == "fast-sequential" and plain.config["backend"] == "fast"
    np.testing.assert_allclose(ckpt.loss_trace, plain.loss_trace, rtol=2e-5, atol=1e-6)
    ref = llcfast.estimate_llc(model, token_loader(), token_loss, backend="reference",
                               activation_checkpointing=["blocks.1"], **KW)
    assert ref.config["activation_checkpointing"] == ["blocks.1"]
    np.testing.assert_allclose(ref.loss_trace, plain.loss_trace, rtol=2e-5, atol=1e-6)
    assert type(model.blocks[0]).__name__ == "Block"  # the user's model is left as it was


class Counting(nn.Module):
    calls = 0

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x):
        Counting.calls += 1
        return torch.tanh(self.lin(x))


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Counting(), Counting()])
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@pytest.mark.parametrize("spec,per_step,backend", [
    (False, 2, "reference"), (True, 4, "reference"), (["layers.1"], 3, "reference"),
    (True, 4, "auto"), (["layers.1"], 3, "auto"),  # checkpointed: the fast engine runs chain by chain too
])
def test_checkpointed_blocks_run_their_forward_again_in_the_backward_pass(spec, per_step, backend):
    torch.manual_seed(0)
    model = Stack()
    loader = regression_loader(n=16, batch_size=16)
    kw = dict(KW, num_chains=2, num_draws=5, num_init_batches=1)
    Counting.calls = 0
    llcfast.estimate_llc(model, loader, mse, activation_checkpointing=spec, backend=backend, trust_checks=False,
                         **kw)
    init = 4  # the differentiability check's and the init loss's forward passes, no backward: nothing recomputed
    assert Counting.calls == init + kw["num_chains"] * kw["num_draws"] * per_step


def test_resolve_picks_the_largest_module_list_and_outermost_matches():
    model = TinyTransformer(layers=3)
    assert checkpointing.resolve(model, True) == ["blocks.0", "blocks.1", "blocks.2"]
    assert checkpointing.resolve(model, "blocks.*") == ["blocks.0", "blocks.1", "blocks.2"]  # not their insides
    assert checkpointing.resolve(model, ["blocks.1.attn", "unembed"]) == ["blocks.1.attn", "unembed"]


def test_gpt2_blocks_are_found_and_the_trajectory_kept():
    model = tiny_gpt2()
    assert checkpointing.resolve(model, True) == ["transformer.h.0", "transformer.h.1"]
    kw = dict(KW, num_draws=4)
    plain = llcfast.estimate_llc(model, gpt2_batches(), backend="reference", **kw)
    ckpt = llcfast.estimate_llc(model, gpt2_batches(), activation_checkpointing=True, **kw)
    np.testing.assert_allclose(ckpt.loss_trace, plain.loss_trace, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("spec,exc,match", [
    (True, ValueError, "has none; pass the names of the modules"),
    ("encoder.*", ValueError, r"matches no submodule; module names look like \['0', '1', '2'\]"),
    (3, TypeError, "activation_checkpointing must be True, False, a module-name glob"),
    ([], TypeError, "activation_checkpointing must be"),
])
def test_bad_choices_are_named(spec, exc, match):
    with pytest.raises(exc, match=match):
        llcfast.estimate_llc(mlp(), regression_loader(), mse, activation_checkpointing=spec, **KW)
