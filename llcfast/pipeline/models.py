"""The paper's two transformers (docs/paper.md) and their losses.

Attention is written with matmuls by default, which vmap batches over chains
everywhere; ``attention="sdpa"`` uses the fused kernels instead (see
CausalSelfAttention).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..fastpath import settings
from ..twins.losses import token_nll
from .fused_losses import hf_next_token_loss_fast, next_token_loss_fast
from .tasks import sample_regression
from .token_batches import inputs_and_targets

__all__ = ["AttentionOnlyLM", "Block", "CausalSelfAttention", "InContextRegression", "TanhGELU", "count_parameters",
           "next_token_loss", "regression_loss", "sample_regression", "set_attention", "use_fused_gelu"]


ATTENTION = ("matmul", "sdpa")


class CausalSelfAttention(nn.Module):
    """``attention="matmul"`` spells softmax(q k^T / sqrt(e) + mask) v out in
    matmuls, which vmap batches over chains on any device. ``"sdpa"`` calls
    scaled_dot_product_attention, whose fused kernels never write the T x T
    scores. torch's vmap batches their forward over chains (on CUDA) but runs
    their backward chain by chain; the fast engine's pass folds the chains
    into one call each way instead (llcfast.fastpath.attention). The Hessian
    passes run SDPA on its math backend (engine/hvp.py)."""

    def __init__(self, d_model: int, heads: int, attention: str = "matmul"):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        self.heads = heads
        self.attention = check_attention(attention)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        b, t, d = h.shape
        q, k, v = self._heads(h)
        if self.attention == "sdpa":
            mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mixed = self._weights(q, k) @ v
        return self.out(mixed.transpose(1, 2).reshape(b, t, d))

    def pattern(self, h: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, T]
        """The attention weights this layer applies to ``h`` (its input):
        row i is query position i's distribution over key positions."""
        q, k, _ = self._heads(h)
        return self._weights(q, k)

    def _heads(self, h: torch.Tensor):  # [B, T, D] -> 3 x [B, H, T, E]
        # Heads-major [B, H, T, E] operands make the T x T scores a contiguous
        # matmul output, so no pass copies them (einsum's layout cost a copy
        # of every T x T tensor under vmap).
        b, t, d = h.shape
        return self.qkv(h).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    @staticmethod
    def _weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # [B, H, T, E] x 2 -> [B, H, T, T]
        # The scale goes on q, not on the T x T scores. An additive fp32 mask
        # rather than masked_fill: the same softmax (the masked scores are -inf
        # either way), but its backward passes the gradient through instead of
        # filling another T x T tensor, and under bf16 autocast the sum is the
        # fp32 copy softmax needs.
        t, e = q.shape[-2], q.shape[-1]
        scores = (q * (1.0 / math.sqrt(e))) @ k.transpose(-1, -2)
        future = torch.full((t, t), float("-inf"), device=q.device).triu(1)
        return (scores + future).softmax(-1)


def check_attention(attention: str) -> str:
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    return attention


def set_attention(model: nn.Module, attention: str) -> nn.Module:
    """Switches every CausalSelfAttention in ``model`` to ``attention`` (same
    weights); returns the model."""
    check_attention(attention)
    for m in model.modules():
        if isinstance(m, CausalSelfAttention):
            m.attention = attention
    return model


class Block(nn.Module):
    """Pre-LayerNorm residual block; ``mlp_width=0`` makes it attention-only."""

    def __init__(self, d_model: int, heads: int, mlp_width: int, attention: str = "matmul"):
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, attention)
        self.mlp = None
        if mlp_width:
            self.ln_mlp = nn.LayerNorm(d_model)
            self.mlp = nn.Sequential(nn.Linear(d_model, mlp_width), nn.ReLU(), nn.Linear(mlp_width, d_model))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.ln_attn(h))
        if self.mlp is not None:
            h = h + self.mlp(self.ln_mlp(h))
        return h


