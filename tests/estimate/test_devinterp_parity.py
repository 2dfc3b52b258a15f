"""The same numbers as devinterp 1.3.2, the sampler users compare against.

On one model, one loader in a fixed order and the same hyperparameters,
llcfast and devinterp's estimate_learning_coeff_with_summary differ only in
their Gaussian noise: every chain sees the same batches in both, so the
per-chain LLCs of each are independent draws of one distribution, and the
two means must agree within their combined standard error. So must the MALA
acceptance rates, and the first draw (the loss at w* on the first batch) and
the init loss must agree to fp32 rounding. Settings: SGLD plain, with burn-in
and thinning, with gradient accumulation, restricted, with weight decay, in
a bounding box; RMSprop-SGLD; SGNHT (devinterp's SGNHT class, without
localization).
"""
import warnings

import numpy as np
import pytest
import torch

import llcfast
from llc_models import mlp, mse, regression_loader

pytest.importorskip("devinterp", reason="devinterp 1.3.2 (requirements-dev.txt) is the peer compared against")
from devinterp.slt.sampler import estimate_learning_coeff_with_summary  # noqa: E402

CHAINS, DRAWS = 24, 200  # 24 chains over 8 batches: the init loss takes the 8 once each, in both
Z_MAX = 4.0  # two-sided: a false alarm has odds of 1 in 16000 per comparison (nine here)


@pytest.fixture(scope="module")
def trained():
    model, loader = mlp(), regression_loader(n=256, batch_size=32)
    x, y = (torch.cat(t) for t in zip(*loader))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(400):  # full batch, to near a minimum, so the LLC is positive and the chains settle
        opt.zero_grad()
        mse(model, (x, y)).backward()
        opt.step()
    return model, loader


def devinterp_llc(model, loader, *, method, epsilon, nbeta, gamma=0.0, weight_decay=0.0, num_burnin=0,
                  steps_between_draws=1, grad_accum_steps=1, masks=None, mala=False, **method_kwargs):
    from devinterp.optim import SGLD, SGMCMC
    from devinterp.optim.sgnht import SGNHT  # the class: SGMCMC.sgnht in 1.3.2 is another update
    from devinterp.slt.mala import MalaAcceptanceRate
    if method == "sgld":
        cls, kw = SGLD, dict(localization=gamma, weight_decay=weight_decay, save_mala_vars=mala)
    elif method == "rmsprop_sgld":
        cls, kw = SGMCMC.rmsprop_sgld, dict(localization=gamma, weight_decay=weight_decay)
    else:
        cls, kw = SGNHT, {}
    callbacks = [MalaAcceptanceRate(num_chains=CHAINS, num_draws=DRAWS, nbeta=nbeta, learning_rate=epsilon,
                                    device="cpu")] if mala else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = estimate_learning_coeff_with_summary(
            model, loader, evaluate=mse, sampling_method=cls,
            optimizer_kwargs=dict(lr=epsilon, nbeta=nbeta, **kw, **method_kwargs), num_chains=CHAINS,
            num_draws=DRAWS, num_burnin_steps=num_burnin, num_steps_bw_draws=steps_between_draws,
            grad_accum_steps=grad_accum_steps,
            seed=list(range(CHAINS)), optimize_over_per_model_param=masks, callbacks=callbacks, verbose=False)
    return r


