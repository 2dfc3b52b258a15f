"""llcfast.estimate_llc's behaviour around the sampling: bad input, loader
cycling, divergence, negative estimates, the sequential fallback for models
vmap cannot batch, precision, per-chain batches and the result it returns."""
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import llcfast
from llcfast import reference
from llcfast.engine.batches import ChainBatches, stack_batches
from llc_models import exact_sgld_llc, linear_problem, mlp, mse, regression_loader

pytestmark = pytest.mark.filterwarnings("ignore:the LLC estimate is negative")


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_chains=0), ValueError, "num_chains"),
    (dict(nbeta=0.0), ValueError, "nbeta must be > 0"),
    (dict(nbeta=-2.0), ValueError, "nbeta must be > 0"),
    (dict(epsilon=0.0), ValueError, "epsilon must be > 0"),
    (dict(backend="gpu"), ValueError, r"backend must be one of \('auto', 'fast', 'reference'\), got 'gpu'"),
    (dict(precision="fp16"), ValueError, r"precision must be one of \('fp32', 'tf32', 'bf16'\), got 'fp16'"),
    (dict(cuda_graphs="yes"), TypeError, "cuda_graphs must be True or False"),
    (dict(restrict={"weight": torch.ones(3)}), ValueError, "bool mask of shape"),
])
def test_bad_arguments_name_the_value_and_what_is_allowed(kwargs, exc, match):
    model, loader, _ = linear_problem(2)
    with pytest.raises(exc, match=match):
        llcfast.estimate_llc(model, loader, mse, progress=False, **kwargs)


def test_bad_loader_and_loss():
    model, loader, _ = linear_problem(2)
    with pytest.raises(ValueError, match="no batches"):
        llcfast.estimate_llc(model, [], mse, nbeta=1.0, progress=False, num_burnin=0, epsilon=1e-4, num_chains=4)
    with pytest.raises(ValueError, match="no batches"):
        llcfast.estimate_llc(model, [], mse, progress=False)  # the nbeta default needs a batch too
    with pytest.raises(ValueError, match="scalar tensor"):
        llcfast.estimate_llc(model, loader, lambda m, b: m(b[0]), nbeta=1.0, progress=False)
    with pytest.raises(ValueError, match="loss at w\\* is inf"):
        llcfast.estimate_llc(model, loader, lambda m, b: mse(m, b) * float("inf"), nbeta=1.0, progress=False)
    with pytest.raises(TypeError, match="no loss_fn was given"):
        llcfast.estimate_llc(model, loader, nbeta=1.0, progress=False)


@pytest.mark.parametrize("estimate", [llcfast.estimate_llc, reference.estimate_llc], ids=["fast", "reference"])
def test_loaders_that_cannot_be_passed_over_again_are_refused(estimate):
    model, loader, _ = linear_problem(2)
    batches = list(loader)
    for one_shot, kind in [((b for b in batches), "generator"), (iter(batches), "list_iterator")]:
        with pytest.raises(TypeError, match=rf"loader is a one-shot iterator \({kind}\).*list\(loader\)"):
            estimate(model, one_shot, mse, nbeta=1.0, progress=False, num_burnin=0, epsilon=1e-4, num_chains=4)
    with pytest.raises(TypeError, match=r"loader is a tensor of shape \(4, 2\)"):
        estimate(model, torch.zeros(4, 2), mse, nbeta=1.0, progress=False)
    with pytest.raises(TypeError, match="loader must be an iterable of batches.*got int"):
        estimate(model, 3, mse, nbeta=1.0, progress=False)
    x, y = torch.zeros(4, 2), torch.zeros(4)
    for one_batch in [(x, y), [x, y], (x, torch.zeros(4, 1))]:
        with pytest.raises(TypeError, match=r"tensors of shapes \(4, 2\), \(4.*looks like one batch.*\[\(x, y\)\]"):
            estimate(model, one_batch, mse, nbeta=1.0, progress=False)


