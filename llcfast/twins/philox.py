"""Pure-torch twin of the kernels' counter-based noise (csrc/philox.h).

Mirrors ``llcfast::normal4`` and the ``llcfast::philox_normal_`` op: same
Philox4x32-10 counter layout, same Box-Muller with the same hand-written
log/sin/cos, one rounded float32 operation at a time in the same order, so
the bits match the CPU and CUDA kernels. Unsigned 32-bit words are held in
int64 tensors.
"""
from __future__ import annotations

import functools

import torch

from .._checks import check_philox_args

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: int, b: torch.Tensor):
    """High and low words of a*b for a 32-bit constant a and words b; the
    product is split in 16-bit halves so nothing overflows int64."""
    p1 = a * (b & 0xFFFF)
    p2 = a * (b >> 16)
    hi = (p2 + (p1 >> 16)) >> 16
    lo = (p1 + ((p2 & 0xFFFF) << 16)) & _MASK32
    return hi, lo


def philox4x32_10(counter, key):
    """Philox4x32-10 of four counter words (int64 tensors, broadcastable) under
    a key of two 32-bit ints; returns the four output words."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = int(key[0]) & _MASK32, int(key[1]) & _MASK32
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _f(value: float, like: torch.Tensor) -> torch.Tensor:
    # Python float -> float32, the same rounding as static_cast<float>(double).
    return _constant(value, like.device)


@functools.lru_cache(maxsize=256)
def _constant(value: float, device: torch.device) -> torch.Tensor:
    # Made once: building ~20 scalar tensors per draw was a fifth of the twin's time.
    return torch.tensor(value, dtype=torch.float32, device=device)


def _log_unit(r: torch.Tensor) -> torch.Tensor:
    k = ((r >> 8) + 1).to(torch.float32)
    bits = k.view(torch.int32).to(torch.int64)
    e = ((bits >> 23) & 0xFF) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(torch.int32).view(torch.float32)
    big = m > _f(1.4142135623730951, r)
    m = torch.where(big, m * _f(0.5, r), m)
    e = e + big.to(torch.int64)
    s = (m - _f(1.0, r)) / (m + _f(1.0, r))
    z = s * s
    p = _f(0.1111111111111111, r).expand_as(z)
    p = _f(0.14285714285714285, r) + z * p
    p = _f(0.2, r) + z * p
    p = _f(0.3333333333333333, r) + z * p
    t = s * _f(2.0, r)
    log_m = t + (t * z) * p
    return (e - 24).to(torch.float32) * _f(0.6931471805599453, r) + log_m


def _cos_sin_turn(r: torch.Tensor):
    q = ((r + 0x20000000) >> 30) & 3
    d = (r - (q << 30)) & _MASK32
    d = torch.where(d >= 2**31, d - 2**32, d)
    phi = (d >> 6).to(torch.float32) * _f(9.362675707309822e-08, r)
    z = phi * phi
    ps = _f(2.7557319223985893e-06, r).expand_as(z)
    ps = _f(-0.0001984126984126984, r) + z * ps
    ps = _f(0.008333333333333333, r) + z * ps
    ps = _f(-0.16666666666666666, r) + z * ps
    sp = phi + (phi * z) * ps
    pc = _f(-2.755731922398589e-07, r).expand_as(z)
    pc = _f(2.48015873015873e-05, r) + z * pc
    pc = _f(-0.001388888888888889, r) + z * pc
    pc = _f(0.041666666666666664, r) + z * pc
    pc = _f(-0.5, r) + z * pc
    cp = _f(1.0, r) + z * pc
    c = torch.where(q == 0, cp, torch.where(q == 1, -sp, torch.where(q == 2, -cp, sp)))
    s = torch.where(q == 0, sp, torch.where(q == 1, cp, torch.where(q == 2, -sp, -cp)))
    return c, s


def _box_muller(r_radius: torch.Tensor, r_angle: torch.Tensor):
    # torch's vectorised float32 sqrt is not correctly rounded on every CPU; a
    # float64 sqrt rounded to float32 is (53 >= 2*24 + 2 bits).
    radius = torch.sqrt((_f(-2.0, r_radius) * _log_unit(r_radius)).double()).float()
    c, s = _cos_sin_turn(r_angle)
    return radius * c, radius * s


def normal_groups(seed: int, step: int, chains: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Twin of ``llcfast::normal4``: the four normals of each (chain, group)
    pair, chains [C, 1] and groups [G] int64 -> [C, G, 4] float32."""
    words = philox4x32_10((groups, chains, step & _MASK32, (step >> 32) & _MASK32),
                          (seed & _MASK32, (seed >> 32) & _MASK32))
    # spelled out: torch.broadcast_shapes would cost more on this per-step path
    shape = (chains.shape[0], groups.shape[0])
    c0, c1, c2, c3 = (torch.broadcast_to(w, shape) for w in words)
    n0, n1 = _box_muller(c0, c1)
    n2, n3 = _box_muller(c2, c3)
    return torch.stack((n0, n1, n2, n3), dim=-1)


def philox_normal(num_chains: int, numel: int, *, seed: int, step: int, chain_offset: int = 0,
                  group_offset: int = 0, device="cpu") -> torch.Tensor:
    """Twin of the ``llcfast::philox_normal_`` kernel (see llcfast.ops.philox_normal):
    returns the [num_chains, numel] float32 noise an SGLD step would draw for
    a tensor whose element 0 is noise group ``group_offset``."""
    check_philox_args(num_chains, numel, seed, step, chain_offset, group_offset)
    return philox_normal_list(num_chains, [numel], [group_offset], seed=seed, step=step, chain_offset=chain_offset,
                              device=device)[0].contiguous()


def philox_normal_list(num_chains: int, numels, group_offsets, *, seed: int, step: int, chain_offset: int = 0,
                       device="cpu") -> list:
    """philox_normal of several tensors at once, [num_chains, numel] each:
    their groups go through one Philox pass (the draws are elementwise in the
    group index, so the bits are the same as one call per tensor)."""
    device = torch.device(device)
    counts = [-(-n // 4) for n in numels]
    chains = torch.arange(chain_offset, chain_offset + num_chains, dtype=torch.int64, device=device)[:, None]
    group_idx = torch.cat([torch.arange(o, o + g, dtype=torch.int64, device=device)
                           for o, g in zip(group_offsets, counts)])
    out = normal_groups(seed, step, chains, group_idx)  # [C, sum G, 4]
    parts, start = [], 0
    for n, g in zip(numels, counts):
        parts.append(out[:, start:start + g].reshape(num_chains, g * 4)[:, :n])
        start += g
    return parts
