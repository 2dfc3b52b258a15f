"""The engine on CUDA: the graph-replayed steps walk the same trajectory as
the eager steps and as the sequential reference; a batch that does not fit
the captured shapes runs eagerly; bf16 and TF32 stay within the chains'
error. Skipped, with the reason shown, where no GPU or no CUDA build exists."""
import math
import sys

import numpy as np
import pytest
import torch

import llcfast
from llcfast import reference
from llcfast.engine.planner import HEADROOM
from conftest import requires_cuda
from llc_models import (TinyTransformer, exact_sgld_llc, linear_problem, mse, regression_loader, token_loader,
                        token_loss)
from test_engine_agreement import assert_same_trajectory, record_into

pytestmark = [pytest.mark.cuda, requires_cuda,
              pytest.mark.filterwarnings("ignore:the LLC estimate is negative"),
              pytest.mark.filterwarnings("ignore:the loader holds")]


@pytest.mark.parametrize("restrict", [None, ["blocks.1.*"]])
def test_graph_replay_matches_eager_and_reference(restrict):
    model = TinyTransformer().cuda()
    kw = dict(num_chains=4, num_draws=12, num_burnin=2, epsilon=1e-3, nbeta=8.0, gamma=100.0, seed=7,
              restrict=restrict, progress=False, device="cuda")
    ref, graphed, eager = {}, {}, {}
    r = reference.estimate_llc(model, token_loader(), token_loss, callbacks=[record_into(ref)], **kw)
    g = llcfast.estimate_llc(model, token_loader(), token_loss, callbacks=[record_into(graphed)], backend="fast",
                             cuda_graphs=True, **kw)
    e = llcfast.estimate_llc(model, token_loader(), token_loss, callbacks=[record_into(eager)], backend="fast",
                             cuda_graphs=False, **kw)
    assert g.config["cuda_graphs"] is True and e.config["cuda_graphs"] is False
    assert_same_trajectory(r, g, ref, graphed, steps=14, nbeta=8.0, eps=1e-3)
    assert_same_trajectory(e, g, eager, graphed, steps=14, nbeta=8.0, eps=1e-3)


@pytest.mark.parametrize("sampler,kw,box", [("rmsprop_sgld", {"alpha": 0.9}, None), ("sgnht", {}, 0.05),
                                             ("sgld", {}, 0.05)])
def test_graph_replay_of_every_sampler_matches_the_reference(sampler, kw, box):
    """The samplers' state (RMSprop's V, SGNHT's momentum and thermostat)
    advances inside the captured graph exactly as in eager steps."""
    model = TinyTransformer().cuda()
    args = dict(num_chains=3, num_draws=10, num_burnin=2, epsilon=1e-3, nbeta=8.0, gamma=100.0, seed=7,
                progress=False, device="cuda", sampler=sampler, sampler_kwargs=kw, bounding_box=box)
    ref, graphed = {}, {}
    r = reference.estimate_llc(model, token_loader(), token_loss, callbacks=[record_into(ref)], **args)
    g = llcfast.estimate_llc(model, token_loader(), token_loss, callbacks=[record_into(graphed)], backend="fast",
                             cuda_graphs=True, **args)
    assert g.config["cuda_graphs"] is True
    assert_same_trajectory(r, g, ref, graphed, steps=12, nbeta=8.0 * (10 if sampler == "rmsprop_sgld" else 1),
                           eps=1e-3 * (2 if sampler == "sgnht" else 1))


