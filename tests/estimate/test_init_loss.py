"""The init loss's own sampling error: every chain subtracts the same L(w*),
so its error shifts the LLC by nbeta times that error and never shows in the
spread across chains. The result reports it; both backends agree on it."""
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import llcfast
from llc_models import mlp, mse, regression_loader

KW = dict(num_burnin=0, num_chains=2, num_draws=5, epsilon=1e-4, gamma=100.0, nbeta=30.0, seed=0, progress=False)


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_spread_of_the_init_batches_is_reported(backend):
    model, loader = mlp(), regression_loader(n=128, batch_size=16)  # 8 batches, the init loss takes 4
    res = llcfast.estimate_llc(model, loader, mse, num_init_batches=4, backend=backend, **KW)
    with torch.no_grad():
        per_batch = [float(mse(model, b)) for b in loader][:4]
    d = res.diagnostics
    np.testing.assert_allclose(d["init_loss_per_batch"], per_batch, rtol=1e-6)
    assert res.init_loss == pytest.approx(np.mean(per_batch), rel=1e-6)
    se = np.std(per_batch, ddof=1) / 2.0
    assert d["init_loss_se"] == pytest.approx(se, rel=1e-6) and d["loader_batches"] == 8
    # half of the 8 batches the chains draw from: the finite-population correction sqrt(1 - 4/8)
    assert d["llc_se_from_init_loss"] == pytest.approx(30.0 * se * math.sqrt(0.5), rel=1e-6)
    assert d["llc_se_from_init_loss"] > 0


def test_an_init_loss_over_every_batch_the_chains_draw_has_no_error():
    """Then L(w*) is the exact loss at w* on the data the chains sample."""
    model = mlp()
    for loader in (regression_loader(n=64, batch_size=16), list(regression_loader(n=64, batch_size=16)),
                   regression_loader(n=64, batch_size=16, shuffle=True)):
        res = llcfast.estimate_llc(model, loader, mse, num_init_batches=4, **KW)
        assert res.diagnostics["init_loss_se"] > 0 and res.diagnostics["llc_se_from_init_loss"] == 0.0
    one = llcfast.estimate_llc(model, [next(iter(regression_loader(n=16)))], mse, **KW)  # full-batch sampling
    assert one.diagnostics["llc_se_from_init_loss"] == 0.0
    # Batches drawn with replacement are no fixed set: no correction.
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(1))
    data = TensorDataset(x, torch.sin(x.sum(-1)))
    drawn = DataLoader(data, batch_size=16, sampler=RandomSampler(data, replacement=True, num_samples=64))
    res = llcfast.estimate_llc(model, drawn, mse, num_init_batches=4, **KW)
    d = res.diagnostics
    assert d["loader_batches"] is None and d["llc_se_from_init_loss"] == pytest.approx(30.0 * d["init_loss_se"])


def test_one_init_batch_has_no_spread_and_identical_batches_have_none():
    model = mlp()
    res = llcfast.estimate_llc(model, regression_loader(), mse, num_init_batches=1, **KW)
    assert math.isnan(res.diagnostics["init_loss_se"]) and math.isnan(res.diagnostics["llc_se_from_init_loss"])
    x = torch.randn(16, 5)
    same = [(x, torch.sin(x.sum(-1)))] * 3
    res = llcfast.estimate_llc(model, same, mse, num_init_batches=3, **KW)
    assert res.diagnostics["llc_se_from_init_loss"] == 0.0


