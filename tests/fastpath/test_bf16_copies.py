"""bf16 working copies of the weights (llcfast.fastpath.bf16_copies): which
weights get one, and that the engine's numbers with them are the numbers
without them, bit for bit (CPU autocast casts matmul operands to bf16 as
CUDA's does)."""
import numpy as np
import pytest
import torch
from torch import nn

from llcfast.fastpath import settings
import llcfast
from conftest import requires_extension
from llcfast.pipeline import models
from llcfast.fastpath import bf16_copies
from llcfast.engine.functional import chain_loss
from llcfast.fastpath.token_loss import first_order


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0)).eval()


class Reuse(nn.Module):
    """Weights used in other ways than one cast: twice, a cast and a sum, an
    in-place update; and one cast through a transposed view."""

    def __init__(self):
        super().__init__()
        self.twice = nn.Parameter(torch.randn(4, 4))
        self.summed = nn.Parameter(torch.randn(4, 4))
        self.viewed = nn.Parameter(torch.randn(4, 4))
        self.once = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        h = x @ self.twice @ self.twice
        h = h @ self.summed + self.summed.sum()
        h = h @ self.viewed.t()
        return (h @ self.once).float().pow(2).mean()


def copied(model, loss_fn, batch):
    named = list(model.named_parameters())
    loss = chain_loss(model, loss_fn, [n for n, _ in named])
    with torch.autocast("cpu", dtype=torch.bfloat16), first_order():
        use = bf16_copies.cast_only(loss, [p for _, p in named], batch)
    return {n for (n, _), u in zip(named, use) if u}


def test_the_weights_that_get_copies():
    lm = models.AttentionOnlyLM(vocab=40, d_model=16, heads=2, context=32, layers=2)
    got = copied(lm, models.next_token_loss, torch.randint(0, 40, (2, 9)))
    # the matmuls' weights and biases; not the embeddings (read as float32) nor the layer norms
    assert got == {f"blocks.{i}.attn.{m}.{k}" for i in range(2) for m in ("qkv", "out") for k in ("weight", "bias")} \
        | {"unembed.weight", "unembed.bias"}
    got = copied(tiny_gpt2(), models.hf_next_token_loss, torch.randint(0, 40, (2, 9)))
    # Conv1D's addmm operands; not the token embedding, which the tied head also reads
    assert got == {f"transformer.h.{i}.{m}.{k}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                            "mlp.c_proj") for k in ("weight", "bias")}
    assert copied(Reuse(), lambda m, x: m(x), torch.randn(3, 4)) == {"viewed", "once"}


def trajectory(model, loader, loss_fn, on, **kwargs):
    """estimate_llc's result and every chain's final weights, with the copies
    on or off."""
    last = {}

    def keep(step, chains, loss, params):
        last.update({n: p.clone() for n, p in params.items()})

    with settings.using(settings.current().replace(bf16_copies=("cpu",) if on else ())):
        res = llcfast.estimate_llc(model, loader, loss_fn, callbacks=[keep], **dict(dict(num_burnin=0, 
            num_chains=3, num_draws=5, nbeta=5.0, epsilon=1e-3, progress=False, backend="fast", seed=3,
            precision="bf16"), **kwargs))
    return res, last


CASES = {
    "lr": lambda: (models.InContextRegression(task_dim=3, max_pairs=4, d_model=16, heads=2, layers=2, mlp_width=16),
                   models.regression_loss, "lr"),
    "lm": lambda: (models.AttentionOnlyLM(vocab=40, d_model=16, heads=2, context=32, layers=2),
                   models.next_token_loss, "tokens"),
    "gpt2": lambda: (tiny_gpt2(), models.hf_next_token_loss, "tokens"),
}


def loader_for(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "tokens":
        return [torch.randint(0, 40, (3, 17), generator=g) for _ in range(4)]
    return [(torch.randn(3, 4, 3, generator=g), torch.randn(3, 4, generator=g)) for _ in range(4)]


@requires_extension
@pytest.mark.filterwarnings("ignore:the loader holds")
@pytest.mark.filterwarnings("ignore:the LLC estimate is negative")
@pytest.mark.parametrize("as_on_cuda", [False, True], ids=["cpu-pass", "cuda-pass"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("extra", [{}, dict(restrict=["*.weight"])], ids=["all", "restricted"])
def test_the_numbers_are_those_without_copies(request, case, as_on_cuda, extra):
    if as_on_cuda:  # the folds and the fused head, as the pass runs on CUDA
        request.getfixturevalue("fold_as_on_cuda")
    model, loss_fn, kind = CASES[case]()
    loader = loader_for(kind)
    (with_copies, last), (without, last_without) = (trajectory(model, loader, loss_fn, on, **extra)
                                                    for on in (True, False))
    assert with_copies.config["bf16_copies"]["tensors"] > 0 and "bf16_copies" not in without.config
    assert np.array_equal(with_copies.loss_trace, without.loss_trace)
    assert with_copies.llc_mean == without.llc_mean
    assert all(torch.equal(last[n], last_without[n]) for n in last)
    for key in ("grad_norm_sq_mean", "distance_sq_mean", "noise_norm_sq_mean"):  # the step's stats
        assert np.array_equal(with_copies.diagnostics[key], without.diagnostics[key])


@requires_extension
@pytest.mark.filterwarnings("ignore:the loader holds")
@pytest.mark.filterwarnings("ignore:the LLC estimate is negative")
@pytest.mark.parametrize("extra", [dict(precision="fp32"), dict(sampler="rmsprop_sgld"), dict(grad_accum_steps=2),
                                   dict(mala=True), dict(compile=True)],
                         ids=["fp32", "rmsprop", "accumulated", "mala", "compiled"])
def test_where_no_copies_are_made(monkeypatch, extra):
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the compiled pass's choice, without compiling
    model, loss_fn, kind = CASES["lm"]()
    res, _ = trajectory(model, loader_for(kind), loss_fn, True, **extra)
    assert "bf16_copies" not in res.config