def test_short_last_batch_runs_eagerly_between_replays():
    loader = regression_loader(n=40, batch_size=16)  # batches of 16, 16, 8
    model = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1)).cuda()
    kw = dict(num_chains=3, num_draws=10, epsilon=1e-3, nbeta=10.0, seed=1, progress=False, device="cuda")
    ref, fast = {}, {}
    r = reference.estimate_llc(model, loader, mse, callbacks=[record_into(ref)], **kw)
    f = llcfast.estimate_llc(model, loader, mse, callbacks=[record_into(fast)], backend="fast", **kw)
    assert f.config["cuda_graphs"] is True
    assert_same_trajectory(r, f, ref, fast, steps=10, nbeta=10.0, eps=1e-3)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_low_precision_estimate_within_the_chains_error(precision):
    model, loader, x = linear_problem(10)
    model = model.cuda()
    loader = [(a.cuda(), b.cuda()) for a, b in loader]
    kw = dict(num_chains=32, num_draws=1000, num_burnin=300, epsilon=1e-3, gamma=1.0, nbeta=50.0,
              num_init_batches=1, seed=9, progress=False)
    full = llcfast.estimate_llc(model, loader, mse, precision="fp32", **kw)
    low = llcfast.estimate_llc(model, loader, mse, precision=precision, **kw)
    se = math.hypot(full.llc_std, low.llc_std) / math.sqrt(32)
    assert abs(low.llc_mean - full.llc_mean) < 4 * se
    assert abs(full.llc_mean - exact_sgld_llc(x, 50.0, 1.0, 1e-3)) < 4 * full.llc_std / math.sqrt(32)


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_bf16_copies_give_the_numbers_without_them(monkeypatch, cuda_graphs):
    """The weights' bf16 copies, written by the step, against autocast's casts
    (engine/bf16_copies.py): the same numbers, under graph replay too."""
    from llcfast.fastpath import bf16_copies
    model = TinyTransformer().cuda()
    kw = dict(num_chains=4, num_draws=12, epsilon=1e-3, nbeta=8.0, seed=7, progress=False, backend="fast",
              precision="bf16", cuda_graphs=cuda_graphs)
    copied = llcfast.estimate_llc(model, token_loader(), token_loss, **kw)
    monkeypatch.setattr(bf16_copies, "DEVICES", set())
    cast = llcfast.estimate_llc(model, token_loader(), token_loss, **kw)
    assert copied.config["bf16_copies"]["tensors"] > 0 and "bf16_copies" not in cast.config
    assert copied.config["cuda_graphs"] is cuda_graphs
    np.testing.assert_array_equal(copied.loss_trace, cast.loss_trace)


def test_cuda_matches_cpu_engine():
    """Same noise bits on both devices, so the trajectories differ only by
    the devices' matmul rounding."""
    kw = dict(num_chains=3, num_draws=10, epsilon=1e-3, nbeta=8.0, seed=3, progress=False, backend="fast")
    model = TinyTransformer()
    cpu = llcfast.estimate_llc(model, token_loader(), token_loss, device="cpu", **kw)
    gpu = llcfast.estimate_llc(model, token_loader(), token_loss, device="cuda", **kw)
    np.testing.assert_allclose(gpu.loss_trace, cpu.loss_trace, rtol=1e-4)


