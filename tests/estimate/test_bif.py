"""estimate_bif: the covariance of per-sample losses across posterior draws.

Known answer: least squares at its minimum with full-batch SGLD is a
Gaussian chain whose stationary covariance is exact, (P - eps P^2 / 4)^-1
with P = nbeta H + gamma I, and per-sample losses are quadratic in w, so
their covariance is 4 r_i r_j K_ij + 2 K_ij^2 with K = X Sigma X^T and r the
residuals at w*. Tolerance: 4 of the estimate's own chain-bootstrap
standard errors."""
import numpy as np
import pytest
import torch

import llcfast
from llcfast.estimate.bif import (BOOTSTRAP_SAMPLES, CHAIN_POOLING, as_statistic, bif_from_traces,
                                  chain_bootstrap_se, pooled_covariance)

N, D, SIGMA = 200, 2, 0.5


def problem():
    torch.manual_seed(0)
    x = torch.randn(N, D)
    y = x @ torch.tensor([1.0, -2.0]) + SIGMA * torch.randn(N)
    model = torch.nn.Linear(D, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution.T)
    return model, x, y


def mse(model, batch):
    return ((model(batch[0]).squeeze(-1) - batch[1]) ** 2).mean()


def per_sample(model, batch):
    return (model(batch[0]).squeeze(-1) - batch[1]) ** 2


