"""The paper models' two attention spellings: attention="sdpa" computes what
the matmul form does, through the LLC engine and the Hessian statistics."""
import numpy as np
import pytest
import torch

import llcfast
from llcfast.pipeline import models

pytestmark = [pytest.mark.filterwarnings("ignore:There is a performance drop"),
              pytest.mark.filterwarnings("ignore:the loader holds")]


def lm_and_batches():
    torch.manual_seed(0)
    model = models.AttentionOnlyLM(vocab=60, d_model=32, heads=4, context=32)
    return model, [(torch.randint(0, 60, (4, 17)),) for _ in range(3)]


def grads(model, loss_fn, batch):
    model.zero_grad()
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("which", ["lm", "lr"])
def test_sdpa_gives_the_matmul_loss_and_gradients(which):
    torch.manual_seed(0)
    if which == "lm":
        model, loss_fn = models.AttentionOnlyLM(vocab=60, d_model=32, heads=4, context=32), models.next_token_loss
        batch = (torch.randint(0, 60, (4, 17)),)
    else:
        model, loss_fn = models.InContextRegression(d_model=32, heads=4), models.regression_loss
        batch = (torch.randn(4, 16, 4), torch.randn(4, 16))
    loss, want = grads(model, loss_fn, batch)
    models.set_attention(model, "sdpa")
    loss_sdpa, got = grads(model, loss_fn, batch)
    torch.testing.assert_close(loss_sdpa, loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sdpa_in_the_engine_and_the_hessian():
    model, data = lm_and_batches()
    kw = dict(num_burnin=0, num_chains=3, num_draws=5, epsilon=1e-3, nbeta=20.0, gamma=100.0, seed=1, progress=False,
              backend="fast")
    matmul = llcfast.estimate_llc(model, data, models.next_token_loss, **kw)
    trace = llcfast.hessian_trace(model, models.next_token_loss, data[:1], num_probes=6)
    models.set_attention(model, "sdpa")
    sdpa = llcfast.estimate_llc(model, data, models.next_token_loss, **kw)
    trace_sdpa = llcfast.hessian_trace(model, models.next_token_loss, data[:1], num_probes=6)
    np.testing.assert_allclose(sdpa.loss_trace, matmul.loss_trace, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trace_sdpa.per_probe, trace.per_probe, rtol=1e-5)


def test_attention_is_checked():
    with pytest.raises(ValueError, match=r"attention must be one of \('matmul', 'sdpa'\), got 'flash'"):
        models.AttentionOnlyLM(vocab=10, d_model=8, heads=2, attention="flash")
    with pytest.raises(ValueError, match="attention must be one of"):
        models.set_attention(models.InContextRegression(), "einsum")
