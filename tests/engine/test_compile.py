"""estimate_llc(compile=True): the batched pass through torch.compile walks
the same trajectory as the eager pass; a model torch.compile fails on runs
eagerly after one warning; the option is checked."""
import numpy as np
import pytest
import torch

import llcfast
from llc_models import mlp, mse, regression_loader

KW = dict(num_burnin=0, num_chains=3, num_draws=6, epsilon=1e-3, gamma=100.0, nbeta=20.0, seed=2, progress=False,
          num_init_batches=1)
pytestmark = pytest.mark.filterwarnings("ignore:the loader holds")


def test_compiled_pass_walks_the_eager_trajectory():
    eager = llcfast.estimate_llc(mlp(), regression_loader(), mse, **KW)
    compiled = llcfast.estimate_llc(mlp(), regression_loader(), mse, compile=True, **KW)
    assert compiled.config["compile"] is True and "compile" not in eager.config
    np.testing.assert_allclose(compiled.loss_trace, eager.loss_trace, rtol=1e-5, atol=1e-7)


def test_compiled_language_model_walks_the_eager_trajectory():
    """The next-token loss takes its Inductor form under torch.compile
    (fused_loss.token_nll_for_inductor) and the twin eagerly: same numbers."""
    from llcfast.pipeline import models
    torch.manual_seed(0)
    model = models.AttentionOnlyLM(vocab=40, d_model=16, heads=2, context=16)
    data = [(torch.randint(0, 40, (4, 9)),) for _ in range(6)]
    eager = llcfast.estimate_llc(model, data, models.next_token_loss, **KW)
    compiled = llcfast.estimate_llc(model, data, models.next_token_loss, compile=True, **KW)
    assert compiled.config["compile"] is True
    np.testing.assert_allclose(compiled.loss_trace, eager.loss_trace, rtol=1e-5, atol=1e-6)


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
    with pytest.warns(RuntimeWarning, match="non-finite values where the eager code gave finite"):
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


def _hessian_case():
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    return mlp(), mse, [(x[:32], torch.sin(x[:32].sum(-1))), (x[32:], torch.sin(x[32:].sum(-1)))]


def test_compiled_hessian_passes_give_the_eager_values():
    """One compilation serves every pass of the trace: the last pass is
    filled up to the others' size and its extra probes dropped, so the
    values and the HVP count are the eager run's."""
    model, loss_fn, batches = _hessian_case()
    kw = dict(num_probes=10, probes_per_pass=4, seed=5)
    eager = llcfast.hessian_trace(model, loss_fn, batches, **kw)
    compiled = llcfast.hessian_trace(model, loss_fn, batches, compile=True, **kw)
    assert compiled.config["compile"] is True and "compile" not in eager.config
    assert compiled.num_hvps == eager.num_hvps == 10
    np.testing.assert_allclose(compiled.per_probe, eager.per_probe, rtol=1e-5, atol=1e-6)
    eigs = llcfast.hessian_eigs(model, loss_fn, batches, k=2, tol=1e-7, compile=True)
    assert eigs.config["compile"] is True
    np.testing.assert_allclose(eigs.values, llcfast.hessian_eigs(model, loss_fn, batches, k=2, tol=1e-7).values,
                               rtol=1e-4)


def test_hessian_passes_torch_compile_fails_on_run_eagerly_with_a_warning(monkeypatch):
    model, loss_fn, batches = _hessian_case()
    eager = llcfast.hessian_trace(model, loss_fn, batches, num_probes=6, seed=1)

    def broken(fn, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("backend compiler failed\nlong traceback")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="torch.compile could not compile the Hessian-vector products of this "
                                            "loss .*backend compiler failed"):
        res = llcfast.hessian_trace(model, loss_fn, batches, num_probes=6, seed=1, compile=True)
    assert res.config["compile"] is False
    np.testing.assert_allclose(res.per_probe, eager.per_probe, rtol=1e-6)

    def nan_products(fn, *args, **kwargs):
        def run(*a, **k):
            out = [o.clone() for o in fn(*a, **k)]
            out[0].fill_(float("nan"))
            return out
        return run

    monkeypatch.setattr(torch, "compile", nan_products)
    with pytest.warns(RuntimeWarning, match="non-finite values where the eager code gave finite"):
        res = llcfast.hessian_spectrum(model, loss_fn, batches, num_runs=2, num_steps=5, compile=True)
    assert res.config["compile"] is False and np.isfinite(res.nodes).all()


def _spy_on_pass_rows(monkeypatch) -> list:
    """Stands in for torch.compile on the Hessian passes: runs them as they
    are and records the rows of each call."""
    rows = []

    def spy(fn, *args, **kwargs):
        def run(params, vecs, batch):
            rows.append(vecs[0].shape[0])
            return fn(params, vecs, batch)
        return run

    monkeypatch.setattr(torch, "compile", spy)
    return rows


def test_every_compiled_trace_pass_has_the_same_rows(monkeypatch):
    model, loss_fn, batches = _hessian_case()
    rows = _spy_on_pass_rows(monkeypatch)
    res = llcfast.hessian_trace(model, loss_fn, batches, num_probes=10, probes_per_pass=4, compile=True)
    assert res.config["compile"] is True and res.per_probe.shape == (1, 10)
    assert rows == [4] * 6  # 3 passes x 2 batches, the last pass filled from 2 probes to 4


def test_compiled_trace_at_stacked_points_keeps_each_points_values(monkeypatch):
    """At C points the filled-up last pass holds C x probes-per-pass rows
    grouped by point; each point keeps its own first values."""
    model, loss_fn, batches = _hessian_case()
    g = torch.Generator().manual_seed(4)
    points = {n: p.detach() + 0.3 * torch.randn((3,) + tuple(p.shape), generator=g)
              for n, p in model.named_parameters()}
    kw = dict(num_probes=7, probes_per_pass=3, points=points, seed=2)
    eager = llcfast.hessian_trace(model, loss_fn, batches, **kw)
    rows = _spy_on_pass_rows(monkeypatch)
    compiled = llcfast.hessian_trace(model, loss_fn, batches, compile=True, **kw)
    assert set(rows) == {3 * 3} and compiled.num_hvps == eager.num_hvps == 21
    np.testing.assert_allclose(compiled.per_probe, eager.per_probe, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", ["yes", "reduce-overhead"])
def test_hessian_compile_is_checked(bad):
    model, loss_fn, batches = _hessian_case()
    with pytest.raises(ValueError, match=f"compile must be True, False or one of .* got {bad!r}"):
        llcfast.hessian_trace(model, loss_fn, batches, compile=bad)


def test_the_eager_check_runs_only_when_the_compiled_result_has_a_non_finite_value(monkeypatch):
    from llcfast.engine.compiled import GuardedCompile
    calls = []

    def eager(x):
        calls.append("eager")
        return [x * 2]

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (lambda x: [x * 2.0]))
    guard = GuardedCompile("default", "a test pass")
    run = guard.wrap(eager)
    assert torch.equal(run(torch.ones(3))[0], torch.full((3,), 2.0)) and calls == []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (lambda x: [x / 0.0 - x / 0.0]))  # NaN everywhere
    guard = GuardedCompile("default", "a test pass")
    run = guard.wrap(eager)
    with pytest.warns(RuntimeWarning, match="non-finite values"):
        out = run(torch.ones(3))
    assert calls == ["eager"] and torch.equal(out[0], torch.full((3,), 2.0)) and not guard.active
