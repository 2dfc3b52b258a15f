"""Pure-torch twin of the fused SGLD step (``llcfast::sgld_step_``).

Same signature and semantics as :func:`llcfast.ops.sgld_step_`, written as a
few torch ops per tensor in the order the kernels round them, so that with the
same noise it agrees with the CPU and CUDA kernels to fp32 rounding (in
practice bit for bit).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .._checks import check_bf16_copies, check_float, check_sgld_args, noise_group_offsets
from .philox import philox_normal_list


def fold_coefficients(eps: float, nbeta: float, gamma: float, weight_decay: float, noise_scale: float):
    """(a, b, e, s) of  w' = w - (a*g + b*(w - w*) + e*w) + s*xi, folded in
    double precision exactly as the kernels do (csrc/sgld.h)."""
    return (eps / 2.0 * nbeta, eps / 2.0 * gamma, eps / 2.0 * weight_decay, math.sqrt(eps) * noise_scale)


def sgld_step_(
    params: Sequence[torch.Tensor],  # each [C, *shape_i], float32, updated in place
    grads: Sequence[torch.Tensor],  # each [C, *shape_i], float32 or bfloat16
    centers: Sequence[torch.Tensor],  # each [*shape_i]: w*
    *,
    eps: float,
    nbeta: float,
    gamma: float,
    weight_decay: float = 0.0,
    noise_scale: float = 1.0,
    seed: int,
    step: int,
    chain_offset: int = 0,
    masks: Optional[Sequence[torch.Tensor]] = None,  # each [*shape_i] bool: True = may move
    noise: Optional[Sequence[torch.Tensor]] = None,  # each [C, *shape_i]: explicit xi
    stats: Optional[torch.Tensor] = None,  # [C, 3] float64, added to
    step_tensor: Optional[torch.Tensor] = None,  # int64 [1]: added to step (read on the device)
    bounding_box: float = 0.0,  # > 0: clamp each element to [w* - b, w* + b] after the step
    bf16_copies: Optional[Sequence[Optional[torch.Tensor]]] = None,  # each [C, *shape_i] bfloat16 or None
) -> None:
    """Mirrors the ``llcfast::sgld_step_`` kernel; see llcfast.ops.sgld_step_."""
    params, grads, centers, masks, noise, hyper = check_sgld_args(
        params, grads, centers, masks, noise, stats, seed=seed, step=step, chain_offset=chain_offset,
        eps=eps, nbeta=nbeta, gamma=gamma, weight_decay=weight_decay, noise_scale=noise_scale,
        step_tensor=step_tensor)
    copies = check_bf16_copies(params, bf16_copies)
    box = check_float("bounding_box", bounding_box, minimum=0.0)
    if not params:
        return
    a, b, e, s = (f32(v, params[0].device) for v in fold_coefficients(**hyper))
    for i, p, g, c, xi, moves in walk(params, grads, centers, masks, noise, seed, step, chain_offset, step_tensor):
        new = (p - force(p, g, c, a, b, e)) + s * xi
        new = clamp_box(new, c, box)
        add_stats(stats, p, g, c, s * xi, moves)
        p.copy_(new if moves is None else torch.where(moves, new, p))
        if copies is not None and copies[i] is not None:
            copies[i].copy_(p)


def f32(value: float, device) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=device)


def force(p, g, c, a, b, e) -> torch.Tensor:
    """a*g + b*(w - w*) + e*w, rounded in the kernels' order."""
    t = a * g
    t = t + b * (p - c)
    return t + e * p


def clamp_box(new: torch.Tensor, c: torch.Tensor, box: float) -> torch.Tensor:
    if box <= 0:
        return new
    b = f32(box, new.device)
    return torch.minimum(torch.maximum(new, c - b), c + b)  # NaN propagates, as in the kernels


def walk(params, grads, centers, masks, noise, seed, step, chain_offset, step_tensor):
    """(i, p, g, c, xi, moves) per non-empty tensor: xi the explicit noise or
    the Philox draw the kernels make, moves the broadcast mask or None."""
    if step_tensor is not None:
        step = step + int(step_tensor.item())
    if noise is None:
        noise = philox_noise(params, seed, step, chain_offset)
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        # bf16 gradients widen exactly to float32
        yield i, p, grads[i].float(), centers[i], noise[i], None if masks is None else masks[i].expand_as(p)


def philox_noise(params, seed: int, step: int, chain_offset: int) -> list:
    """The Philox draw the kernels make for each tensor (None for empty ones),
    in one pass per device."""
    offsets = noise_group_offsets(params)
    chains = params[0].shape[0]
    noise = [None] * len(params)
    for device in {p.device for p in params}:
        idx = [i for i, p in enumerate(params) if p.device == device and p.numel()]
        if not idx:
            continue
        draws = philox_normal_list(chains, [params[i][0].numel() for i in idx], [offsets[i] for i in idx],
                                   seed=seed, step=step, chain_offset=chain_offset, device=device)
        for i, xi in zip(idx, draws):
            noise[i] = xi.reshape(params[i].shape)
    return noise


def add_stats(stats, p, g, c, added, moves) -> None:
    """stats[c] += sums over moving elements of g^2, (w - w*)^2 (w before the
    step) and the added noise squared."""
    if stats is None:
        return
    keep = torch.ones_like(p, dtype=torch.float64) if moves is None else moves.to(torch.float64)
    dims = tuple(range(1, p.dim()))
    d = p.double() - c.double()
    for k, v in enumerate((g.double() ** 2, d ** 2, added.double() ** 2)):
        stats[:, k] += (v * keep).sum(dims) if dims else v * keep