@pytest.mark.parametrize("estimate", [llcfast.estimate_llc, reference.estimate_llc], ids=["fast", "reference"])
def test_a_restriction_that_selects_nothing_and_uncallable_callbacks_are_refused(estimate):
    model, loader, _ = linear_problem(2)
    names = [n for n, _ in model.named_parameters()]
    nothing = {names[0]: torch.zeros_like(model.get_parameter(names[0]), dtype=torch.bool)}
    for restrict, shown in [({}, r"restrict=\{\}"), ([], r"restrict=\[\]"), (nothing, rf"masks for \['{names[0]}'\]")]:
        with pytest.raises(ValueError, match=shown + " selects no parameter element"):
            estimate(model, loader, mse, nbeta=1.0, restrict=restrict, progress=False, num_burnin=0, epsilon=1e-4, num_chains=4)
    with pytest.raises(TypeError, match=r"callbacks\[1\] is 'log', which is not callable"):
        estimate(model, loader, mse, nbeta=1.0, callbacks=[print, "log"], progress=False)
    with pytest.raises(TypeError, match="callbacks must be a list of functions, got int"):
        estimate(model, loader, mse, nbeta=1.0, callbacks=3, progress=False)
    steps = []
    estimate(model, loader, mse, nbeta=1.0, num_chains=1, num_draws=3, num_burnin=0, epsilon=1e-4, progress=False,
             callbacks=lambda step, **_: steps.append(step))  # one function alone is taken as the list
    assert steps == [0, 1, 2]


@pytest.mark.parametrize("estimate", [llcfast.estimate_llc, reference.estimate_llc], ids=["fast", "reference"])
def test_a_draw_is_the_loss_of_the_last_step_of_each_interval(estimate):
    """devinterp 1.x's convention: burn-in 3, every 2 steps -> steps 4, 6, 8
    (3, 5, 7 would average other batches, and bias the LLC another way)."""
    model, loader = mlp(), regression_loader(n=64, batch_size=16)
    seen = {}

    def record(step, chains, loss, params):
        seen.setdefault(step, []).extend(loss.tolist() if loss.dim() else [loss.item()])
    res = estimate(model, loader, mse, num_chains=2, num_draws=3, num_burnin=3, steps_between_draws=2, nbeta=2.0,
                   progress=False, callbacks=[record], epsilon=1e-4, draw_batches="step")
    assert sorted(seen) == list(range(9))
    np.testing.assert_allclose(res.loss_trace, np.array([seen[t] for t in (4, 6, 8)]).T, rtol=1e-6)


@pytest.mark.parametrize("estimate", [llcfast.estimate_llc, reference.estimate_llc], ids=["fast", "reference"])
def test_active_dropout_is_named_in_a_warning_and_eval_mode_is_quiet(estimate, recwarn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.Dropout(0.1), nn.Tanh(), nn.Linear(12, 1))
    loader = regression_loader(n=64, batch_size=16)
    with pytest.warns(UserWarning, match=r"dropout is active \(1: the model is in train mode\).*model.eval\(\)"):
        estimate(model, loader, mse, nbeta=1.0, num_chains=1, num_draws=2, progress=False, num_burnin=0, epsilon=1e-4)
    recwarn.clear()
    estimate(model.eval(), loader, mse, nbeta=1.0, num_chains=1, num_draws=2, num_burnin=0, epsilon=1e-4,
             progress=False)
    assert not [w for w in recwarn if "dropout" in str(w.message)]


