"""The models' next-token losses written for the fast paths. models.py
declares them to the fast-path seam as its plain losses' fast forms
(llcfast.fastpath.settings), so the fast engine calls these where a caller
passes the plain ones. A model whose logits are ``unembed(hidden(x))`` says
so with ``logits_are_unembedded_hidden = True``.

Where the fast paths are off, or outside the engine's first-order pass,
each is the plain loss: the fused head falls back to the composed form and
the token loss to its pure-torch twin.
"""
from __future__ import annotations

import torch
from torch import nn

from ..fastpath.head import linear_token_nll_mean
from ..fastpath.token_loss import token_nll
from .token_batches import inputs_and_targets


def next_token_loss_fast(model: nn.Module, batch) -> torch.Tensor:
    """next_token_loss, with the LM's unembedding and loss as one fused
    function whose logits, the LM's largest tensors, are never kept
    (fastpath.head), and another model's loss as one kernel each way over
    its logits (fastpath.token_loss)."""
    inputs, targets = inputs_and_targets(batch)
    if getattr(model, "logits_are_unembedded_hidden", False):
        return linear_token_nll_mean(model.hidden(inputs), model.unembed.weight, model.unembed.bias, targets)
    return token_nll(model(inputs), targets).mean()


def hf_next_token_loss_fast(model: nn.Module, batch) -> torch.Tensor:
    """hf_next_token_loss, with GPT-2's unembedding and loss as one fused
    function and other models' loss as one kernel each way."""
    inputs, targets = inputs_and_targets(batch)
    if _plain_gpt2_head(model):
        hidden = model.transformer(input_ids=inputs).last_hidden_state
        return linear_token_nll_mean(hidden, model.lm_head.weight, model.lm_head.bias, targets)
    return token_nll(model(input_ids=inputs).logits, targets).mean()


def _plain_gpt2_head(model: nn.Module) -> bool:
    """Whether ``model`` is Hugging Face's GPT2LMHeadModel, whose logits are
    lm_head (a bias-free linear layer) of its transformer's last hidden
    state and nothing more."""
    return (type(model).__name__ == "GPT2LMHeadModel" and isinstance(getattr(model, "lm_head", None), nn.Linear)
            and hasattr(model, "transformer"))
