"""The counter-based noise: Philox known answers, kernel == twin bit for bit,
the normals' statistics, and independence of thread count and slicing."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from llcfast import ops, reference
from conftest import requires_extension

# Random123's tests/kat_vectors, "philox4x32 10" lines: counter, key, result.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    out = reference.philox4x32_10(tuple(torch.tensor(c) for c in counter), key)
    assert tuple(int(w) for w in out) == expected


@requires_extension
@pytest.mark.parametrize("chains,numel,seed,step,chain_offset,group_offset", [
    (1, 0, 0, 0, 0, 0),
    (1, 1, 0, 0, 0, 0),
    (3, 97, 7, 5, 0, 0),
    (2, 1025, 2**63 - 1, 2**40 + 3, 2**32 - 2, 2**32 - 257),
    (5, 4096, 123456789, 0, 11, 17),
])
def test_kernel_noise_matches_twin_bitwise(chains, numel, seed, step, chain_offset, group_offset):
    kw = dict(seed=seed, step=step, chain_offset=chain_offset, group_offset=group_offset)
    a = ops.philox_normal(chains, numel, **kw)
    b = reference.philox_normal(chains, numel, **kw)
    assert a.shape == b.shape == (chains, numel)
    assert torch.equal(a, b)


def test_slices_are_consistent():
    """Chains [2, 4) drawn with chain_offset=2 are rows 2..3 of the full draw;
    elements from group 3 on are columns 12.. of the draw from group 0."""
    full = ops.philox_normal(4, 40, seed=9, step=2)
    assert torch.equal(ops.philox_normal(2, 40, seed=9, step=2, chain_offset=2), full[2:])
    assert torch.equal(ops.philox_normal(4, 28, seed=9, step=2, group_offset=3), full[:, 12:])


@requires_extension
def test_noise_independent_of_thread_count():
    before = torch.get_num_threads()
    try:
        draws = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            draws.append(ops.philox_normal(3, 200_003, seed=5, step=77))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(draws[0], d) for d in draws[1:])


N = 2_000_000


@pytest.fixture(scope="module")
def big_draw():
    return ops.philox_normal(4, N, seed=2024, step=3).double()


def test_normal_moments(big_draw):
    x = big_draw[0]
    # Tolerances: 5 standard errors of each statistic under N(0, 1).
    assert abs(x.mean().item()) < 5 / math.sqrt(N)
    assert abs(x.var().item() - 1) < 5 * math.sqrt(2 / N)
    assert abs((x ** 3).mean().item()) < 5 * math.sqrt(15 / N)
    assert abs((x ** 4).mean().item() - 3) < 5 * math.sqrt(96 / N)


def test_normal_tail_and_cdf(big_draw):
    scipy_stats = pytest.importorskip("scipy.stats")
    x = big_draw[1].numpy()
    p_tail = 2 * scipy_stats.norm.sf(3)
    frac = (abs(x) > 3).mean()
    assert abs(frac - p_tail) < 5 * math.sqrt(p_tail * (1 - p_tail) / N)
    # Kolmogorov-Smirnov on the full draw; the fixed seed makes this exact.
    assert scipy_stats.kstest(x, "norm").pvalue > 1e-3


def _corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return ((a * b).mean() / (a.std() * b.std())).item()


def test_independence_across_chains_steps_seeds_and_lanes(big_draw):
    bound = 5 / math.sqrt(N)  # 5 standard errors of a correlation under independence
    other_step = ops.philox_normal(1, N, seed=2024, step=4).double()[0]
    other_seed = ops.philox_normal(1, N, seed=2025, step=3).double()[0]
    assert abs(_corr(big_draw[0], big_draw[1])) < bound
    assert abs(_corr(big_draw[0], big_draw[3])) < bound
    assert abs(_corr(big_draw[0], other_step)) < bound
    assert abs(_corr(big_draw[0], other_seed)) < bound
    lanes = big_draw[0].view(-1, 4)
    for i, j in [(0, 1), (0, 2), (1, 3), (2, 3)]:
        assert abs(_corr(lanes[:, i], lanes[:, j])) < 5 / math.sqrt(N / 4)
    # Box-Muller pairs are uncorrelated in their squares too (the radius is shared).
    assert abs(_corr(lanes[:, 0] ** 2, lanes[:, 1] ** 2)) < 5 / math.sqrt(N / 4) * 2


@given(chains=st.integers(1, 4), numel=st.integers(0, 300), seed=st.integers(0, 2**63 - 1),
       step=st.integers(0, 2**62), group_offset=st.integers(0, 2**32 - 100))
def test_kernel_twin_agree_for_any_key(chains, numel, seed, step, group_offset):
    kw = dict(seed=seed, step=step, group_offset=group_offset)
    assert torch.equal(ops.philox_normal(chains, numel, **kw), reference.philox_normal(chains, numel, **kw))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_chains=0, numel=4), ValueError, "num_chains"),
    (dict(num_chains=1, numel=-1), ValueError, "numel"),
    (dict(num_chains=1, numel=4, seed=-1), ValueError, "seed"),
    (dict(num_chains=1, numel=4, seed=1.5), TypeError, "seed"),
    (dict(num_chains=1, numel=4, step=True), TypeError, "step"),
    (dict(num_chains=1, numel=8, group_offset=2**32 - 1), ValueError, "group_offset"),
])
def test_philox_bad_input(kwargs, exc, match):
    kw = dict(seed=0, step=0)
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        ops.philox_normal(kw.pop("num_chains"), kw.pop("numel"), **kw)
    with pytest.raises(exc, match=match):
        kw2 = dict(seed=0, step=0)
        kw2.update(kwargs)
        reference.philox_normal(kw2.pop("num_chains"), kw2.pop("numel"), **kw2)
