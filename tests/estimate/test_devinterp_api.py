"""llcfast.devinterp: devinterp 1.3.2's call, run by llcfast.

The translation is checked without devinterp: the shim must give bit for bit
what llcfast.estimate_llc gives on the arguments it maps to. Beside devinterp
(when installed), its result must have devinterp's keys, shapes and dtypes,
and the same LLC within the two runs' combined standard error.
"""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import llcfast
from llcfast.devinterp import estimate_learning_coeff, estimate_learning_coeff_with_summary as summary
from llc_models import mlp, mse, regression_loader

CHAINS, DRAWS = 4, 30
SGLD_KW = dict(lr=1e-3, localization=100.0, nbeta=10.0)


@pytest.fixture(scope="module")
def trained():
    model, loader = mlp(), regression_loader(n=256, batch_size=32)
    x, y = (torch.cat(t) for t in zip(*loader))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(400):  # near a minimum, so the LLC is positive and the chains settle
        opt.zero_grad()
        mse(model, (x, y)).backward()
        opt.step()
    return model, loader


def shim(model, loader, **kw):
    kw = dict(dict(evaluate=mse, optimizer_kwargs=SGLD_KW, num_chains=CHAINS, num_draws=DRAWS, seed=3,
                   verbose=False), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the loader is cycled
        return summary(model, loader, **kw)


def direct(model, loader, **kw):
    kw = dict(dict(num_burnin=0, num_chains=CHAINS, num_draws=DRAWS, seed=3, progress=False, epsilon=1e-3, gamma=100.0,
                   nbeta=10.0, num_init_batches=CHAINS, draw_batches="step"), **kw)  # the shim's draws
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return llcfast.estimate_llc(model, loader, mse, **kw)


class _SGMCMC:  # devinterp's factory class, as the shim sees it: by its name
    @classmethod
    def sgld(cls, params, **kw):
        pass

    @classmethod
    def rmsprop_sgld(cls, params, **kw):
        pass

    @classmethod
    def sgnht(cls, params, **kw):
        pass


_SGMCMC.__name__ = "SGMCMC"

MAPPED = {  # (sampling_method, devinterp's optimizer_kwargs, extra devinterp arguments) -> estimate_llc's
    "sgld by name": (("sgld", SGLD_KW, {}), {}),
    "SGMCMC.sgld, burn-in, thinning, weight decay": (
        (_SGMCMC.sgld, dict(SGLD_KW, weight_decay=0.5, noise_level=0.9), dict(num_burnin_steps=5,
                                                                             num_steps_bw_draws=2)),
        dict(weight_decay=0.5, noise_scale=0.9, num_burnin=5, steps_between_draws=2)),
    "rmsprop, box": ((_SGMCMC.rmsprop_sgld, dict(SGLD_KW, alpha=0.9, eps=0.2, bounding_box_size=0.05), {}),
                     dict(sampler="rmsprop_sgld", sampler_kwargs=dict(alpha=0.9, rms_eps=0.2), bounding_box=0.05)),
    "SGNHT class": (("sgnht", dict(lr=1e-4, nbeta=10.0, diffusion_factor=0.02), {}),
                    dict(epsilon=1e-4, gamma=0.0, sampler="sgnht", sampler_kwargs=dict(diffusion=0.02))),
    "temperature, grad accumulation": (("sgld", dict(lr=1e-3, localization=100.0, temperature=10.0),
                                        dict(grad_accum_steps=2)),
                                       dict(grad_accum_steps=2, num_init_batches=2 * CHAINS)),
}


@pytest.mark.parametrize("name", list(MAPPED))
def test_the_shim_is_estimate_llc_on_the_mapped_arguments(trained, name):
    (method, opt_kw, extra), ours_kw = MAPPED[name]
    got = shim(*trained, sampling_method=method, optimizer_kwargs=opt_kw, **extra)
    want = direct(*trained, **ours_kw)
    np.testing.assert_array_equal(got["loss/trace"], want.loss_trace.astype(np.float32))
    assert got["llc/mean"] == want.llc_mean and got["llc/std"] == want.llc_std
    assert [got[f"llc-chain/{c}"] for c in range(CHAINS)] == list(want.llc_per_chain)
    assert got.result.config["sampler"] == want.config["sampler"]


def test_devinterps_defaults_lr_and_no_localization(trained):
    got = shim(*trained, optimizer_kwargs=dict(nbeta=10.0), num_draws=3)
    assert got.result.config["epsilon"] == 0.01 and got.result.config["gamma"] == 0.0
    default = shim(*trained, optimizer_kwargs={}, num_draws=3)
    assert default.result.config["nbeta"] == pytest.approx(32 / np.log(32))  # m / log m, batch 32


def test_online_results_are_per_draw_llcs(trained):
    got = shim(*trained, online=True)
    r = got.result
    assert set(got) == {"init_loss", "llc/means", "llc/stds", "llc/trace", "loss/trace"}
    llcs = 10.0 * (r.loss_trace - r.init_loss)
    np.testing.assert_allclose(got["llc/trace"], llcs, rtol=1e-6)
    np.testing.assert_allclose(got["llc/means"], llcs.mean(0), rtol=1e-5)
    np.testing.assert_allclose(got["llc/stds"], llcs.std(0, ddof=1), rtol=1e-5)
    assert got["llc/means"].mean() == pytest.approx(r.llc_mean, rel=1e-5)


def test_a_given_init_loss_is_the_one_subtracted(trained):
    got = shim(*trained, init_loss=0.01)
    r = got.result
    np.testing.assert_allclose(r.llc_per_chain, 10.0 * (r.loss_trace.mean(1) - 0.01))
    assert r.init_loss == 0.01 and r.config["init_loss_given"]
    assert "init_loss_per_batch" not in r.diagnostics
    with pytest.warns(RuntimeWarning, match="against the given init_loss"):
        summary(trained[0], trained[1], evaluate=mse, optimizer_kwargs=SGLD_KW, num_chains=2, num_draws=3,
                init_loss=10.0, verbose=False)


def test_seeds_a_list_is_one_run_and_none_follows_torchs_generator(trained):
    a = shim(*trained, seed=[1, 2, 3, 4])["llc/mean"]
    assert shim(*trained, seed=[1, 2, 3, 4])["llc/mean"] == a
    assert shim(*trained, seed=[4, 3, 2, 1])["llc/mean"] != a
    torch.manual_seed(11)
    b = shim(*trained, seed=None)["llc/mean"]
    torch.manual_seed(11)
    assert shim(*trained, seed=None)["llc/mean"] == b
    assert shim(*trained, seed=np.arange(1, 5))["llc/mean"] == a  # numpy integers, as devinterp takes
    assert shim(*trained, seed=np.int64(3))["llc/mean"] == shim(*trained, seed=3)["llc/mean"]
    with pytest.raises(ValueError, match="one per chain: 4 chains, got 2 seeds"):
        shim(*trained, seed=[1, 2])
    with pytest.raises(TypeError, match=r"seed\[1\] must be an int >= 0, got 2.5"):
        shim(*trained, seed=[1, 2.5, 3, 4])


class _ModeProbe(nn.Module):
    modes = set()  # a class attribute: the chains run on copies of the model

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 1)

    def forward(self, x):
        self.modes.add(self.training)
        return self.lin(x)