SGLD_KW = dict(epsilon=1e-3, gamma=100.0, nbeta=10.0, num_burnin=0)
# name: (llcfast's arguments, devinterp's); sampler hyperparameters as each library names them.
SETTINGS = {
    "plain": (SGLD_KW, dict(method="sgld", **SGLD_KW)),
    "burn-in, thinning": (dict(SGLD_KW, epsilon=3e-4, num_burnin=50, steps_between_draws=2),
                          dict(method="sgld", **dict(SGLD_KW, epsilon=3e-4, num_burnin=50, steps_between_draws=2))),
    "gradient accumulation": (dict(SGLD_KW, grad_accum_steps=2, num_burnin=10, steps_between_draws=3),
                              dict(method="sgld", **dict(SGLD_KW, grad_accum_steps=2, num_burnin=10,
                                                         steps_between_draws=3))),
    "restricted": (dict(SGLD_KW, restrict=True), dict(method="sgld", **SGLD_KW, masks=True)),
    "weight decay": (dict(SGLD_KW, weight_decay=1.0), dict(method="sgld", **SGLD_KW, weight_decay=1.0)),
    "bounding box": (dict(SGLD_KW, gamma=10.0, bounding_box=0.01),
                     dict(method="sgld", **dict(SGLD_KW, gamma=10.0), bounding_box_size=0.01)),
    "rmsprop_sgld": (dict(SGLD_KW, epsilon=1e-4, sampler="rmsprop_sgld", sampler_kwargs=dict(alpha=0.99, rms_eps=0.1)),
                     dict(method="rmsprop_sgld", **dict(SGLD_KW, epsilon=1e-4), alpha=0.99, eps=0.1)),
    "sgnht": (dict(epsilon=1e-4, gamma=0.0, nbeta=10.0, num_burnin=0, sampler="sgnht", sampler_kwargs=dict(diffusion=0.01)),
              dict(method="sgnht", epsilon=1e-4, nbeta=10.0, diffusion_factor=0.01)),
}


# The reference walks the fast engine's trajectory step for step (test_engine_agreement): one setting suffices.
CASES = [(name, "fast") for name in SETTINGS] + [("plain", "reference")]


@pytest.mark.parametrize("name,backend", CASES, ids=[f"{n}-{b}" for n, b in CASES])
def test_llc_agrees_with_devinterp_within_the_combined_standard_error(trained, name, backend):
    model, loader = trained
    ours_kw, their_kw = (dict(kw) for kw in SETTINGS[name])
    mala = name == "plain"
    if ours_kw.pop("restrict", None):
        g = torch.Generator().manual_seed(1)
        masks = {n: (torch.rand(p.shape, generator=g) < 0.5) if n == "0.weight" else torch.zeros(p.shape, dtype=bool)
                 for n, p in model.named_parameters()}
        ours_kw["restrict"], their_kw["masks"] = {"0.weight": masks["0.weight"]}, masks
    r = devinterp_llc(model, loader, mala=mala, **their_kw)
    theirs, their_trace = np.array([r[f"llc-chain/{c}"] for c in range(CHAINS)]), np.asarray(r["loss/trace"])
    ours = llcfast.estimate_llc(model, loader, mse, num_chains=CHAINS, num_draws=DRAWS, backend=backend, seed=3,
                                progress=False, mala=mala, draw_batches="step", **ours_kw)
    assert ours.config["num_init_batches"] == len(loader) < CHAINS
    # Same loss at w* on the first batch, and the same init loss (recovered from devinterp's chain values).
    if not ours_kw.get("num_burnin"):
        np.testing.assert_allclose(ours.loss_trace[:, 0], their_trace[:, 0], rtol=1e-5)  # fp32, other kernels
    their_init = their_trace.mean(1) - theirs / ours_kw["nbeta"]
    np.testing.assert_allclose(their_init, ours.init_loss, rtol=0, atol=2e-6)

    assert_same_mean(ours.llc_per_chain, theirs, "LLC")
    if mala:  # devinterp's first column is 0 for want of a previous step
        accept = np.asarray(r["mala_accept/trace"])[:, 1:].mean(1)
        assert_same_mean(ours.diagnostics["mala_acceptance_per_chain"], accept, "MALA acceptance")


def assert_same_mean(ours, theirs, what):
    se = np.sqrt((np.var(ours, ddof=1) + np.var(theirs, ddof=1)) / CHAINS)
    z = (np.mean(ours) - np.mean(theirs)) / se
    assert abs(z) < Z_MAX, f"{what}: llcfast {np.mean(ours):.4f} vs devinterp {np.mean(theirs):.4f} (SE {se:.4f})"
    assert Z_MAX * se < 0.25 * abs(np.mean(theirs))  # tight enough to catch a 25% disagreement


@pytest.mark.parametrize("accum", [1, 2])
def test_default_nbeta_is_devinterps(trained, accum):
    from devinterp.utils import default_nbeta
    model, loader = trained
    ours = llcfast.estimate_llc(model, loader, mse, num_chains=1, num_draws=1, grad_accum_steps=accum, progress=False, num_burnin=0, epsilon=1e-4)
    assert ours.config["nbeta"] == pytest.approx(float(default_nbeta(loader, grad_accum_steps=accum)), rel=1e-12)