class InContextRegression(nn.Module):
    """The LR model: tokens x_1, y_1, ..., x_K, y_K as (D+1)-vectors; the
    output at each x_k token predicts y_k."""

    def __init__(self, task_dim: int = 4, max_pairs: int = 16, d_model: int = 64, heads: int = 4, layers: int = 2,
                 mlp_width: int = 64, attention: str = "matmul"):
        super().__init__()
        self.task_dim = task_dim
        self.embed = nn.Linear(task_dim + 1, d_model)
        self.pos = nn.Embedding(2 * max_pairs, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, mlp_width, attention) for _ in range(layers))
        self.ln_out = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, 1)

    def forward(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:  # [B, K, D], [B, K] -> [B, K]
        b, k, d = xs.shape
        x_tok = torch.cat([xs.new_zeros(b, k, 1), xs], dim=-1)
        y_tok = torch.cat([ys[..., None], xs.new_zeros(b, k, d)], dim=-1)
        tokens = torch.stack([x_tok, y_tok], dim=2).reshape(b, 2 * k, d + 1)
        h = self.embed(tokens) + self.pos.weight[: 2 * k]
        for block in self.blocks:
            h = block(h)
        return self.unembed(self.ln_out(h))[:, 0::2, 0]


def regression_loss(model: nn.Module, batch) -> torch.Tensor:
    xs, ys = batch
    return ((model(xs, ys) - ys) ** 2).mean()


class AttentionOnlyLM(nn.Module):
    """The LM model: attention-only transformer with LayerNorm and a learned
    positional embedding added to the residual stream."""
    logits_are_unembedded_hidden = True  # forward is unembed(hidden(x)): the fused head may serve it

    def __init__(self, vocab: int = 5000, d_model: int = 256, heads: int = 8, layers: int = 2, context: int = 1024,
                 attention: str = "matmul"):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, 0, attention) for _ in range(layers))
        self.ln_out = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, vocab]
        return self.unembed(self.hidden(tokens))

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, D]
        """The residual stream after the final LayerNorm, which the
        unembedding maps to logits."""
        h = self.embed(tokens) + self.pos.weight[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.ln_out(h)


def next_token_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy of each next token (F.cross_entropy's numbers).
    The fast engine runs it as pipeline/fused_losses.py writes it, which
    the fast paths can serve."""
    inputs, targets = inputs_and_targets(batch)
    return token_nll(model(inputs), targets).mean()


def hf_next_token_loss(model: nn.Module, batch) -> torch.Tensor:
    """next_token_loss for a Hugging Face causal LM: the mean cross-entropy
    of each next token of ``input_ids``, the number the model's own
    ``.loss`` gives with those labels. The batch is the token ids [B, T]
    (alone, first of a tuple, or a dict's "input_ids" with optional
    "labels": -100 masks and attention masks need the model's own
    ``.loss``). The fast engine runs it as pipeline/fused_losses.py writes
    it, which the fast paths can serve."""
    inputs, targets = inputs_and_targets(batch)
    return token_nll(model(input_ids=inputs).logits, targets).mean()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class TanhGELU(nn.Module):
    """The tanh approximation of GELU as one torch kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


# Hugging Face's modules that spell 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in elementwise torch ops
# (GPT-2's "gelu_new", and "gelu_fast", the same polynomial factored).
SPELLED_TANH_GELUS = ("NewGELUActivation", "FastGELUActivation")


def use_fused_gelu(model: nn.Module) -> int:
    """Replaces, in place, every activation module of ``model`` that spells
    the tanh approximation of GELU in elementwise ops (Hugging Face GPT-2's
    ``gelu_new``) by :class:`TanhGELU`, the same function in one kernel, and
    returns how many it replaced. Under the fast engine each spelled op is a
    pass over the MLP's activations forward and backward, in fp32 under bf16
    autocast: on the traffic model of GPT-2 124M's step they double the time
    and nearly double the activations saved (benchmarks/traffic_large.py).
    Outputs agree to rounding."""
    swaps = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if type(child).__name__ in SPELLED_TANH_GELUS]
    for parent, name in swaps:
        setattr(parent, name, TanhGELU())
    return len(swaps)


# The fast engine calls these losses in the forms the fast paths can serve (fastpath/settings.py's seam)
settings.register_substitute(next_token_loss, next_token_loss_fast)
settings.register_substitute(hf_next_token_loss, hf_next_token_loss_fast)