def test_runs_in_train_mode_as_devinterp_and_restores_the_mode():
    model = _ModeProbe().eval()
    shim(model, regression_loader(), num_draws=2, backend="reference")
    assert _ModeProbe.modes == {True} and not model.training


@pytest.mark.parametrize("init_loss", [None, 0.01])
def test_dropout_is_said_once_with_the_way_out(init_loss):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.1), nn.Tanh(), nn.Linear(8, 1)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary(model, regression_loader(), evaluate=mse, optimizer_kwargs=SGLD_KW, num_chains=2, num_draws=4,
                init_loss=init_loss, verbose=False)
    said = [str(w.message) for w in caught if "dropout" in str(w.message)]
    assert len(said) == 1 and "llcfast.estimate_llc on model.eval()" in said[0] and "(1)" in said[0]


@pytest.mark.parametrize("wrap", [lambda loss: loss, lambda loss: (loss, {"out": 1}), lambda loss: {"loss": loss},
                                  lambda loss: type("Out", (), {"loss": loss})()],
                         ids=["tensor", "tuple", "dict", "attribute"])
def test_evaluate_may_return_what_devinterp_accepts(trained, wrap):
    got = shim(*trained, evaluate=lambda m, b: wrap(mse(m, b)), backend="reference")
    want = shim(*trained, backend="reference")
    assert got["llc/mean"] == want["llc/mean"]


