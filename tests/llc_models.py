"""Small models, data and exact answers shared by the estimate_llc tests."""
import socket

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from llcfast.pipeline.models import CausalSelfAttention


def mse(model, batch):
    x, y = batch
    return ((model(x).squeeze(-1) - y) ** 2).mean()


def token_loss(model, batch):
    tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def linear_problem(d, n=256, seed=0):
    """Least squares at its exact minimum: a regular model with d parameters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    w_star = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w_star[None].float())
    return model, [(x.float(), y.float())], x


def exact_sgld_llc(x, nbeta, gamma, eps):
    """What full-batch SGLD targets for L(w) - L(w*) = d^T S d, S = X^T X / n:
    the chain is Gaussian with per-eigenmode stationary variance
    eps / (1 - (1 - eps*a/2)^2), a = 2*nbeta*s + gamma (exact at this eps)."""
    s = torch.linalg.eigvalsh(x.T @ x / x.shape[0]).numpy()
    a = 2 * nbeta * s + gamma
    var = eps / (1 - (1 - eps * a / 2) ** 2)
    return float(nbeta * (s * var).sum())


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 1))


def regression_loader(n=64, batch_size=16, seed=0, **loader_kwargs):
    """A DataLoader makes new tensors on every pass, so the engine stacks the
    chains' batches instead of sharing one. In a fixed order unless
    ``loader_kwargs`` say otherwise (shuffle=True, generator=..., workers)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return DataLoader(TensorDataset(x, torch.sin(x.sum(-1))), batch_size=batch_size, **loader_kwargs)


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), CausalSelfAttention(d, heads)
        self.ln2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, h):
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=11, d=16, heads=2, layers=2, ctx=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(ctx, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.unembed = nn.Linear(d, vocab)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.unembed(h)


def token_loader(vocab=11, n=48, ctx=12, batch_size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randint(0, vocab, (n, ctx), generator=g)), batch_size=batch_size)


def tiny_gpt2(seed=0):
    """A randomly initialised GPT-2 from a config: nothing is downloaded."""
    transformers = __import__("pytest").importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def gpt2_chains(chains=2, n_layer=2, seed=0):
    """A tiny GPT-2 (SDPA attention) as the fast engine sees it: its config,
    its chain loss, its parameters stacked over chains with a little spread
    between them, and a batch of 3 x 16 tokens per chain."""
    transformers = __import__("pytest").importorskip("transformers")
    from llcfast.pipeline import models
    from llcfast.engine.functional import chain_loss
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=n_layer, n_head=2,
                                     attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loss = chain_loss(model, models.hf_next_token_loss, [n for n, _ in trained])
    params = tuple(p.detach().expand((chains,) + p.shape) + 0.01 * torch.randn((chains,) + p.shape)
                   for _, p in trained)
    return config, loss, params, torch.randint(0, 50, (chains, 3, 16))


def gpt2_folded_against_torch(kind):
    """gpt2_chains' batched loss and gradients with the chain fold of
    ``kind`` ("sdpa", "layer_norm", "linear") against torch's vmap of those
    calls, which must agree; returns (config, the calls folded by kind)."""
    from llcfast.fastpath import fold as chain_fold, token_loss as fused_loss
    from llcfast.engine.functional import vmapped_grads
    config, loss, params, batch = gpt2_chains()
    with chain_fold.folding(**{kind: set()}):
        want_g, want_loss = vmapped_grads(loss, 0)(params, batch)
    with fused_loss.first_order() as mode:
        got_g, got_loss = vmapped_grads(loss, 0)(params, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-5)
    return config, mode.calls


def gpt2_batches(n_batches=4, batch_size=4, ctx=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, 40, (batch_size, ctx), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


class TwoParam(nn.Module):
    """f(x) = a * b^k * x: singular at a = b = 0 (K = a^2 b^(2k))."""

    def __init__(self, k, a=0.0, b=0.0):
        super().__init__()
        self.k = k
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward(self, x):
        return self.a * self.b ** self.k * x


def orthogonal_noise_data(n, seed=0):
    """x and y with mean(x y) = 0 exactly, so for f = a b^k x every point with
    a b^k = 0 is a minimum of the empirical loss; L(a, b) = mean(y^2) +
    (a b^k)^2 mean(x^2) in closed form."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    y = 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    y = y - x * (x @ y) / (x @ x)
    return x, y


def deep_linear_at_rank(n, seed=0):
    """A 3-4-3 deep linear network fitted (L-BFGS, to its minimum) to data
    from a rank-1 3x3 map plus noise: a singular model whose learning
    coefficient is Aoyagi's 4.5 asymptotically. Returns (model, x, y)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    truth = torch.randn(3, 1, generator=g) @ torch.randn(1, 3, generator=g)
    y = x @ truth.T + 0.5 * torch.randn(n, 3, generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 3, bias=False))
    opt = torch.optim.LBFGS(model.parameters(), max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return model, x, y


def reduced_rank_at_zero(n, m=5, h=4, out=6, seed=0):
    """Reduced-rank regression m -> h -> out at B A = 0, made a minimum of the
    empirical loss exactly: the targets are noise with the inputs projected
    out (mean x y^T = 0). Its Hessian vanishes there. Returns (model, x, y)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m, generator=g, dtype=torch.float64)
    y = 0.5 * torch.randn(n, out, generator=g, dtype=torch.float64)
    y = y - x @ torch.linalg.lstsq(x, y).solution
    model = nn.Sequential(nn.Linear(m, h, bias=False), nn.Linear(h, out, bias=False))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model, x.float(), y.float()


def free_port() -> int:
    """A TCP port free on this machine now, for a test's torch.distributed group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
