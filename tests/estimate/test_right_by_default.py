"""The defaults give a number a user can trust, and every way the estimate
can be wrong that the tool can detect is named in the result: the loss at
w* without sampling error, the step-size rule where the chains went, the
slope at w*, and loud failures instead of silent ones.

Tolerances come from the chains' own spread (independent chains: the mean's
standard error is llc_std / sqrt(chains)); 4 of them is a 1-in-15000 false
alarm per comparison."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import llcfast
from llcfast.estimate.trust import safe_epsilon, top_eigenvalues
from llc_models import deep_linear_at_rank, mse, reduced_rank_at_zero


def agree(a, b, k=4.0):
    combined = math.sqrt(a.llc_se ** 2 + b.llc_se ** 2)
    assert abs(a.llc_mean - b.llc_mean) < k * combined, (a.llc_mean, b.llc_mean, combined)


def test_paired_and_exact_init_losses_agree_and_the_pairing_shows_its_error():
    """A 3-4-3 deep linear network at a rank-1 truth on 4000 samples in
    minibatches of 200, at nbeta = n / log n. A loader over a fixed set
    gets the exact loss at w*; the same data drawn with replacement is no
    fixed set and gets the paired loss. devinterp 1.x's estimate (one batch
    per chain) hides an error, nbeta times the init batches' spread, far
    above the chains' standard error."""
    model, x, y = deep_linear_at_rank(4000)
    data = TensorDataset(x, y)
    fixed = DataLoader(data, batch_size=200, shuffle=True)
    drawn = DataLoader(data, batch_size=200, sampler=RandomSampler(data, replacement=True, num_samples=4000))
    kw = dict(num_chains=8, num_draws=200, num_burnin=100, epsilon=2e-5, gamma=100.0, nbeta=4000 / math.log(4000),
              progress=False)
    with pytest.warns(UserWarning, match="heats the chains"):
        exact = llcfast.estimate_llc(model, fixed, mse, **kw)
        paired = llcfast.estimate_llc(model, drawn, mse, **kw)
        per_chain = llcfast.estimate_llc(model, fixed, mse, init_loss="batches", **kw)
    assert exact.config["init_loss"] == "exact" and exact.diagnostics["init_loss_method"] == "exact"
    assert paired.config["init_loss"] == "paired" and paired.init_trace.shape == paired.loss_trace.shape
    assert exact.diagnostics["llc_se_from_init_loss"] == 0.0 == paired.diagnostics["llc_se_from_init_loss"]
    agree(exact, paired)
    hidden = per_chain.diagnostics["llc_se_from_init_loss"]
    assert hidden > 5 * paired.llc_se, (hidden, paired.llc_se)
    # Its draws are exact's (same chains, same batches); only the subtracted loss differs, by far more than the
    # standard error shows.
    np.testing.assert_array_equal(per_chain.loss_trace, exact.loss_trace)
    assert abs(per_chain.llc_mean - exact.llc_mean) > 4 * exact.llc_se


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_paired_draws_subtract_the_loss_at_w_star_on_their_own_batch(backend):
    """Each draw's partner is the unmoved model on the same batch."""
    model, x, y = deep_linear_at_rank(400)
    data = TensorDataset(x, y)
    drawn = DataLoader(data, batch_size=40, sampler=RandomSampler(data, replacement=True, num_samples=400))
    r = llcfast.estimate_llc(model, drawn, mse, num_chains=2, num_draws=6, num_burnin=2, steps_between_draws=2,
                             epsilon=1e-4, gamma=100.0, nbeta=10.0, seed=5, progress=False, backend=backend,
                             draw_batches="step")
    batches = []
    llcfast.estimate_llc(model, drawn, lambda m, b: batches.append(b) or mse(m, b), num_chains=1, num_draws=6,
                         num_burnin=2, steps_between_draws=2, epsilon=1e-4, gamma=100.0, nbeta=10.0, seed=5,
                         progress=False, backend="reference", init_loss="batches", num_init_batches=1,
                         trust_checks=False, draw_batches="step")
    # The reference's chain 0 reads its batches in order after the init loss's one; draws are steps 3, 5, ...
    steps = batches[2:]  # the differentiability check and the init loss read the first two
    with torch.no_grad():
        want = [float(mse(model, steps[t])) for t in range(3, 14, 2)]
    np.testing.assert_allclose(r.init_trace[0], want, rtol=1e-6)
    per_chain = r.config["nbeta"] * (r.loss_trace - r.init_trace).mean(axis=1)
    np.testing.assert_allclose(r.llc_per_chain, per_chain, rtol=1e-9)