def test_capture_needs_one_steps_memory_not_two():
    """The warm-up steps run on a side stream; unless their cached blocks are
    released, the capture's private pool allocates a second step's worth
    (GPT-2 124M lost its graphs that way on an 80 GB card)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 8192), torch.nn.Tanh(), torch.nn.Linear(8192, 1)).cuda()
    x = torch.randn(4 * 4096, 256)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, 0]), batch_size=4096)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    res = llcfast.estimate_llc(model, loader, mse, num_chains=4, num_draws=6, epsilon=1e-6, nbeta=1.0,
                               progress=False, backend="fast", device="cuda")
    plan = res.config["memory_plan"]
    assert res.config["cuda_graphs"] is True and plan["chain_chunk"] is None  # one pass of all 4 chains
    one_pass = 4 * plan["activation_bytes_per_chain"]
    # Held in the cache beyond what was in use: the planner's one-chain pass (a quarter of a pass) is allowed;
    # the warm-up's whole pass, kept while the capture allocates its own, is not.
    assert torch.cuda.max_memory_reserved() - torch.cuda.max_memory_allocated() < 0.5 * one_pass


def test_memory_plan_groups_chains_when_little_memory_is_free(monkeypatch):
    """With free memory reported as just over two chains' worth, the plan
    stacks two chains at a time, and the numbers equal one stacked run's up
    to the devices' rounding of different batch sizes."""
    kw = dict(num_chains=5, num_draws=8, epsilon=1e-3, nbeta=8.0, seed=3, progress=False, backend="fast",
              device="cuda")
    model = TinyTransformer()
    whole = llcfast.estimate_llc(model, token_loader(), token_loss, **kw)
    plan = whole.config["memory_plan"]
    assert plan["chains_per_group"] == 5 and whole.timings["peak_memory_bytes"] > 0
    S, A = plan["state_bytes_per_chain"], plan["activation_bytes_per_chain"]
    free = int((2.5 * S + A) / HEADROOM) + 1  # room for 2.5 chains' state and one chain's activations
    # The planner counts what torch's cache holds unused as free, and the first run left its peak cached, so
    # the fake figure replaces the planner's whole reading, not only the driver's.
    monkeypatch.setattr(sys.modules["llcfast.estimate.llc"], "free_device_bytes", lambda device: free)
    monkeypatch.setattr(sys.modules["llcfast.estimate.llc"], "measure_activation_bytes", lambda one_chain, device: A)
    grouped = llcfast.estimate_llc(model, token_loader(), token_loss, **kw)
    assert grouped.config["memory_plan"]["chains_per_group"] == 2 and grouped.config["chain_group"] == 2
    np.testing.assert_allclose(grouped.loss_trace, whole.loss_trace, rtol=1e-5)


def test_mala_under_graph_replay_matches_the_reference():
    kw = dict(num_chains=3, num_draws=12, epsilon=1e-3, nbeta=8.0, gamma=100.0, seed=5, progress=False, mala=True,
              device="cuda")
    model = TinyTransformer()
    g = llcfast.estimate_llc(model, token_loader(), token_loss, cuda_graphs=True, **kw)
    r = llcfast.estimate_llc(model, token_loader(), token_loss, backend="reference", **kw)
    assert g.config["cuda_graphs"] is True
    np.testing.assert_allclose(g.diagnostics["mala_acceptance_trace"], r.diagnostics["mala_acceptance_trace"],
                               atol=1e-3)


def test_checkpointed_run_plans_for_one_chain_per_pass_and_keeps_the_trajectory():
    kw = dict(num_chains=3, num_draws=8, epsilon=1e-3, nbeta=8.0, seed=3, progress=False, device="cuda")
    model = TinyTransformer()
    plain = llcfast.estimate_llc(model, token_loader(), token_loss, **kw)
    ckpt = llcfast.estimate_llc(model, token_loader(), token_loss, activation_checkpointing=True, **kw)
    assert ckpt.config["backend"] == "fast-sequential" and ckpt.config["memory_plan"]["chains_per_group"] == 3
    np.testing.assert_allclose(ckpt.loss_trace, plain.loss_trace, rtol=1e-4)


def test_interrupt_under_graph_replay_keeps_the_replayed_draws():
    model = TinyTransformer().cuda()
    kw = dict(num_chains=4, num_draws=12, num_burnin=2, epsilon=1e-3, nbeta=8.0, gamma=100.0, seed=7,
              progress=False, device="cuda", backend="fast", cuda_graphs=True)
    whole = llcfast.estimate_llc(model, token_loader(), token_loss, **kw)

    def stop_at_step_9(step, chains, loss, params):
        if step == 9:  # past the warm-up steps: steps 2..8 were replayed from the graph
            raise KeyboardInterrupt

    with pytest.raises(llcfast.LLCInterrupted) as info:
        llcfast.estimate_llc(model, token_loader(), token_loss, callbacks=[stop_at_step_9], **kw)
    part = info.value.result
    assert part.config["cuda_graphs"] is True
    assert part.loss_trace.shape == (4, 7)  # the draws at steps 2..8
    # Same steps; atomics in CUDA backward kernels may order sums differently.
    np.testing.assert_allclose(part.loss_trace, whole.loss_trace[:, :7], rtol=1e-5)