def test_estimate_learning_coeff_is_the_summarys_mean(trained):
    kw = dict(evaluate=mse, optimizer_kwargs=SGLD_KW, num_chains=2, num_draws=5, seed=0, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert estimate_learning_coeff(*trained, **kw) == summary(*trained, **kw)["llc/mean"]


class MalaAcceptanceRate:  # devinterp's callback, recognised by its name
    pass


class NormCallback:
    pass


def test_mala_callback_adds_devinterps_keys(trained):
    got = shim(*trained, callbacks=[MalaAcceptanceRate()])
    trace = got["mala_accept/trace"]
    assert trace.shape == (CHAINS, DRAWS - 1) and ((trace >= 0) & (trace <= 1)).all()
    assert got["mala_accept/mean"] == pytest.approx(got.result.diagnostics["mala_acceptance"], rel=1e-6)


BAD = [
    (dict(optimizer_kwargs=dict(lr=1e-3, nbeta=1.0, temperature=1.0)), ValueError, "both temperature and nbeta"),
    (dict(optimizer_kwargs=dict(lr=1e-3, momentum=0.9)), ValueError, r"'momentum' is not an argument of sgld; allowed"),
    (dict(optimizer_kwargs=dict(lr=-1.0)), ValueError, r"optimizer_kwargs\['lr'\] must be > 0, got -1.0"),
    (dict(optimizer_kwargs=dict(lr=1e-3, localization=-1.0)), ValueError, r"\['localization'\] must be >= 0.0"),
    (dict(sampling_method="sgnht", optimizer_kwargs=dict(localization=1.0)), ValueError,
     "'localization' is not an argument of sgnht"),
    (dict(sampling_method=_SGMCMC.rmsprop_sgld, optimizer_kwargs=dict(add_grad_correction=True)), ValueError,
     "add_grad_correction"),
    (dict(sampling_method=_SGMCMC.sgnht), ValueError, "SGMCMC.sgnht is another update"),
    (dict(sampling_method=torch.optim.SGD), ValueError, "sampling_method must be devinterp's SGLD"),
    (dict(optimizer_kwargs=dict(optimize_over=[])), ValueError, "optimize_over_per_model_param"),
    (dict(gpu_idxs=[0, 1]), ValueError, "torchrun"),
    (dict(callbacks=[NormCallback()]), ValueError, r"callbacks\[0\] is a NormCallback"),
    (dict(evaluate=lambda m, b: 1.0), TypeError, "evaluate must return a loss tensor"),
    (dict(num_steps_bw_draws=0), ValueError, "num_steps_bw_draws must be in"),
    (dict(epsilon=1e-3), ValueError, r"\['epsilon'\] are set from devinterp's arguments"),
    (dict(use_amp=True, precision="bf16"), ValueError, "either use_amp or precision"),
]


@pytest.mark.parametrize("kw,error,match", BAD, ids=[m.split("'")[0][:30] for _, _, m in BAD])
def test_bad_input_names_the_devinterp_argument(trained, kw, error, match):
    with pytest.raises(error, match=match):
        shim(*trained, **kw)


def test_use_amp_on_a_cpu_is_ignored_as_in_devinterp(trained):
    with pytest.warns(UserWarning, match="use_amp=True is ignored on a CPU"):
        got = summary(*trained, evaluate=mse, optimizer_kwargs=SGLD_KW, num_chains=2, num_draws=2, use_amp=True,
                      verbose=False)
    assert got.result.config["precision"] == "fp32"


def test_beside_devinterp_same_keys_shapes_and_llc(trained):
    pytest.importorskip("devinterp", reason="devinterp 1.3.2 (requirements-dev.txt) is the peer compared against")
    from devinterp.optim import SGLD
    from devinterp.slt.mala import MalaAcceptanceRate as Mala
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary as theirs
    chains, draws = 16, 100
    kw = dict(evaluate=mse, sampling_method=SGLD, optimizer_kwargs=dict(SGLD_KW, save_mala_vars=True),
              num_chains=chains, num_draws=draws, num_burnin_steps=20, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mala = Mala(num_chains=chains, num_draws=draws, nbeta=10.0, learning_rate=1e-3, device="cpu")
        r_theirs = theirs(*trained, callbacks=[mala], seed=list(range(chains)), **kw)
        r_ours = summary(*trained, callbacks=[MalaAcceptanceRate()], seed=list(range(chains)), **kw)
        online = [f(*trained, online=True, seed=0, **kw) for f in (theirs, summary)]
    assert list(r_ours) == list(r_theirs) and list(online[1]) == list(online[0])
    for key, value in [*r_theirs.items(), *online[0].items()]:
        mine = (r_ours if key in r_ours else online[1])[key]
        assert type(mine) is type(value) or isinstance(mine, float) and isinstance(value, float), key
        if isinstance(value, np.ndarray) and key != "mala_accept/trace":  # ours: one value per step, no lead 0
            assert mine.shape == value.shape and mine.dtype == value.dtype, key
    ours_c = np.array([r_ours[f"llc-chain/{c}"] for c in range(chains)])
    theirs_c = np.array([r_theirs[f"llc-chain/{c}"] for c in range(chains)])
    se = np.sqrt((ours_c.var(ddof=1) + theirs_c.var(ddof=1)) / chains)
    assert abs(ours_c.mean() - theirs_c.mean()) < 4 * se < 0.25 * theirs_c.mean()  # 4 SE: 1 in 16000 by chance
    assert online[1]["init_loss"] == pytest.approx(online[0]["init_loss"], rel=1e-6)  # same 16 batches at w*


def test_devinterps_epsilon_beta_analyzer_takes_the_shim(trained):
    pytest.importorskip("devinterp", reason="devinterp 1.3.2 (requirements-dev.txt) is the peer compared against")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vis_utils warns when plotly is missing
        from devinterp.vis_utils import EpsilonBetaAnalyzer
    model, loader = trained

    def estimator(epsilon, beta, **kw):  # the estimator devinterp's docs show, with llcfast's import
        return summary(model, loader, evaluate=mse, optimizer_kwargs=dict(lr=epsilon, nbeta=beta, localization=100.0),
                       online=True, **kw)

    analyzer = EpsilonBetaAnalyzer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it says that its default epsilon bounds give way to the range
        analyzer.configure_sweep(llc_estimator=estimator, llc_estimator_kwargs=dict(num_chains=2, num_draws=10,
                                                                                    seed=0, verbose=False),
                                 epsilon_range=[1e-4, 1e-3], beta_range=[5.0, 10.0])
        analyzer.sweep()
    df = analyzer.sweep_df
    assert len(df) == 4 and sorted(zip(df["epsilon"], df["beta"])) == [(1e-4, 5.0), (1e-4, 10.0), (1e-3, 5.0),
                                                                       (1e-3, 10.0)]
    assert all(t.shape == (2, 10) and np.isfinite(t).all() for t in df["llc/trace"])