def test_the_step_size_check_fails_at_the_rule_from_w_star_and_passes_at_auto():
    """Reduced-rank regression (5, 4, 6) at BA = 0, a minimum where the
    Hessian vanishes: the rule at w* allows any epsilon up to 0.2 / gamma,
    the chains drift along the flat directions into curved regions, and the
    check at their end points fails, naming a safe epsilon. epsilon='auto'
    passes it, and agrees with a run at half its step."""
    model, x, y = reduced_rank_at_zero(1000)
    full = [(x, y)]
    nbeta, gamma = 1000 / math.log(1000), 10.0
    lam0 = float(top_eigenvalues(model, mse, full, None, restrict=None, precision="fp32", device="cpu")[0][0])
    kw = dict(num_chains=8, num_draws=200, num_burnin="auto", gamma=gamma, progress=False)
    naive = llcfast.estimate_llc(model, full, mse, epsilon=safe_epsilon(nbeta, gamma, lam0), **kw)
    check = naive.diagnostics["step_check"]
    assert lam0 < 1e-6 < 0.1 < check["step_rule"]
    assert dict((n, ok) for n, ok, _ in naive.checks())["step_size"] is False
    assert f"lower epsilon to {check['safe_epsilon']:.2g}" in naive.summary()
    assert "fix the step_size CHECK" in naive.verdict()
    auto = llcfast.estimate_llc(model, full, mse, epsilon="auto", **kw)
    assert auto.diagnostics["step_check"]["step_rule"] <= 0.1
    assert auto.config["epsilon"] < check["safe_epsilon"] * 1.5 and len(auto.config["epsilon_auto"]) >= 2
    assert auto.config["num_burnin"] == math.ceil(2 / (auto.config["epsilon"] * gamma))
    assert auto.timings["epsilon_auto_s"] > 0
    half = llcfast.estimate_llc(model, full, mse, epsilon=auto.config["epsilon"] / 2, **kw)
    agree(auto, half)


def test_an_untrained_checkpoint_is_named_not_a_minimum():
    torch.manual_seed(0)
    _, x, y = deep_linear_at_rank(1000)
    untrained = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 3, bias=False))
    r = llcfast.estimate_llc(untrained, [(x, y)], mse, num_chains=4, num_draws=50, epsilon=1e-4, gamma=100.0,
                             progress=False, num_burnin=0)
    checks = {n: ok for n, ok, _ in r.checks()}
    assert checks["gradient"] is False and "w* is not a minimum" in r.summary()
    assert r.verdict() == "verdict: not yet trustworthy; fix the gradient CHECK above first"
    trained, x, y = deep_linear_at_rank(1000)
    fine = llcfast.estimate_llc(trained, [(x, y)], mse, num_chains=4, num_draws=50, epsilon=1e-4, gamma=100.0,
                                num_burnin=0, progress=False)
    assert {n: ok for n, ok, _ in fine.checks()}["gradient"] is True


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_a_loss_with_no_gradient_path_raises_in_both_backends(backend):
    model, x, y = deep_linear_at_rank(200)

    def detached(m, batch):
        return mse(m, batch).detach()

    with pytest.raises(ValueError, match="loss_fn's loss has no gradient path to the model's parameters"):
        llcfast.estimate_llc(model, [(x, y)], detached, num_draws=5, nbeta=10.0, progress=False, backend=backend)


class BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.bn, self.out = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.bn(self.lin(x)))).squeeze(-1)


