"""estimate_bif and estimate_susceptibilities under torch.distributed: 2 CPU
processes on gloo split the chains (2 + 1 of 3), and every rank gets the
numbers of one process with the same seed."""

import numpy as np
import pytest
import torch

import llcfast
from two_ranks import on_two_ranks, single_threaded

KW = dict(gamma=20.0, epsilon=2e-3, num_chains=3, num_draws=12, num_burnin=4, progress=False, trust_checks=False,
          seed=5)


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=gen)
    y = x @ torch.tensor([1.0, -1.0, 0.5]) + 0.3 * torch.randn(64, generator=gen)
    return x, y


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def _per_sample(model, batch):
    return (model(batch[0]).squeeze(-1) - batch[1]) ** 2


def _mse(model, batch):
    return _per_sample(model, batch).mean()


def _both():
    x, y = _data()
    loader = [(x[:32], y[:32]), (x[32:], y[32:])]
    observables = {"task": [(x[:8], y[:8])], "probe": [(x[40:46], y[40:46])]}
    bif = llcfast.estimate_bif(_model(), loader, observables, per_sample_loss_fn=_per_sample, loss_fn=_mse,
                               statistic="covariance", **KW)
    sus = llcfast.estimate_susceptibilities(_model(), loader, observables, {"full": None, "out": ["2.*"]},
                                            sampling_task="task", per_sample_loss_fn=_per_sample, loss_fn=_mse,
                                            unit="sequence", **KW)
    return bif.influence, bif.se, sus.values, bif.llc.config.get("world_size", 1)


@pytest.mark.filterwarnings("ignore:the LLC estimate is negative", "ignore:the loader holds")
def test_two_gloo_ranks_give_the_one_process_numbers(tmp_path):
    single = single_threaded(_both)
    for ranked in on_two_ranks(_both, tmp_path):
        assert single[-1] == 1 and ranked[-1] == 2  # the ranks did split the chains
        for one, two in zip(single[:-1], ranked[:-1]):
            np.testing.assert_allclose(two, one, rtol=1e-9, atol=1e-12)