@pytest.mark.parametrize("device,match", [
    ("gpu", r"device='gpu' is not a device torch knows"),
    pytest.param("cuda", r"device='cuda', but torch sees no CUDA GPU", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a CUDA GPU is visible")),
    pytest.param("cuda:64", r"device='cuda:64', but torch sees \d+ CUDA GPU", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a visible CUDA GPU")]),
])
def test_unusable_devices_are_named(device, match):
    model, loader, _ = linear_problem(2)
    with pytest.raises(ValueError, match=match):
        llcfast.estimate_llc(model, loader, mse, nbeta=1.0, progress=False, device=device, num_burnin=0, epsilon=1e-4, num_chains=4)
    with pytest.raises(ValueError, match=match):
        llcfast.hessian_trace(model, mse, list(loader), num_probes=2, progress=False, device=device)


def test_non_float32_parameters_are_refused_by_name():
    model, loader, _ = linear_problem(2)
    model = model.double()
    with pytest.raises(TypeError, match=r"parameter 'weight' is torch.float64.*call model.float\(\) first"):
        llcfast.estimate_llc(model, [(x.double(), y.double()) for x, y in loader], mse, nbeta=1.0, progress=False, num_burnin=0, epsilon=1e-4, num_chains=4)


def test_short_loader_is_cycled_with_a_warning():
    loader = regression_loader(n=48, batch_size=16)  # 3 batches, 10 steps
    with pytest.warns(UserWarning, match="holds 3 batches but each chain takes 10 steps; it is cycled"):
        r = llcfast.estimate_llc(mlp(), loader, mse, num_chains=2, num_draws=10, nbeta=5.0, progress=False,
                                 num_burnin=0, epsilon=1e-4, draw_batches="step")
    assert np.isfinite(r.loss_trace).all()
    # Batches repeat with the loader's period: the losses at steps t and t + 3
    # are of the same batch at nearby weights.
    assert abs(r.loss_trace[0, 3] - r.loss_trace[0, 0]) < abs(r.loss_trace[0, 1] - r.loss_trace[0, 0]) + 0.05


class PoisonedPassLoader:
    """Pass p (iter call) is chain p - 3's (pass 0 reads the batch size for
    the nbeta check, pass 1 checks that the loss has a gradient, pass 2 is the
    loss at w*); the pass of chain ``bad_chain`` turns to NaN targets from
    step ``at``."""

    def __init__(self, steps, bad_chain, at):
        self.steps, self.bad_chain, self.at, self.passes = steps, bad_chain, at, 0
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 5, generator=g)

    def __len__(self):
        return self.steps

    def __iter__(self):
        poisoned = self.passes == self.bad_chain + 3
        self.passes += 1
        for t in range(self.steps):
            y = torch.sin(self.x.sum(-1))
            yield self.x, (y * float("nan") if poisoned and t >= self.at else y)


@pytest.mark.parametrize("estimate", [llcfast.estimate_llc, reference.estimate_llc], ids=["fast", "reference"])
def test_a_diverging_chain_is_reported_and_left_out(estimate):
    with pytest.warns(RuntimeWarning, match=r"chains \[1\] diverged"):
        r = estimate(mlp(), PoisonedPassLoader(30, bad_chain=1, at=12), mse, num_chains=3, num_draws=20,
                     num_burnin=10, nbeta=5.0, epsilon=1e-3, num_init_batches=1, progress=False,
                     draw_batches="step")
    assert r.diagnostics["diverged_chains"] == [1]
    assert math.isnan(r.llc_per_chain[1]) and np.isfinite(r.llc_per_chain[[0, 2]]).all()
    assert r.llc_mean == pytest.approx(np.mean(r.llc_per_chain[[0, 2]]))
    assert np.isfinite(r.loss_trace[1, :2]).all() and np.isnan(r.loss_trace[1, 2:]).all()


def test_all_chains_diverging_gives_nan_with_a_warning():
    model, loader, _ = linear_problem(2)
    with pytest.warns(RuntimeWarning, match="diverged"):
        r = llcfast.estimate_llc(model, loader, mse, num_chains=2, num_draws=200, epsilon=5.0, nbeta=50.0,
                                 progress=False, num_burnin=0)
    assert r.diagnostics["diverged_chains"] == [0, 1] and math.isnan(r.llc_mean)


def test_negative_llc_warns():
    model, loader, _ = linear_problem(2)
    with torch.no_grad():
        model.weight.add_(0.5)  # w* is no longer the minimum: the chains walk downhill
    with pytest.warns(RuntimeWarning, match="negative"):
        r = llcfast.estimate_llc(model, loader, mse, num_chains=2, num_draws=200, epsilon=1e-3, nbeta=50.0,
                                 gamma=1.0, progress=False, num_burnin=0)
    assert r.llc_mean < 0


class ParamBranch(nn.Module):
    """Control flow on the parameters' values: vmap cannot batch it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(5, 1)

    def forward(self, x):
        if self.lin.weight.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


def batchnorm_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).train()


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("make", [batchnorm_mlp, ParamBranch], ids=["batchnorm-train", "param-control-flow"])
def test_models_vmap_cannot_batch_fall_back_with_one_warning(make, accum):
    kw = dict(num_burnin=0, num_chains=3, num_draws=8, epsilon=1e-3, nbeta=10.0, seed=2, progress=False, grad_accum_steps=accum)
    with pytest.warns(RuntimeWarning, match="cannot be batched over chains") as caught:
        f = llcfast.estimate_llc(make(), regression_loader(), mse, **kw)
    assert sum("cannot be batched" in str(w.message) for w in caught) == 1
    assert f.config["backend"] == "fast-sequential"
    r = reference.estimate_llc(make(), regression_loader(), mse, **kw)
    np.testing.assert_allclose(f.loss_trace, r.loss_trace, rtol=1e-5)
    with pytest.raises(RuntimeError, match="backend='fast' cannot batch this model"):
        llcfast.estimate_llc(make(), regression_loader(), mse, backend="fast", **kw)


def test_the_users_model_is_left_untouched():
    model = batchnorm_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(RuntimeWarning):
        llcfast.estimate_llc(model, regression_loader(), mse, num_chains=2, num_draws=5, nbeta=10.0, progress=False, num_burnin=0, epsilon=1e-4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_each_chain_draws_its_own_batches_from_a_shuffling_loader():
    x = torch.arange(64.0)[:, None]
    loader = DataLoader(TensorDataset(x), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    feed = ChainBatches(loader, 3, torch.device("cpu"))
    batch, dims, per_chain = feed.next_stacked()
    assert dims == [0] and batch[0].shape == (3, 8, 1)
    assert not torch.equal(batch[0][0], batch[0][1])  # different orders, so different first batches
    assert all(torch.equal(batch[0][c], per_chain[c][0]) for c in range(3))


def test_identical_batches_are_shared_not_stacked():
    data = [(torch.randn(4, 5), torch.randn(4))]
    batch, dims, per_chain = ChainBatches(data, 3, torch.device("cpu")).next_stacked()
    assert dims == (None, None) and batch[0].shape == (4, 5) and len(per_chain) == 3


def test_stack_batches_refuses_mismatched_shapes():
    assert stack_batches([(torch.ones(2, 3),), (torch.ones(3, 3),)]) is None
    assert stack_batches([{"a": torch.ones(2)}, {"b": torch.ones(2)}]) is None
    stacked, dims = stack_batches([{"a": torch.ones(2), "k": 3}, {"a": torch.zeros(2), "k": 3}])
    assert stacked["a"].shape == (2, 2) and stacked["k"] == 3 and dims == {"a": 0, "k": None}


def test_bf16_forward_agrees_with_fp32_within_the_chains_error():
    model, loader, x = linear_problem(10)
    kw = dict(num_chains=16, num_draws=1000, num_burnin=300, epsilon=1e-3, gamma=1.0, nbeta=50.0,
              num_init_batches=1, seed=9, progress=False)
    full = llcfast.estimate_llc(model, loader, mse, precision="fp32", **kw)
    low = llcfast.estimate_llc(model, loader, mse, precision="bf16", **kw)
    assert low.config["precision"] == "bf16"
    se = math.hypot(full.llc_std, low.llc_std) / math.sqrt(16)
    assert abs(low.llc_mean - full.llc_mean) < 4 * se
    assert abs(full.llc_mean - exact_sgld_llc(x, 50.0, 1.0, 1e-3)) < 4 * full.llc_std / math.sqrt(16)


def test_result_carries_config_timings_and_diagnostics():
    r = llcfast.estimate_llc(mlp(), regression_loader(), mse, num_chains=2, num_draws=12, num_burnin=4,
                             steps_between_draws=3, nbeta=5.0, epsilon=1e-4, progress=False)
    assert r.loss_trace.shape == (2, 12) and r.llc_per_chain.shape == (2,)
    assert r.config["backend"] == "fast" and r.config["cuda_graphs"] is False
    assert r.config["num_burnin"] == 4 and r.config["steps_between_draws"] == 3
    assert {"setup_s", "sampling_s", "ms_per_chain_step", "total_s"} <= set(r.timings)
    assert r.diagnostics["grad_norm_sq_mean"].shape == (2,) and (r.diagnostics["noise_norm_sq_mean"] > 0).all()
    assert len(r.to_frame()) == 24 and r.to_dict()["config"]["precision"] == "fp32"


def test_reference_backend_through_the_public_api():
    model, loader, _ = linear_problem(2)
    kw = dict(num_burnin=0, num_chains=2, num_draws=30, epsilon=1e-3, nbeta=20.0, num_init_batches=1, progress=False)
    r = llcfast.estimate_llc(model, loader, mse, backend="reference", **kw)
    f = llcfast.estimate_llc(model, loader, mse, backend="fast", **kw)
    assert r.config["backend"] == "reference" and f.config["backend"] == "fast"
    np.testing.assert_allclose(f.loss_trace, r.loss_trace, rtol=1e-5)


def test_chain_chunks_walk_the_same_trajectory():
    kw = dict(num_burnin=0, num_chains=5, num_draws=10, epsilon=1e-3, nbeta=10.0, seed=4, progress=False)
    whole = llcfast.estimate_llc(mlp(), regression_loader(), mse, **kw)
    chunked = llcfast.estimate_llc(mlp(), regression_loader(), mse, chain_chunk=2, **kw)
    assert chunked.config["chain_chunk"] == 2
    np.testing.assert_allclose(chunked.loss_trace, whole.loss_trace, rtol=1e-5)
    with pytest.raises(ValueError, match="chain_chunk must be in"):
        llcfast.estimate_llc(mlp(), regression_loader(), mse, chain_chunk=0, **kw)
