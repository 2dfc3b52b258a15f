"""The same numbers as devinterp 1.3.2, the sampler users compare against.

On one model, one loader in a fixed order and the same hyperparameters,
llcfast and devinterp's estimate_learning_coeff_with_summary differ only in
their Gaussian noise: every chain sees the same batches in both, so the
per-chain LLCs of each are independent draws of one distribution, and the
two means must agree within their combined standard error. The first draw
(the loss at w* on the first batch) and the init loss must agree exactly.
"""
import warnings

import numpy as np
import pytest
import torch

import llcfast
from llc_models import mlp, mse, regression_loader

pytest.importorskip("devinterp", reason="devinterp 1.3.2 (requirements-dev.txt) is the peer compared against")
from devinterp.optim import SGLD  # noqa: E402
from devinterp.slt.sampler import estimate_learning_coeff_with_summary  # noqa: E402

CHAINS, DRAWS = 24, 200  # 24 chains over 8 batches: the init loss takes the 8 once each, in both
Z_MAX = 4.0  # two-sided, four comparisons: a false alarm has odds below 1 in 4000


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


def devinterp_llc(model, loader, *, epsilon, gamma, nbeta, num_burnin=0, steps_between_draws=1, masks=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = estimate_learning_coeff_with_summary(
            model, loader, evaluate=mse, sampling_method=SGLD,
            optimizer_kwargs=dict(lr=epsilon, localization=gamma, nbeta=nbeta), num_chains=CHAINS, num_draws=DRAWS,
            num_burnin_steps=num_burnin, num_steps_bw_draws=steps_between_draws, seed=list(range(CHAINS)),
            optimize_over_per_model_param=masks, verbose=False)
    per_chain = np.array([r[f"llc-chain/{c}"] for c in range(CHAINS)])
    return per_chain, np.asarray(r["loss/trace"])


SETTINGS = {
    "plain": dict(epsilon=1e-3, gamma=100.0, nbeta=10.0),
    "burn-in, thinning": dict(epsilon=3e-4, gamma=100.0, nbeta=10.0, num_burnin=50, steps_between_draws=2),
    "restricted": dict(epsilon=1e-3, gamma=100.0, nbeta=10.0, restrict="first layer"),
}


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_llc_agrees_with_devinterp_within_the_combined_standard_error(trained, name, backend):
    if backend == "reference" and name != "plain":
        pytest.skip("the reference walks the fast engine's trajectory step for step (test_engine_agreement)")
    model, loader = trained
    kw = dict(SETTINGS[name])
    masks = None
    if kw.pop("restrict", None):
        g = torch.Generator().manual_seed(1)
        masks = {n: (torch.rand(p.shape, generator=g) < 0.5) if n == "0.weight" else torch.zeros(p.shape, dtype=bool)
                 for n, p in model.named_parameters()}
    theirs, their_trace = devinterp_llc(model, loader, masks=masks, **kw)
    ours = llcfast.estimate_llc(model, loader, mse, num_chains=CHAINS, num_draws=DRAWS, backend=backend, seed=3,
                                progress=False, restrict={"0.weight": masks["0.weight"]} if masks else None, **kw)
    assert ours.config["num_init_batches"] == len(loader) < CHAINS
    # Same loss at w* on the first batch, and the same init loss (recovered from devinterp's chain values).
    if not kw.get("num_burnin"):
        np.testing.assert_allclose(ours.loss_trace[:, 0], their_trace[:, 0], rtol=1e-5)  # fp32, other kernels
    their_init = their_trace.mean(1) - theirs / kw["nbeta"]
    np.testing.assert_allclose(their_init, ours.init_loss, rtol=0, atol=2e-6)

    se = np.sqrt((ours.llc_per_chain.var(ddof=1) + theirs.var(ddof=1)) / CHAINS)
    z = (ours.llc_mean - theirs.mean()) / se
    assert abs(z) < Z_MAX, f"llcfast {ours.llc_mean:.4f} vs devinterp {theirs.mean():.4f} (SE {se:.4f}, z {z:+.2f})"
    assert Z_MAX * se < 0.2 * abs(theirs.mean())  # tight enough to catch a 20% disagreement
