"""Shuffling loaders under a seed: each chain fetches its batches on its own
random stream, keyed by (seed, global chain index), so the same seed gives
the same estimate, the fast engine walks the reference's trajectory, chain
groups change nothing, and the caller's generators are left alone."""
import numpy as np
import pytest
import torch

import llcfast
from llcfast.engine.loaders import loader_batches
from llc_models import mlp, mse, regression_loader

KW = dict(num_chains=3, num_draws=12, num_burnin=2, epsilon=1e-3, gamma=100.0, nbeta=5.0, progress=False)
pytestmark = pytest.mark.filterwarnings("ignore:the (LLC estimate is negative|loader holds)")


def shuffling(generator=None, **loader_kwargs):
    return regression_loader(n=96, shuffle=True, generator=generator, **loader_kwargs)


@pytest.mark.parametrize("own_generator", [False, True], ids=["global-rng", "loader-generator"])
@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_the_same_seed_gives_the_same_estimate_and_another_seed_another(backend, own_generator):
    loader = shuffling(torch.Generator().manual_seed(5) if own_generator else None)
    runs = [llcfast.estimate_llc(mlp(), loader, mse, seed=s, backend=backend, **KW) for s in (0, 0, 1)]
    np.testing.assert_array_equal(runs[0].loss_trace, runs[1].loss_trace)
    assert runs[0].init_loss == runs[1].init_loss
    assert runs[0].init_loss != runs[2].init_loss  # another seed: other init batches
    assert not np.array_equal(runs[0].loss_trace, runs[2].loss_trace)


def test_the_fast_engine_walks_the_reference_trajectory_on_a_shuffling_loader():
    fast = llcfast.estimate_llc(mlp(), shuffling(), mse, seed=3, backend="fast", **KW)
    ref = llcfast.estimate_llc(mlp(), shuffling(), mse, seed=3, backend="reference", **KW)
    np.testing.assert_allclose(fast.loss_trace, ref.loss_trace, rtol=1e-5)
    assert not np.allclose(fast.loss_trace[0], fast.loss_trace[1])  # the chains did draw different batches


def test_chain_groups_draw_the_batches_of_the_same_global_chains():
    whole = llcfast.estimate_llc(mlp(), shuffling(), mse, seed=3, backend="fast", **KW)
    grouped = llcfast.estimate_llc(mlp(), shuffling(), mse, seed=3, backend="fast", chain_group=1, **KW)
    np.testing.assert_allclose(grouped.loss_trace, whole.loss_trace, rtol=1e-5)


def test_the_callers_generators_are_left_as_they_were():
    own = torch.Generator().manual_seed(9)
    loader, model = shuffling(own), mlp()
    torch.manual_seed(123)
    global_before, own_before = torch.get_rng_state(), own.get_state()
    llcfast.estimate_llc(model, loader, mse, seed=0, **KW)
    assert torch.equal(torch.get_rng_state(), global_before) and torch.equal(own.get_state(), own_before)


def test_lists_pass_through_and_a_single_pass_stops():
    batches = [(torch.zeros(2),), (torch.ones(2),)]
    it = loader_batches(batches, 0, 0)
    assert [next(it)[0] is b[0] for b in batches * 2] == [True] * 4  # cycled, the very same objects
    assert len(list(loader_batches(shuffling(), 0, endless=False))) == 6


def test_persistent_workers_give_each_chain_its_own_pass():
    """A persistent-worker DataLoader restarts its one iterator on every
    iter(): chains sharing it would steal each other's batches."""
    loader = shuffling(num_workers=1, persistent_workers=True)
    kw = dict(KW, num_chains=2, num_draws=8, num_burnin=0, seed=4)
    first, again = (llcfast.estimate_llc(mlp(), loader, mse, backend="fast", **kw) for _ in range(2))
    ref = llcfast.estimate_llc(mlp(), loader, mse, backend="reference", **kw)
    np.testing.assert_array_equal(first.loss_trace, again.loss_trace)
    np.testing.assert_allclose(first.loss_trace, ref.loss_trace, rtol=1e-5)
    assert loader._iterator is None  # the caller's loader started no workers


@pytest.mark.parametrize("kwargs", [dict(shuffle=True), dict(shuffle=True, drop_last=True), dict(shuffle=False),
                                    dict(shuffle=True, generator="own")], ids=["shuffle", "drop-last", "in-order",
                                                                               "loader-generator"])
def test_a_tensor_datasets_batches_are_indexed_value_for_value_with_the_loaders_random_numbers(kwargs):
    from torch.utils.data import DataLoader, TensorDataset
    from llcfast.engine.loaders import TensorPasses, draw_batches
    g = torch.Generator()
    kwargs = {**kwargs, "generator": g} if kwargs.get("generator") else kwargs
    data = TensorDataset(torch.randn(50, 3), torch.randn(50), torch.arange(50))
    loader = DataLoader(data, batch_size=8, **kwargs)
    assert TensorPasses.applies(loader)
    passes = []
    for source in (loader, TensorPasses(loader)):
        torch.manual_seed(7)
        g.manual_seed(9)
        passes.append([list(source) for _ in range(2)] + [torch.rand(1), g.initial_seed(), torch.rand(1, generator=g)])
    (own, own_next, *after), (indexed, indexed_next, *after_indexed) = passes
    assert len(own) == len(indexed) == len(loader)
    assert torch.equal(own[0][2], own_next[0][2]) != kwargs["shuffle"]  # a shuffling loader's second pass differs
    for a, b in zip(own + own_next, indexed + indexed_next):
        assert type(a) is type(b) is list
        for x, y in zip(a, b):
            assert torch.equal(x, y) and x.dtype == y.dtype
    assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(after, after_indexed))
    # the draws' random samples of the dataset are indexed the same way: each names rows of the dataset
    drawn = next(draw_batches(loader, 0, 0))
    assert len(drawn) == 3 and torch.equal(drawn[0], data.tensors[0][drawn[2]])


def test_loaders_the_tensor_pass_cannot_reproduce_are_fetched_sample_by_sample():
    from torch.utils.data import DataLoader, TensorDataset
    from llcfast.engine.loaders import TensorPasses
    data = TensorDataset(torch.randn(10, 2))
    assert not TensorPasses.applies(DataLoader(data, batch_size=2, collate_fn=lambda b: b))
    assert not TensorPasses.applies(DataLoader(data, batch_size=None))
    assert not TensorPasses.applies(DataLoader(data, batch_size=2, num_workers=1))
    assert not TensorPasses.applies(DataLoader(torch.utils.data.Subset(data, range(4)), batch_size=2))
