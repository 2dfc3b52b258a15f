"""The fused SGLD step (CPU kernel) against its pure-torch twin and against
the update computed in float64 from first principles."""
import math

import torch
from hypothesis import given, strategies as st

from llcfast import ops, reference
from llcfast._checks import noise_group_offsets
from conftest import requires_extension
from sample_inputs import AWKWARD_SHAPES, exact_update, make_case, update_bound

shape_st = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple) | st.sampled_from(AWKWARD_SHAPES)


def drawn_noise(case):
    """The xi each tensor receives: explicit, or the Philox draw at its offset."""
    if case.noise is not None:
        return case.noise
    h, chains = case.hyper, case.params[0].shape[0]
    offs = noise_group_offsets(case.params)
    return [reference.philox_normal(chains, p[0].numel(), seed=h["seed"], step=h["step"],
                                    chain_offset=h["chain_offset"], group_offset=o,
                                    device=p.device).view_as(p) for p, o in zip(case.params, offs)]


def assert_within(actual, expected, bound):
    for i, (a, e, b) in enumerate(zip(actual, expected, bound)):
        err = (a.double() - e.double()).abs()
        assert bool((err <= b).all()), f"tensor {i}: max error {err.max().item()} exceeds bound"


@requires_extension
@given(shapes=st.lists(shape_st, min_size=1, max_size=4), chains=st.integers(1, 5), masked=st.booleans(),
       explicit_noise=st.booleans(), stats=st.booleans(), seed=st.integers(0, 10**6),
       eps=st.sampled_from([0.0, 1e-5, 1e-3, 0.1]), nbeta=st.sampled_from([0.0, 1.0, 60.0, 1e4]),
       gamma=st.sampled_from([0.0, 6.0, 300.0]), weight_decay=st.sampled_from([0.0, 0.05]))
def test_kernel_matches_twin_and_float64(shapes, chains, masked, explicit_noise, stats, seed, eps, nbeta, gamma,
                                         weight_decay):
    case = make_case(shapes, chains, seed=seed, masked=masked, explicit_noise=explicit_noise, stats=stats, eps=eps,
                     nbeta=nbeta, gamma=gamma, weight_decay=weight_decay, step=seed % 7, chain_offset=seed % 3)
    xi = drawn_noise(case)
    expected = exact_update(case, xi)
    bound = update_bound(case, xi)
    before = case.clone()
    twin = case.clone()
    case.run(ops.sgld_step_)
    twin.run(reference.sgld_step_)
    assert_within(case.params, expected, bound)
    assert_within(case.params, twin.params, bound)
    if masked:
        for p, p0, m in zip(case.params, before.params, case.masks):
            assert torch.equal(p[:, ~m], p0[:, ~m]), "a masked element moved"
    if stats:
        torch.testing.assert_close(case.stats, twin.stats, rtol=1e-10, atol=1e-12)


@requires_extension
def test_stats_are_the_documented_sums():
    case = make_case([(5, 7), (97,), ()], 3, masked=True, stats=True, explicit_noise=True)
    before = case.clone()
    case.run(ops.sgld_step_)
    s = math.sqrt(case.hyper["eps"]) * case.hyper["noise_scale"]
    want = torch.zeros(3, 3, dtype=torch.float64)
    for p, g, c, m, z in zip(before.params, before.grads, before.centers, before.masks, before.noise):
        keep = m.expand_as(p).double()
        dims = tuple(range(1, p.dim()))
        red = (lambda x: x.sum(dims)) if dims else (lambda x: x)
        want[:, 0] += red(g.double() ** 2 * keep)
        want[:, 1] += red((p.double() - c.double()) ** 2 * keep)
        want[:, 2] += red((s * z.double()) ** 2 * keep)
    torch.testing.assert_close(case.stats, want, rtol=1e-6, atol=0)