@pytest.mark.filterwarnings("ignore:the LLC estimate is negative")
def test_least_squares_covariance_matches_the_gaussian_chain():
    model, x, y = problem()
    gamma, eps = 1.0, 2e-3
    obs = {"train": [(x[:6], y[:6])]}
    r = llcfast.estimate_bif(model, [(x, y)], obs, per_sample_loss_fn=per_sample, loss_fn=mse,
                             statistic="covariance", gamma=gamma, epsilon=eps, num_chains=8, num_draws=500,
                             num_burnin=200, progress=False, trust_checks=False)
    nbeta = r.llc.config["nbeta"]
    p = nbeta * 2 / N * x.T.double() @ x.double() + gamma * torch.eye(D, dtype=torch.float64)
    sigma = torch.linalg.inv(p - eps * p @ p / 4)
    xo, yo = x[:6].double(), y[:6].double()
    res = yo - xo @ model.weight.detach().double().reshape(-1)
    k = xo @ sigma @ xo.T
    exact = (4 * torch.outer(res, res) * k + 2 * k ** 2).numpy()
    assert r.influence.shape == (6, 6) and r.labels == [("train", i) for i in range(6)]
    assert r.draws == 500 and r.se is not None and np.all(r.se > 0)
    z = np.abs(r.influence - exact) / r.se
    assert z.max() < 4, z
    # and the correlation is that covariance normalised
    corr = llcfast.estimate_bif(model, [(x, y)], obs, per_sample_loss_fn=per_sample, loss_fn=mse, gamma=gamma,
                                epsilon=eps, num_chains=8, num_draws=500, num_burnin=200, progress=False,
                                trust_checks=False)
    scale = np.sqrt(np.diag(r.influence))
    np.testing.assert_allclose(corr.influence, r.influence / np.outer(scale, scale), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("pooling", CHAIN_POOLING)
@pytest.mark.parametrize("statistic", ["correlation", "covariance"])
def test_streamed_sums_equal_the_twin_on_stored_traces(pooling, statistic):
    model, x, y = problem()
    obs = {"a": [(x[:3], y[:3]), (x[3:5], y[3:5])], "b": [(x[10:12], y[10:12])]}
    r = llcfast.estimate_bif(model, [(x[:100], y[:100]), (x[100:], y[100:])], obs, per_sample_loss_fn=per_sample,
                             loss_fn=mse, statistic=statistic, pooling=pooling, gamma=10.0, epsilon=1e-3,
                             num_chains=3, num_draws=20, num_burnin=5, steps_between_draws=2, progress=False,
                             trust_checks=False, keep_traces=True)
    traces = torch.as_tensor(r.config["traces"])
    assert traces.shape == (3, 20, 7)
    assert r.labels == [("a", 0), ("a", 1), ("a", 2), ("a", 3), ("a", 4), ("b", 0), ("b", 1)]
    np.testing.assert_allclose(r.influence, bif_from_traces(traces, statistic, pooling).numpy(), rtol=1e-8,
                               atol=1e-12)


@pytest.mark.parametrize("pooling", ["stack", "centred"])
@pytest.mark.parametrize("statistic", ["correlation", "covariance"])
def test_the_weighted_bootstrap_equals_resampling_the_chains_one_resample_at_a_time(pooling, statistic):
    rng = np.random.default_rng(0)
    traces = rng.normal(size=(5, 30, 6)) + rng.normal(size=(5, 1, 6))  # chains with means of their own
    traces[:, :, 1] += 0.8 * traces[:, :, 0]
    traces[3, 25:] = np.nan  # a chain that kept fewer draws
    counts = np.isfinite(traces[:, :, 0]).sum(1).astype(float)
    kept = np.nan_to_num(traces)
    s1, s2 = kept.sum(1), np.einsum("cti,ctj->cij", kept, kept)
    gen, samples = np.random.default_rng(4), []
    for _ in range(BOOTSTRAP_SAMPLES):
        pick = gen.integers(0, 5, 5)
        samples.append(as_statistic(pooled_covariance(s1[pick], s2[pick], counts[pick], None, pooling), statistic))
    want = np.std(np.stack(samples), axis=0, ddof=1)
    got = chain_bootstrap_se(s1, s2, counts, statistic, pooling, seed=4, per_pass=7)
    off = ~np.eye(6, dtype=bool)
    assert want[off].min() > 1e-3
    np.testing.assert_allclose(got[off], want[off], rtol=1e-9)
    np.testing.assert_allclose(np.diag(got), np.diag(want), atol=1e-9 * np.abs(np.diag(want)).max() + 1e-12)
    assert chain_bootstrap_se(s1, s2, counts, statistic, "mean", seed=4) is None


def test_pooling_differs_where_the_chains_means_differ():
    """Two chains with different means: stacking adds their spread, centring
    each chain removes it, the chains' mean at each draw sees neither."""
    gen = torch.Generator().manual_seed(0)
    traces = torch.randn(2, 50, 3, generator=gen, dtype=torch.float64)
    traces[1] += torch.tensor([3.0, -3.0, 0.0], dtype=torch.float64)
    s1, s2 = traces.sum(1).numpy(), torch.einsum("cti,ctj->cij", traces, traces).numpy()
    counts, by_draw = np.array([50, 50]), traces.mean(0).numpy()
    stack = pooled_covariance(s1, s2, counts, by_draw, "stack")
    centred = pooled_covariance(s1, s2, counts, by_draw, "centred")
    assert stack[0, 1] < -1.5 and abs(centred[0, 1]) < 0.5  # the shared shift anticorrelates 0 and 1 when stacked
    for pooling, got in (("stack", stack), ("centred", centred)):
        np.testing.assert_allclose(got, bif_from_traces(traces, "covariance", pooling).numpy(), rtol=1e-10)


def test_duplicated_observables_give_identical_rows():
    model, x, y = problem()
    obs = {"once": [(x[:4], y[:4])], "again": [(x[:4], y[:4])]}
    r = llcfast.estimate_bif(model, [(x, y)], obs, per_sample_loss_fn=per_sample, loss_fn=mse, gamma=10.0,
                             epsilon=1e-3, num_chains=2, num_draws=30, num_burnin=10, progress=False,
                             trust_checks=False)
    np.testing.assert_allclose(r.influence[:4], r.influence[4:], rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.diag(r.influence), 1.0, rtol=1e-12)


@pytest.mark.filterwarnings("ignore:the LLC estimate is negative")
def test_fast_and_reference_backends_agree():
    model, x, y = problem()
    obs = {"train": [(x[:5], y[:5])]}
    kw = dict(per_sample_loss_fn=per_sample, loss_fn=mse, gamma=10.0, epsilon=1e-3, num_chains=3, num_draws=25,
              num_burnin=5, progress=False, trust_checks=False, pooling="centred")
    fast = llcfast.estimate_bif(model, [(x[:100], y[:100]), (x[100:], y[100:])], obs, **kw)
    ref = llcfast.estimate_bif(model, [(x[:100], y[:100]), (x[100:], y[100:])], obs, backend="reference", **kw)
    assert ref.config["backend"] == "reference" and fast.config["backend"] == "fast"
    np.testing.assert_allclose(fast.influence, ref.influence, rtol=1e-4, atol=1e-6)


def test_token_units_label_every_position():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.Linear(4, 7))
    tokens = torch.randint(0, 7, (3, 5))

    def per_token(m, batch):
        logits = m(batch[:, :-1])
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")

    r = llcfast.estimate_bif(model, [tokens], {"seq": [tokens[:2]]}, per_sample_loss_fn=per_token,
                             loss_fn=lambda m, b: per_token(m, b).mean(), unit="token", gamma=10.0, epsilon=1e-3,
                             num_chains=2, num_draws=10, num_burnin=2, progress=False, trust_checks=False)
    assert r.influence.shape == (8, 8) and r.labels[:5] == [("seq", 0, t) for t in range(4)] + [("seq", 1, 0)]
    frame = r.to_frame()
    assert len(frame) == 64 and {"observable_i", "sample_j", "position_i", "se"} <= set(frame.columns)