@pytest.mark.parametrize("which", ["trace", "eigs", "spectrum"])
def test_hessian_functions_leave_the_users_model_bit_for_bit_untouched(which):
    torch.manual_seed(0)
    model = BatchNormNet()
    x = torch.randn(32, 4)
    batches = [(x, x.sum(-1))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    call = {"trace": lambda m: llcfast.hessian_trace(m, mse, batches, num_probes=4, progress=False),
            "eigs": lambda m: llcfast.hessian_eigs(m, mse, batches, max_iter=8, progress=False),
            "spectrum": lambda m: llcfast.hessian_spectrum(m, mse, batches, num_runs=2, num_steps=4,
                                                           progress=False)}[which]
    with pytest.raises(ValueError, match=r"batch norm in train mode \(bn\).*call model.eval\(\)"):
        call(model)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unconverged eigenvalue's warning is not this test's subject
        call(model)
    after = model.state_dict()
    assert model.training is False
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # running statistics and num_batches_tracked included


def test_unconverged_lanczos_warns_with_its_residual():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 40, generator=g) * torch.linspace(0.5, 2.0, 40)  # a spread of eigenvalues
    model = nn.Linear(40, 1, bias=False)
    batches = [(x, torch.randn(400, generator=g))]
    with pytest.warns(RuntimeWarning, match=r"Lanczos stopped at max_iter=3 before every wanted eigenvalue "
                                            r"converged \(largest residual .* raise max_iter"):
        llcfast.hessian_eigs(model, mse, batches, k=2, max_iter=3, tol=1e-8, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llcfast.hessian_eigs(model, mse, batches, k=1, max_iter=40, tol=1e-6, progress=False)


def test_auto_values_are_checked_by_name():
    model, x, y = deep_linear_at_rank(200)
    with pytest.raises(ValueError, match="epsilon must be a number or 'auto', got 'fast'"):
        llcfast.estimate_llc(model, [(x, y)], mse, epsilon="fast", nbeta=10.0, progress=False, num_burnin=0, num_chains=4)
    with pytest.raises(ValueError, match="num_burnin='auto' needs gamma > 0"):
        llcfast.estimate_llc(model, [(x, y)], mse, num_burnin="auto", gamma=0.0, nbeta=10.0, progress=False)
    with pytest.raises(ValueError, match=r"init_loss must be one of \('auto', 'exact', 'paired', 'batches'\)"):
        llcfast.estimate_llc(model, [(x, y)], mse, init_loss="devinterp", nbeta=10.0, progress=False)
    with pytest.raises(ValueError, match="does not go with init_loss='paired'"):
        llcfast.estimate_llc(model, [(x, y)], mse, init_loss="paired", num_init_batches=2, nbeta=10.0,
                             progress=False)


def regular_quadratic(n=1000, d=3):
    """Least squares at its minimum, full batch: each eigenmode s of X^T X / n
    contributes nbeta s / (2 nbeta s + gamma) exactly."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, generator=g) + 0.5 * torch.randn(n, generator=g)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution.T)
    return model, [(x, y)], torch.linalg.eigvalsh((x.T @ x / n).double())


def test_gamma_auto_halves_until_neighbours_agree_and_lands_on_the_exact_value_at_its_gamma():
    model, full, s = regular_quadratic()
    r = llcfast.estimate_llc(model, full, mse, gamma="auto", num_chains=16, num_draws=200, nbeta=20.0,
                             progress=False)
    ladder = r.config["gamma_auto"]
    assert [rung["gamma"] for rung in ladder] == [100.0 / 2 ** i for i in range(len(ladder))]
    last, before = ladder[-1], ladder[-2]
    assert abs(before["llc_mean"] - last["llc_mean"]) <= math.hypot(before["llc_se"], last["llc_se"])
    for a, b in zip(ladder[:-2], ladder[1:-1]):  # every earlier pair disagreed
        assert abs(a["llc_mean"] - b["llc_mean"]) > math.hypot(a["llc_se"], b["llc_se"])
    assert r.config["gamma"] == before["gamma"] and r.llc_mean == before["llc_mean"]
    exact = float((20.0 * s / (2 * 20.0 * s + r.config["gamma"])).sum())
    assert abs(r.llc_mean - exact) < 4 * r.llc_se
    assert r.timings["gamma_auto_s"] > 0
    with pytest.raises(ValueError, match="gamma must be a number or 'auto', got 'small'"):
        llcfast.estimate_llc(model, full, mse, gamma="small", progress=False)


def test_the_reference_runs_the_same_auto_procedure():
    model, full, _ = regular_quadratic()
    kw = dict(num_chains=4, num_draws=50, nbeta=20.0, gamma=10.0, progress=False)
    fast = llcfast.estimate_llc(model, full, mse, backend="fast", **kw)
    ref = llcfast.reference.estimate_llc(model, full, mse, **kw)
    assert ref.config["epsilon"] == pytest.approx(fast.config["epsilon"], rel=1e-3)
    assert ref.config["num_burnin"] == fast.config["num_burnin"] == math.ceil(2 / (ref.config["epsilon"] * 10.0))
    assert len(ref.config["epsilon_auto"]) == len(fast.config["epsilon_auto"])
    np.testing.assert_allclose(ref.llc_per_chain, fast.llc_per_chain, rtol=1e-3, atol=1e-3)


def test_auto_epsilon_recovers_from_pilots_that_diverge():
    """f = a b x at a = b = 0: the Hessian vanishes at w*, the rule there
    allows a step that sends every pilot chain off; the pilots cut it and
    measure again, and the run's own check holds."""
    from llc_models import TwoParam, orthogonal_noise_data
    x, y = orthogonal_noise_data(1000)
    r = llcfast.estimate_llc(TwoParam(1), [(x.float(), y.float())], mse, gamma=1.0, num_draws=100, progress=False)
    pilots = r.config["epsilon_auto"]
    assert pilots[0]["lambda_max"] == pytest.approx(0.0, abs=1e-6)
    assert any("diverged_chains" in p for p in pilots) and "lambda_max" in pilots[-1]
    assert r.diagnostics["diverged_chains"] == [] and r.diagnostics["step_check"]["step_rule"] <= 0.1


def test_calibrate_names_the_gamma_whose_estimate_halving_no_longer_moves():
    from llcfast.pipeline.calibrate import gamma_agreement
    row = dict(sampler="sgld", nbeta=10.0, epsilon=1e-3, flags=[], llc_se=0.1)
    rows = [dict(row, gamma=g, llc_mean=v) for g, v in [(100, 2.0), (50, 3.0), (25, 3.6), (12.5, 3.7)]]
    assert gamma_agreement(rows).startswith("25, whose LLC 3.6 agrees with gamma 12.5's 3.7")
    rows.append(dict(row, gamma=25, epsilon=1e-4, llc_mean=3.2))  # the smaller epsilon speaks for gamma 25
    assert gamma_agreement(rows).startswith("no two neighbouring gammas agree (down to 12.5)")


def test_wbic_averages_enough_micro_batches_not_to_heat_the_chains():
    from llcfast.engine.common import HOT_NBETA, cool_accumulation
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 3, generator=g)
    y = x.sum(1) + 0.5 * torch.randn(4000, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True)
    nbeta = 4000 / math.log(4000)
    k = cool_accumulation(nbeta, loader)
    assert nbeta <= HOT_NBETA * 100 * k / math.log(100 * k) and nbeta > HOT_NBETA * 100 * (k - 1) / math.log(
        100 * (k - 1))
    assert cool_accumulation(nbeta, [(x, y)]) == 1  # full batch: no minibatch noise
    assert cool_accumulation(1e9, DataLoader(TensorDataset(x, y), batch_size=1000)) == 4  # at most one epoch
    model = nn.Linear(3, 1, bias=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no heating warning
        r = llcfast.estimate_wbic(model, loader, mse, num_samples=4000, num_chains=2, num_draws=5, epsilon=1e-4,
                                  num_burnin=0, progress=False)
    assert r.config["grad_accum_steps"] == k


def test_more_chains_than_the_cpu_can_hold_is_a_guided_memory_error():
    model = nn.Linear(1000, 1000)
    x = torch.randn(4, 1000)
    with pytest.raises(MemoryError, match=r"ran out of device memory \(.*can't allocate memory.*\); set chain_group"):
        llcfast.estimate_llc(model, [(x, x)], lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), num_chains=10 ** 7,
                             num_draws=1, num_burnin=0, epsilon=1e-4, nbeta=1.0, progress=False, trust_checks=False)
