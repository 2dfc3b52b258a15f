"""RMSprop-SGLD and SGNHT fused steps (and the bounding box of all three
samplers): kernels == pure-torch twins step for step, on CPU and, where
built, CUDA; the updates equal their defining formulas in float64."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from llcfast import ops, reference
from conftest import requires_extension
from sample_inputs import AWKWARD_SHAPES

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
shape_st = st.sampled_from(AWKWARD_SHAPES)


def make_state(sampler, shapes, chains, *, seed, masked, explicit_noise, stats, box, device):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda shape, scale=1.0: (scale * torch.randn(shape, generator=gen)).to(device)  # noqa: E731
    full = [(chains,) + tuple(s) for s in shapes]
    case = dict(
        params=[rnd(s) for s in full], grads=[rnd(s, 5.0) for s in full], centers=[rnd(tuple(s)) for s in shapes],
        masks=[(torch.rand(tuple(s), generator=gen) > 0.4).to(device) for s in shapes] if masked else None,
        noise=[rnd(s) for s in full] if explicit_noise else None,
        stats=torch.zeros(chains, 3, dtype=torch.float64, device=device) if stats else None)
    hyper = dict(eps=1e-3, nbeta=20.0, gamma=50.0, weight_decay=0.01, bounding_box=box, seed=77 + seed,
                 chain_offset=2)
    if sampler == "rmsprop_sgld":
        case["square_avg"] = [rnd(s).abs() for s in full]
        hyper.update(alpha=0.9, rms_eps=0.1, noise_scale=1.0)
    elif sampler == "sgnht":
        case["momentum"] = [rnd(s, 0.03) for s in full]
        case["thermostat"] = (0.01 + 0.01 * torch.rand(chains, generator=gen)).to(device)
        hyper.update(diffusion=0.01)
    else:
        hyper.update(noise_scale=1.0)
    return case, hyper


def clone(case):
    return {k: (None if v is None else v.clone() if isinstance(v, torch.Tensor) else [t.clone() for t in v])
            for k, v in case.items()}


def run(impl, sampler, case, hyper, steps):
    fn = {"sgld": impl.sgld_step_, "rmsprop_sgld": impl.rmsprop_sgld_step_, "sgnht": impl.sgnht_step_}[sampler]
    lead = {"sgld": [], "rmsprop_sgld": ["square_avg"], "sgnht": ["momentum", "thermostat"]}[sampler]
    for t in range(steps):
        fn(case["params"], *[case[k] for k in lead], case["grads"], case["centers"], masks=case["masks"],
           noise=case["noise"], stats=case["stats"], step=t, **hyper)


def assert_close(a, b, what):
    for i, (x, y) in enumerate(zip(a, b)):
        scale = float(y.abs().max()) if y.numel() else 0.0
        assert torch.allclose(x.cpu(), y.cpu(), rtol=2e-6, atol=4e-6 * (1 + scale)), f"{what}[{i}]"


@requires_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld", "sgnht"])
@given(shapes=st.lists(shape_st, min_size=1, max_size=4), chains=st.integers(1, 5), masked=st.booleans(),
       explicit_noise=st.booleans(), stats=st.booleans(), box=st.sampled_from([0.0, 0.05, 1.0]),
       seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_kernel_matches_twin_step_for_step(device, sampler, shapes, chains, masked, explicit_noise, stats, box, seed):
    case, hyper = make_state(sampler, shapes, chains, seed=seed, masked=masked, explicit_noise=explicit_noise,
                             stats=stats, box=box, device=device)
    twin = clone(case)
    run(ops, sampler, case, hyper, 3)
    run(reference, sampler, twin, hyper, 3)
    assert_close(case["params"], twin["params"], "params")
    for key in ("square_avg", "momentum"):
        if key in case:
            assert_close(case[key], twin[key], key)
    if "thermostat" in case:
        assert torch.allclose(case["thermostat"].cpu(), twin["thermostat"].cpu(), rtol=1e-6, atol=1e-9)
    if stats:
        assert torch.allclose(case["stats"].cpu(), twin["stats"].cpu(), rtol=1e-5, atol=1e-9)
    if box > 0:  # every element that moves ends inside the box
        for i, (p, c) in enumerate(zip(case["params"], case["centers"])):
            moved = (p - c).abs() if case["masks"] is None else ((p - c).abs() * case["masks"][i])
            if p.numel():  # c +- box and p - c each round once, at the scale of |c|
                slack = 4 * torch.finfo(torch.float32).eps * (float(c.abs().max()) + box)
                assert float(moved.max()) <= box + slack


def _one(sampler, **kw):
    case, hyper = make_state(sampler, [(64,)], 3, seed=5, masked=False, explicit_noise=True, stats=False,
                             box=kw.pop("box", 0.0), device="cpu")
    hyper.update(kw)
    before = clone(case)
    run(ops, sampler, case, hyper, 1)
    return before, case, hyper


def test_rmsprop_step_is_the_documented_formula():
    b, a, h = _one("rmsprop_sgld")
    w, g, c, z, v = (b["params"][0].double(), b["grads"][0].double(), b["centers"][0].double(),
                     b["noise"][0].double(), b["square_avg"][0].double())
    v1 = h["alpha"] * v + (1 - h["alpha"]) * g * g
    G = 1 / (v1.sqrt() + h["rms_eps"])
    f = h["eps"] / 2 * (h["nbeta"] * g + h["gamma"] * (w - c) + h["weight_decay"] * w)
    want = w - G * f + G.sqrt() * math.sqrt(h["eps"]) * z
    assert torch.allclose(a["square_avg"][0].double(), v1, rtol=1e-6)
    assert torch.allclose(a["params"][0].double(), want, rtol=1e-6, atol=1e-6)


def test_sgnht_step_is_the_documented_formula_and_the_thermostat_acts():
    b, a, h = _one("sgnht")
    w, g, c, z, p = (b["params"][0].double(), b["grads"][0].double(), b["centers"][0].double(),
                     b["noise"][0].double(), b["momentum"][0].double())
    xi = b["thermostat"].double()[:, None]
    p1 = p - h["eps"] * (h["nbeta"] * g + h["gamma"] * (w - c) + h["weight_decay"] * w) - xi * p \
        + math.sqrt(2 * h["diffusion"] * h["eps"]) * z
    assert torch.allclose(a["momentum"][0].double(), p1, rtol=1e-5, atol=1e-7)
    assert torch.allclose(a["params"][0].double(), w + p1, rtol=1e-6, atol=1e-6)
    want_xi = b["thermostat"].double() + (p1 ** 2).mean(1) - h["eps"]
    assert torch.allclose(a["thermostat"].double(), want_xi, rtol=1e-5, atol=1e-8)
    # The friction term is applied: a larger thermostat gives a smaller momentum.
    b2 = clone(b)
    b2["thermostat"] += 0.5
    run(ops, "sgnht", b2, h, 1)
    assert float(b2["momentum"][0].norm()) < float(a["momentum"][0].norm())


def test_sgnht_box_clamps_and_reflects_momentum_where_it_hits():
    case, h = make_state("sgnht", [(256,)], 2, seed=3, masked=False, explicit_noise=True, stats=False, box=0.05,
                         device="cpu")
    case["params"] = [case["centers"][0] + 0.01 * torch.randn(2, 256, generator=torch.Generator().manual_seed(1))]
    free = clone(case)
    run(reference, "sgnht", free, dict(h, bounding_box=0.0), 1)
    run(ops, "sgnht", case, h, 1)
    c = case["centers"][0]
    hit = (free["params"][0] - c).abs() >= 0.05
    assert 0 < int(hit.sum()) < hit.numel()
    assert torch.allclose(case["params"][0][~hit], free["params"][0][~hit])
    assert torch.allclose(case["params"][0][hit], (c + 0.05 * torch.sign(free["params"][0] - c)).expand_as(hit)[hit])
    assert torch.allclose(case["momentum"][0][hit], -free["momentum"][0][hit])
    assert torch.allclose(case["momentum"][0][~hit], free["momentum"][0][~hit])


def test_sgld_box_clamps_to_the_box():
    case, h = make_state("sgld", [(300,)], 2, seed=4, masked=False, explicit_noise=True, stats=False, box=0.01,
                         device="cpu")
    free = clone(case)
    run(reference, "sgld", free, dict(h, bounding_box=0.0), 1)
    run(ops, "sgld", case, h, 1)
    c = case["centers"][0]
    assert torch.allclose(case["params"][0], torch.maximum(torch.minimum(free["params"][0], c + 0.01), c - 0.01))


@pytest.mark.parametrize("bad, match", [
    (dict(alpha=1.0), "alpha must be in"), (dict(rms_eps=0.0), "rms_eps must be > 0"),
    (dict(bounding_box=-1.0), "bounding_box must be >= 0"), (dict(bounding_box=float("nan")), "finite")])
def test_rmsprop_rejects_bad_hyperparameters(bad, match):
    case, hyper = make_state("rmsprop_sgld", [(4,)], 2, seed=0, masked=False, explicit_noise=False, stats=False,
                             box=0.0, device="cpu")
    hyper.update(bad)
    with pytest.raises(ValueError, match=match):
        run(ops, "rmsprop_sgld", case, hyper, 1)


def test_sgnht_rejects_bad_state():
    case, hyper = make_state("sgnht", [(4,)], 2, seed=0, masked=False, explicit_noise=False, stats=False, box=0.0,
                             device="cpu")
    case["thermostat"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"thermostat must be a contiguous float32 tensor of shape \(2,\)"):
        run(ops, "sgnht", case, hyper, 1)
    case["thermostat"] = torch.zeros(2)
    case["momentum"] = [torch.zeros(2, 5)]
    with pytest.raises(ValueError, match=r"momentum\[0\] has shape \(2, 5\); expected \(2, 4\)"):
        run(ops, "sgnht", case, hyper, 1)
    with pytest.raises(ValueError, match="diffusion must be >= 0"):
        case["momentum"] = [torch.zeros(2, 4)]
        run(ops, "sgnht", case, dict(hyper, diffusion=-1.0), 1)