@pytest.mark.parametrize("kwargs, message", [
    (dict(unit="word"), "unit must be one of"),
    (dict(statistic="mutual"), "statistic must be one of"),
    (dict(pooling="sum"), "pooling must be one of"),
    (dict(gamma="auto"), "needs a number for gamma"),
    (dict(callbacks=[print]), "uses the sampler's callbacks"),
    (dict(observables={"x": torch.zeros(3)}), "must be a non-empty list of batches"),
    (dict(observables={}), "non-empty dict"),
    (dict(per_sample_loss_fn=None), "per_sample_loss_fn must be a function"),
])
def test_bad_arguments_are_named(kwargs, message):
    model, x, y = problem()
    args = dict(observables={"a": [(x[:2], y[:2])]}, per_sample_loss_fn=per_sample, loss_fn=mse, epsilon=1e-3,
                progress=False)
    args.update(kwargs)
    observables = args.pop("observables")
    with pytest.raises((ValueError, TypeError), match=message):
        llcfast.estimate_bif(model, [(x, y)], observables, **args)


def test_a_plot_is_written(tmp_path):
    model, x, y = problem()
    r = llcfast.estimate_bif(model, [(x, y)], {"a": [(x[:4], y[:4])]}, per_sample_loss_fn=per_sample, loss_fn=mse,
                             gamma=10.0, epsilon=1e-3, num_chains=2, num_draws=10, num_burnin=2, progress=False,
                             trust_checks=False)
    r.plot(str(tmp_path / "bif.png"), order=[3, 2, 1, 0])
    assert (tmp_path / "bif.png").stat().st_size > 1000


@pytest.mark.filterwarnings("ignore:the LLC estimate is negative")
def test_samples_unlike_the_training_data_have_the_largest_self_influence():
    """Per-sample loss variance grows with x' Sigma x: inputs five times
    larger than any the model was fitted on vary most across draws."""
    model, x, y = problem()
    gen = torch.Generator().manual_seed(3)
    far = 5 * torch.randn(3, D, generator=gen)
    near = x[:5]
    obs = {"near": [(near, near @ torch.tensor([1.0, -2.0]))], "far": [(far, far @ torch.tensor([1.0, -2.0]))]}
    r = llcfast.estimate_bif(model, [(x, y)], obs, per_sample_loss_fn=per_sample, loss_fn=mse,
                             statistic="covariance", gamma=1.0, epsilon=2e-3, num_chains=4, num_draws=200,
                             num_burnin=100, progress=False, trust_checks=False)
    self_influence = np.diag(r.influence)
    assert self_influence[5:].min() > self_influence[:5].max()
