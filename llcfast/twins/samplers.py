"""Pure-torch twins of the fused RMSprop-SGLD and SGNHT steps
(``llcfast::rmsprop_sgld_step_``, ``llcfast::sgnht_step_``): same signatures
and semantics as llcfast.ops, each element's update written as the kernels
round it (csrc/sgld.h), so that with the same noise they agree to fp32
rounding."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._checks import check_rmsprop_step_args, check_sgnht_step_args
from .sgld import add_stats, clamp_box, f32, fold_coefficients, force, walk


def rmsprop_sgld_step_(params: Sequence[torch.Tensor], square_avg: Sequence[torch.Tensor],
                       grads: Sequence[torch.Tensor], centers: Sequence[torch.Tensor], *, eps: float, nbeta: float,
                       gamma: float, weight_decay: float = 0.0, noise_scale: float = 1.0, alpha: float = 0.99,
                       rms_eps: float = 0.1, bounding_box: float = 0.0, seed: int, step: int, chain_offset: int = 0,
                       masks: Optional[Sequence[torch.Tensor]] = None,
                       noise: Optional[Sequence[torch.Tensor]] = None, stats: Optional[torch.Tensor] = None,
                       step_tensor: Optional[torch.Tensor] = None) -> None:
    """Mirrors ``llcfast::rmsprop_sgld_step_``; see llcfast.ops.rmsprop_sgld_step_."""
    params, square_avg, grads, centers, masks, noise, hyper = check_rmsprop_step_args(
        params, square_avg, grads, centers, masks, noise, stats, alpha=alpha, rms_eps=rms_eps,
        bounding_box=bounding_box, seed=seed, step=step, chain_offset=chain_offset, eps=eps, nbeta=nbeta,
        gamma=gamma, weight_decay=weight_decay, noise_scale=noise_scale, step_tensor=step_tensor)
    if not params:
        return
    dev = params[0].device
    a, b, e, s = (f32(v, dev) for v in fold_coefficients(
        **{k: hyper[k] for k in ("eps", "nbeta", "gamma", "weight_decay", "noise_scale")}))
    al, one_m_al, reps, one = f32(hyper["alpha"], dev), f32(1.0 - hyper["alpha"], dev), f32(hyper["rms_eps"], dev), \
        f32(1.0, dev)
    for i, p, g, c, xi, moves in walk(params, grads, centers, masks, noise, seed, step, chain_offset, step_tensor):
        v = square_avg[i]
        v_new = al * v + (one_m_al * g) * g
        G = one / (torch.sqrt(v_new) + reps)
        added = torch.sqrt(G) * (s * xi)
        new = clamp_box((p - G * force(p, g, c, a, b, e)) + added, c, hyper["bounding_box"])
        add_stats(stats, p, g, c, added, moves)
        if moves is not None:
            new, v_new = torch.where(moves, new, p), torch.where(moves, v_new, v)
        p.copy_(new)
        v.copy_(v_new)


def sgnht_step_(params: Sequence[torch.Tensor], momentum: Sequence[torch.Tensor], thermostat: torch.Tensor,
                grads: Sequence[torch.Tensor], centers: Sequence[torch.Tensor], *, eps: float, nbeta: float,
                gamma: float, weight_decay: float = 0.0, diffusion: float = 0.01, bounding_box: float = 0.0,
                seed: int, step: int, chain_offset: int = 0, masks: Optional[Sequence[torch.Tensor]] = None,
                noise: Optional[Sequence[torch.Tensor]] = None, stats: Optional[torch.Tensor] = None,
                step_tensor: Optional[torch.Tensor] = None) -> None:
    """Mirrors ``llcfast::sgnht_step_``; see llcfast.ops.sgnht_step_."""
    params, momentum, grads, centers, masks, noise, hyper = check_sgnht_step_args(
        params, momentum, thermostat, grads, centers, masks, noise, stats, diffusion=diffusion,
        bounding_box=bounding_box, seed=seed, step=step, chain_offset=chain_offset, eps=eps, nbeta=nbeta,
        gamma=gamma, weight_decay=weight_decay, step_tensor=step_tensor)
    if not params:
        return
    dev = params[0].device
    eps_, box = hyper["eps"], hyper["bounding_box"]
    fa, fb, fe = (f32(eps_ * hyper[k], dev) for k in ("nbeta", "gamma", "weight_decay"))
    fs = f32((2.0 * hyper["diffusion"] * eps_) ** 0.5, dev)
    chains = params[0].shape[0]
    energy = torch.zeros(chains, dtype=torch.float64, device=dev)
    count = torch.zeros((), dtype=torch.float64, device=dev)
    for i, p, g, c, xi, moves in walk(params, grads, centers, masks, noise, seed, step, chain_offset, step_tensor):
        m = momentum[i]
        xi_t = thermostat.view((chains,) + (1,) * (p.dim() - 1))
        q = m - force(p, g, c, fa, fb, fe)
        q = q - xi_t * m
        q = q + fs * xi
        new = p + q
        if box > 0:
            q = torch.where((new - c).abs() < f32(box, dev), q, -q)
            new = clamp_box(new, c, box)
        add_stats(stats, p, g, c, fs * xi, moves)
        keep = torch.ones_like(p, dtype=torch.float64) if moves is None else moves.to(torch.float64)
        dims = tuple(range(1, p.dim()))
        energy += (q.double() ** 2 * keep).sum(dims) if dims else q.double() ** 2 * keep
        count += keep[0].sum()
        if moves is not None:
            new, q = torch.where(moves, new, p), torch.where(moves, q, m)
        p.copy_(new)
        m.copy_(q)
    # xi <- xi + mean(p^2) - eps over each chain's moving elements
    thermostat.add_((energy / count.clamp_min(1.0) - eps_).to(torch.float32))