def test_the_init_loss_error_moves_every_chain_alike():
    """Two runs that differ only in which batches give L(w*): same draws,
    every chain's LLC shifts by nbeta * (difference of the init losses)."""
    model, loader = mlp(), regression_loader(n=64, batch_size=16)
    a = llcfast.estimate_llc(model, loader, mse, num_init_batches=1, **KW)
    b = llcfast.estimate_llc(model, loader, mse, num_init_batches=4, **KW)
    np.testing.assert_allclose(a.loss_trace, b.loss_trace)
    shift = 30.0 * (a.init_loss - b.init_loss)
    assert abs(shift) > 10 * a.llc_std / math.sqrt(2)  # far beyond what the chains' spread shows
    np.testing.assert_allclose(a.llc_per_chain - b.llc_per_chain, -shift, rtol=1e-6)


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_a_loader_shorter_than_the_init_batches_gives_each_batch_once(backend, recwarn):
    """As devinterp 1.x: the first min(num_init_batches, len(loader)) batches.
    Cycling would weight the first batches twice and shrink the reported
    spread by counting repeats as independent."""
    model, loader = mlp(), regression_loader(n=64, batch_size=16)  # 4 batches
    with torch.no_grad():
        per_batch = [float(mse(model, b)) for b in loader]
    with pytest.warns(UserWarning, match="num_init_batches=6, but the loader holds 4 batches"):
        asked = llcfast.estimate_llc(model, loader, mse, num_init_batches=6, backend=backend, **KW)
    default = llcfast.estimate_llc(model, loader, mse, backend=backend, **dict(KW, num_chains=5))
    assert not [w for w in recwarn if "num_init_batches" in str(w.message)]  # the default (num_chains) is not news
    for res in (asked, default):
        np.testing.assert_allclose(res.diagnostics["init_loss_per_batch"], per_batch, rtol=1e-6)
        assert res.init_loss == pytest.approx(np.mean(per_batch), rel=1e-6)
        assert res.diagnostics["init_loss_se"] == pytest.approx(np.std(per_batch, ddof=1) / 2.0, rel=1e-6)
        assert res.config["num_init_batches"] == 4


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_all_init_batches_is_the_exact_loss_on_the_data_the_chains_draw(backend):
    """num_init_batches="all": every batch of the fixed set, so the init
    loss is the mean over all of them and its error is 0, with no warning."""
    model = mlp()
    for loader, n in ((regression_loader(n=80, batch_size=16), 5), (list(regression_loader(n=48, batch_size=16)), 3),
                      (regression_loader(n=80, batch_size=16, shuffle=True), 5)):
        with torch.no_grad():
            whole = float(mse(model, next(iter(DataLoader(loader.dataset, batch_size=10**6))))) \
                if isinstance(loader, DataLoader) else float(np.mean([float(mse(model, b)) for b in loader]))
        res = llcfast.estimate_llc(model, loader, mse, num_init_batches="all", backend=backend, **KW)
        d = res.diagnostics
        assert res.config["num_init_batches"] == n and len(d["init_loss_per_batch"]) == n
        assert res.init_loss == pytest.approx(whole, rel=1e-5)  # equal batches: the mean of the batch means
        assert d["init_loss_se"] > 0 and d["llc_se_from_init_loss"] == 0.0
        assert all(ok is not False for name, ok, _ in res.checks() if name == "init_loss")
    four = llcfast.estimate_llc(model, regression_loader(n=80, batch_size=16), mse, num_init_batches=4,
                                backend=backend, **KW)
    assert four.init_loss != pytest.approx(res.init_loss, rel=1e-6)  # 4 of 5 is another number


def test_all_init_batches_needs_a_fixed_set_of_batches():
    model = mlp()
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(1))
    data = TensorDataset(x, torch.sin(x.sum(-1)))
    drawn = DataLoader(data, batch_size=16, sampler=RandomSampler(data, replacement=True, num_samples=64))

    def endless():
        while True:
            yield data[:16]

    class Stream:
        def __iter__(self):
            return endless()

    for loader in (drawn, Stream()):
        with pytest.raises(ValueError, match=r"num_init_batches='all' needs a loader that is one fixed set of "
                                             rf"batches.*this {type(loader).__name__} is not one"):
            llcfast.estimate_llc(model, loader, mse, num_init_batches="all", **KW)
    for bad, error in (("most", ValueError), ("All", ValueError), (0, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="num_init_batches"):
            llcfast.estimate_llc(model, regression_loader(), mse, num_init_batches=bad, **KW)
    with pytest.raises(ValueError, match=r"num_init_batches must be an int >= 1, 'all' or None, got 'most'"):
        llcfast.reference.estimate_llc(model, regression_loader(), mse, num_init_batches="most", **KW)