@requires_extension
def test_philox_noise_uses_list_offsets():
    """With only noise acting (nbeta = gamma = 0, eps = 1), the step adds
    exactly philox_normal at each tensor's group offset."""
    case = make_case([(3,), (5, 2), (1,), (9,)], 2, eps=1.0, nbeta=0.0, gamma=0.0, weight_decay=0.0, step=41,
                     chain_offset=5)
    before = case.clone()
    case.run(ops.sgld_step_)
    offs = noise_group_offsets(case.params)
    assert offs == [0, 1, 4, 5]
    for p, p0, o in zip(case.params, before.params, offs):
        xi = ops.philox_normal(2, p[0].numel(), seed=case.hyper["seed"], step=41, chain_offset=5, group_offset=o)
        torch.testing.assert_close(p - p0, xi.view_as(p), rtol=0, atol=4 * torch.finfo(torch.float32).eps * 8)


@requires_extension
def test_step_tensor_adds_to_step():
    a = make_case([(33,)], 2, step=10)
    b = a.clone()
    b.hyper["step"] = 4
    a.run(ops.sgld_step_)
    b.run(lambda *args, **kw: ops.sgld_step_(*args, step_tensor=torch.tensor([6]), **kw))
    assert torch.equal(a.params[0], b.params[0])


@requires_extension
def test_step_independent_of_thread_count():
    results = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            case = make_case([(4097,), (513, 3), (7,)], 4, masked=True, stats=True)
            case.run(ops.sgld_step_)
            results.append(case)
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0].params, other.params))
        assert torch.equal(results[0].stats, other.stats)


def test_zero_step_size_and_empty_list_are_no_ops():
    case = make_case([(4, 3), (0,)], 2, eps=0.0)
    before = case.clone()
    case.run(ops.sgld_step_)
    assert all(torch.equal(a, b) for a, b in zip(case.params, before.params))
    ops.sgld_step_([], [], [], eps=1e-3, nbeta=1.0, gamma=1.0, seed=0, step=0)


def with_bf16_grads(case):
    """The case with its gradients rounded to bf16, and the same numbers in
    float32 (bf16 widens to float32 exactly)."""
    rounded = case.clone()
    rounded.grads = [g.bfloat16() for g in case.grads]
    widened = case.clone()
    widened.grads = [g.float() for g in rounded.grads]
    return rounded, widened


def blank_copies(params, every_other: bool):
    """A NaN-filled bf16 copy per tensor (None for every other one when asked)."""
    return [None if every_other and i % 2 else torch.full(p.shape, float("nan"), dtype=torch.bfloat16)
            for i, p in enumerate(params)]


@requires_extension
@given(shapes=st.lists(shape_st, min_size=1, max_size=4), chains=st.integers(1, 4), masked=st.booleans(),
       explicit_noise=st.booleans(), stats=st.booleans(), every_other=st.booleans(),
       box=st.sampled_from([0.0, 0.01]), seed=st.integers(0, 10**6))
def test_bf16_grads_and_copies(shapes, chains, masked, explicit_noise, stats, every_other, box, seed):
    # bf16 gradients give the update of the same numbers in float32, bit for bit; each copy is the new
    # parameter rounded as .to(torch.bfloat16) rounds it (masked elements included); None entries are skipped
    case = make_case(shapes, chains, seed=seed, masked=masked, explicit_noise=explicit_noise, stats=stats,
                     step=seed % 5, chain_offset=seed % 3)
    case.hyper["bounding_box"] = box
    rounded, widened = with_bf16_grads(case)
    twin = rounded.clone()
    copies, twin_copies = blank_copies(case.params, every_other), blank_copies(case.params, every_other)
    rounded.run(lambda *a, **kw: ops.sgld_step_(*a, bf16_copies=copies, **kw))
    widened.run(ops.sgld_step_)
    twin.run(lambda *a, **kw: reference.sgld_step_(*a, bf16_copies=twin_copies, **kw))
    assert all(torch.equal(a, b) for a, b in zip(rounded.params, widened.params))
    if stats:
        assert torch.equal(rounded.stats, widened.stats)
    assert_within(twin.params, rounded.params, update_bound(widened, drawn_noise(widened)))
    for i, (p, c, tp, tc) in enumerate(zip(rounded.params, copies, twin.params, twin_copies)):
        if every_other and i % 2:
            assert c is None and tc is None
            continue
        assert torch.equal(c, p.bfloat16()) and torch.equal(tc, tp.bfloat16())
