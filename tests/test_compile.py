"""estimate_llc(compile=True): the batched pass through torch.compile walks
the same trajectory as the eager pass; a model torch.compile fails on runs
eagerly after one warning; the option is checked."""
import numpy as np
import pytest
import torch

import llcfast
from llc_models import mlp, mse, regression_loader

KW = dict(num_chains=3, num_draws=6, epsilon=1e-3, gamma=100.0, nbeta=20.0, seed=2, progress=False,
          num_init_batches=1)
pytestmark = pytest.mark.filterwarnings("ignore:the loader holds")


def test_compiled_pass_walks_the_eager_trajectory():
    eager = llcfast.estimate_llc(mlp(), regression_loader(), mse, **KW)
    compiled = llcfast.estimate_llc(mlp(), regression_loader(), mse, compile=True, **KW)
    assert compiled.config["compile"] is True and "compile" not in eager.config
    np.testing.assert_allclose(compiled.loss_trace, eager.loss_trace, rtol=1e-5, atol=1e-7)


def test_a_model_that_does_not_compile_runs_eagerly_with_a_warning(monkeypatch):
    def broken(fn, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("backend compiler failed\nlong traceback")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    eager = llcfast.estimate_llc(mlp(), regression_loader(), mse, **KW)
    with pytest.warns(RuntimeWarning, match="torch.compile could not compile .* backend compiler failed"):
        res = llcfast.estimate_llc(mlp(), regression_loader(), mse, compile=True, **KW)
    assert res.config["compile"] is False
    np.testing.assert_allclose(res.loss_trace, eager.loss_trace)


def test_compiled_code_giving_nan_gradients_is_dropped_for_the_eager_pass(monkeypatch):
    """As Inductor's CPU code did for bf16 autocast on the paper's LR model
    (torch 2.14): NaN gradients for some chains, a finite loss."""
    def wrong(fn, *args, **kwargs):
        def run(*a, **k):
            grads, losses = fn(*a, **k)
            grads = [g.clone() for g in grads]
            grads[0][0].fill_(float("nan"))
            return grads, losses
        return run

    monkeypatch.setattr(torch, "compile", wrong)
    eager = llcfast.estimate_llc(mlp(), regression_loader(), mse, **KW)
    with pytest.warns(RuntimeWarning, match="non-finite losses or gradients where the eager pass gave finite"):
        res = llcfast.estimate_llc(mlp(), regression_loader(), mse, compile=True, **KW)
    assert res.config["compile"] is False and not res.diagnostics.get("diverged_chains")
    np.testing.assert_allclose(res.loss_trace, eager.loss_trace)


@pytest.mark.parametrize("bad", ["yes", "reduce-overhead", 1])
def test_compile_takes_a_bool_or_a_mode_llcfast_can_capture(bad):
    with pytest.raises(ValueError, match=f"compile must be True, False or one of .* got {bad!r}"):
        llcfast.estimate_llc(mlp(), regression_loader(), mse, compile=bad, **KW)


def test_autotuned_mode_walks_the_eager_trajectory():
    eager = llcfast.estimate_llc(mlp(), regression_loader(), mse, **KW)
    tuned = llcfast.estimate_llc(mlp(), regression_loader(), mse, compile="max-autotune-no-cudagraphs", **KW)
    assert tuned.config["compile"] is True
    np.testing.assert_allclose(tuned.loss_trace, eager.loss_trace, rtol=1e-5, atol=1e-7)


def test_the_sequential_path_is_not_reported_compiled():
    res = llcfast.estimate_llc(mlp(), regression_loader(), mse, compile=True, activation_checkpointing=["0"], **KW)
    assert res.config["backend"] == "fast-sequential" and res.config["compile"] is False
