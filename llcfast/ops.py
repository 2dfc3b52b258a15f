"""Typed wrappers over the compiled kernels (torch.ops.llcfast.*).

Each function checks its arguments (TypeError/ValueError naming the bad
argument and what is allowed), then runs the C++/CUDA kernel, or, where no
kernel is built for the tensors' device, its pure-torch twin in
llcfast.reference with one warning. Fake (meta) kernels are registered here so
the ops trace under torch.compile and CUDA-graph capture.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _ext
from . import twins as reference
from ._checks import (check_bf16_copies, check_float, check_lanczos_step_args, check_multi_dot_args, check_philox_args,
                      check_rademacher_args, check_rmsprop_step_args, check_sgld_args, check_sgnht_step_args)

if _ext.extension_available():

    @torch.library.register_fake("llcfast::sgld_step_")
    def _sgld_step_fake(params, grads, centers, masks, noise, stats, step_tensor, seed, step, chain_offset, eps,
                        nbeta, gamma, weight_decay, noise_scale, bounding_box=0.0, bf16_copies=None):
        return None

    @torch.library.register_fake("llcfast::rmsprop_sgld_step_")
    def _rmsprop_sgld_step_fake(params, square_avg, grads, centers, masks, noise, stats, step_tensor, seed, step,
                                chain_offset, eps, nbeta, gamma, weight_decay, noise_scale, alpha, rms_eps,
                                bounding_box=0.0):
        return None

    @torch.library.register_fake("llcfast::sgnht_step_")
    def _sgnht_step_fake(params, momentum, thermostat, grads, centers, masks, noise, stats, step_tensor, seed, step,
                         chain_offset, eps, nbeta, gamma, weight_decay, diffusion, bounding_box=0.0):
        return None

    @torch.library.register_fake("llcfast::philox_normal_")
    def _philox_normal_fake(out, seed, step, chain_offset, group_offset):
        return None

    @torch.library.register_fake("llcfast::philox_rademacher_")
    def _philox_rademacher_fake(out, seed, stream, row_offset, group_offset):
        return None

    @torch.library.register_fake("llcfast::multi_dot_")
    def _multi_dot_fake(out, a, b):
        return None

    @torch.library.register_fake("llcfast::lanczos_step_")
    def _lanczos_step_fake(basis, w, j, out):
        return None

# The fast engine calls the loss under vmap, where the kernel needs the
# batching rules below; torch.library.register_vmap arrived in torch 2.5.
# Without it vmap would run the kernel once per chain, behind a warning at
# every call, so older torch takes the twin.
VMAP_RULES = hasattr(torch.library, "register_vmap")


def chain_first(x: torch.Tensor, dim, size: int) -> torch.Tensor:
    """A vmap rule's operand with the mapped dimension first; an unbatched
    operand (``dim`` None) is shared by all ``size`` chains."""
    return x.movedim(dim, 0) if dim is not None else x.expand((size,) + tuple(x.shape))


if _ext.extension_available():

    @torch.library.register_fake("llcfast::chain_layer_norm")
    def _chain_layer_norm_fake(x, weight, bias, eps):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        stat = x.new_empty(x.shape[:2], dtype=acc)
        return torch.empty_like(x), stat, torch.empty_like(stat)

    @torch.library.register_fake("llcfast::chain_layer_norm_backward")
    def _chain_layer_norm_backward_fake(grad, x, mean, rstd, weight):
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


if _ext.extension_available():

    @torch.library.register_fake("llcfast::token_nll")
    def _token_nll_fake(logits, targets):
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return targets.new_empty(targets.shape, dtype=acc), targets.new_empty(targets.shape, dtype=acc)

    @torch.library.register_fake("llcfast::token_nll_backward")
    def _token_nll_backward_fake(grad, logits, lse, targets):
        return torch.empty_like(logits)

    @torch.library.register_fake("llcfast::token_nll_grad_")
    def _token_nll_grad_fake(logits, targets, scale):
        return _token_nll_fake(logits, targets)


if _ext.extension_available() and VMAP_RULES:

    # Under vmap (one batched pass over chains) the chain dimension becomes
    # leading rows of the same kernel call.
    @torch.library.register_vmap("llcfast::token_nll")
    def _token_nll_vmap(info, in_dims, logits, targets):
        logits = chain_first(logits, in_dims[0], info.batch_size).contiguous()
        targets = chain_first(targets, in_dims[1], info.batch_size).contiguous()
        return torch.ops.llcfast.token_nll(logits, targets), (0, 0)

    @torch.library.register_vmap("llcfast::token_nll_backward")
    def _token_nll_backward_vmap(info, in_dims, grad, logits, lse, targets):
        args = [chain_first(x, d, info.batch_size).contiguous() for x, d in zip((grad, logits, lse, targets), in_dims)]
        return torch.ops.llcfast.token_nll_backward(*args), 0


# The kernels keep two float64 coefficient vectors of length j + 1 in CUDA
# shared memory; longer Lanczos runs take the twin (csrc/lanczos.h).
LANCZOS_KERNEL_MAX_STEPS = 2048


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
    """One SGLD step for every chain and every tensor, in place, in one pass:

        w <- w - (eps/2) * (nbeta * g + gamma * (w - w*) + weight_decay * w) + sqrt(eps) * noise_scale * xi

    ``xi`` is ``noise`` when given, else counter-based Philox normals keyed by
    (seed, step, chain_offset + chain, element); element indices run over the
    list with each tensor starting a fresh group of four (see
    llcfast.ops.philox_normal). Elements whose mask is False do not move.
    With ``step_tensor`` the noise step is ``step + step_tensor[0]``, read on
    the device, so a captured CUDA graph can advance it between replays.
    ``stats[c]`` is incremented by the sums over moving elements of g^2,
    (w - w*)^2 (w before the step) and (sqrt(eps) * noise_scale * xi)^2.
    ``bounding_box`` > 0 clamps every moved element to [w* - b, w* + b].
    ``bf16_copies[i]`` (where not None) is overwritten with the new
    ``params[i]`` rounded to bfloat16, in the same pass: a bf16 working copy
    of the weights that a bf16 forward pass can take without casting them.
    """
    params, grads, centers, masks, noise, hyper = check_sgld_args(
        params, grads, centers, masks, noise, stats, seed=seed, step=step, chain_offset=chain_offset,
        eps=eps, nbeta=nbeta, gamma=gamma, weight_decay=weight_decay, noise_scale=noise_scale,
        step_tensor=step_tensor)
    copies = check_bf16_copies(params, bf16_copies)
    box = check_float("bounding_box", bounding_box, minimum=0.0)
    if not params:
        return
    device = params[0].device
    if not _ext.kernels_for(device):
        _ext.warn_fallback(device)
        reference.sgld_step_(params, grads, centers, seed=seed, step=step, chain_offset=chain_offset, masks=masks,
                             noise=noise, stats=stats, step_tensor=step_tensor, bounding_box=box,
                             bf16_copies=bf16_copies, **hyper)
        return
    if copies is not None:  # the kernel takes an empty tensor where a parameter has no copy
        none = params[0].new_empty(0, dtype=torch.bfloat16)
        copies = [none if c is None else c for c in copies]
    torch.ops.llcfast.sgld_step_(params, grads, centers, masks, noise, stats, step_tensor, seed, step, chain_offset,
                                 hyper["eps"], hyper["nbeta"], hyper["gamma"], hyper["weight_decay"],
                                 hyper["noise_scale"], box, copies)


def rmsprop_sgld_step_(params, square_avg, grads, centers, *, eps: float, nbeta: float, gamma: float,
                       weight_decay: float = 0.0, noise_scale: float = 1.0, alpha: float = 0.99, rms_eps: float = 0.1,
                       bounding_box: float = 0.0, seed: int, step: int, chain_offset: int = 0, masks=None,
                       noise=None, stats: Optional[torch.Tensor] = None,
                       step_tensor: Optional[torch.Tensor] = None) -> None:
    """One RMSprop-preconditioned SGLD step, in place, in one pass:

        V <- alpha * V + (1 - alpha) * g * g          (square_avg, per chain)
        G = 1 / (sqrt(V) + rms_eps)
        w <- w - G * (eps/2) * (nbeta * g + gamma * (w - w*) + weight_decay * w)
               + sqrt(G) * sqrt(eps) * noise_scale * xi

    then the bounding box clamp when ``bounding_box`` > 0. Arguments as
    sgld_step_; ``square_avg`` ([C, *shape_i] float32 each, start at zeros)
    is updated in place. stats' noise column sums the added noise
    sqrt(G) * sqrt(eps) * noise_scale * xi squared."""
    params, square_avg, grads, centers, masks, noise, hyper = check_rmsprop_step_args(
        params, square_avg, grads, centers, masks, noise, stats, alpha=alpha, rms_eps=rms_eps,
        bounding_box=bounding_box, seed=seed, step=step, chain_offset=chain_offset, eps=eps, nbeta=nbeta,
        gamma=gamma, weight_decay=weight_decay, noise_scale=noise_scale, step_tensor=step_tensor)
    if not params:
        return
    device = params[0].device
    if not _ext.kernels_for(device):
        _ext.warn_fallback(device)
        reference.rmsprop_sgld_step_(params, square_avg, grads, centers, seed=seed, step=step,
                                     chain_offset=chain_offset, masks=masks, noise=noise, stats=stats,
                                     step_tensor=step_tensor, **hyper)
        return
    torch.ops.llcfast.rmsprop_sgld_step_(params, square_avg, grads, centers, masks, noise, stats, step_tensor, seed,
                                         step, chain_offset, hyper["eps"], hyper["nbeta"], hyper["gamma"],
                                         hyper["weight_decay"], hyper["noise_scale"], hyper["alpha"],
                                         hyper["rms_eps"], hyper["bounding_box"])


def sgnht_step_(params, momentum, thermostat: torch.Tensor, grads, centers, *, eps: float, nbeta: float,
                gamma: float, weight_decay: float = 0.0, diffusion: float = 0.01, bounding_box: float = 0.0,
                seed: int, step: int, chain_offset: int = 0, masks=None, noise=None,
                stats: Optional[torch.Tensor] = None, step_tensor: Optional[torch.Tensor] = None) -> None:
    """One stochastic-gradient Nose-Hoover thermostat step, in place, in one
    pass plus a per-chain thermostat update:

        p  <- p - eps * (nbeta * g + gamma * (w - w*) + weight_decay * w) - xi * p + sqrt(2 * A * eps) * N
        w  <- w + p           (clamped to the box, p reflected where it hit)
        xi <- xi + mean(p^2) - eps   (the chain's moving elements)

    ``momentum`` ([C, *shape_i] each) and ``thermostat`` (float32 [C]) are
    updated in place; A is ``diffusion``. With gamma = 0 this is devinterp's
    SGNHT, which has no localization term. stats' noise column sums
    (sqrt(2 A eps) N)^2."""
    params, momentum, grads, centers, masks, noise, hyper = check_sgnht_step_args(
        params, momentum, thermostat, grads, centers, masks, noise, stats, diffusion=diffusion,
        bounding_box=bounding_box, seed=seed, step=step, chain_offset=chain_offset, eps=eps, nbeta=nbeta,
        gamma=gamma, weight_decay=weight_decay, step_tensor=step_tensor)
    if not params:
        return
    device = params[0].device
    if not _ext.kernels_for(device):
        _ext.warn_fallback(device)
        reference.sgnht_step_(params, momentum, thermostat, grads, centers, seed=seed, step=step,
                              chain_offset=chain_offset, masks=masks, noise=noise, stats=stats,
                              step_tensor=step_tensor, **hyper)
        return
    torch.ops.llcfast.sgnht_step_(params, momentum, thermostat, grads, centers, masks, noise, stats, step_tensor, seed,
                                  step, chain_offset, hyper["eps"], hyper["nbeta"], hyper["gamma"],
                                  hyper["weight_decay"], hyper["diffusion"], hyper["bounding_box"])


def philox_normal(num_chains: int, numel: int, *, seed: int, step: int, chain_offset: int = 0,
                  group_offset: int = 0, device="cpu") -> torch.Tensor:
    """The [num_chains, numel] float32 noise that sgld_step_ draws at ``step``
    for a tensor whose element 0 is noise group ``group_offset``: element e of
    chain c is lane e % 4 of Philox4x32-10(counter = (group_offset + e // 4,
    chain_offset + c, step mod 2^32, step div 2^32), key = seed) through
    Box-Muller. Identical bits on CPU and CUDA."""
    check_philox_args(num_chains, numel, seed, step, chain_offset, group_offset)
    return _fill(num_chains, numel, device,
                 lambda out: torch.ops.llcfast.philox_normal_(out, seed, step, chain_offset, group_offset),
                 lambda dev: reference.philox_normal(num_chains, numel, seed=seed, step=step,
                                                     chain_offset=chain_offset, group_offset=group_offset,
                                                     device=dev))


def rademacher(num_rows: int, numel: int, *, seed: int, stream: int = 0, row_offset: int = 0,
               group_offset: int = 0, device="cpu") -> torch.Tensor:
    """[num_rows, numel] float32 Rademacher signs (+1/-1) for Hessian probes:
    row r is probe ``row_offset + r`` of probe set ``stream``; element e comes
    from Philox4x32-10(counter = (group_offset + e // 4, row_offset + r,
    stream mod 2^32, (stream div 2^32) | 2^31), key = seed), the top bit of
    word e % 4. The set top bit keeps probe counters apart from SGLD noise.
    Identical bits on CPU and CUDA."""
    check_rademacher_args(num_rows, numel, seed, stream, row_offset, group_offset)
    return _fill(num_rows, numel, device,
                 lambda out: torch.ops.llcfast.philox_rademacher_(out, seed, stream, row_offset, group_offset),
                 lambda dev: reference.rademacher(num_rows, numel, seed=seed, stream=stream, row_offset=row_offset,
                                                  group_offset=group_offset, device=dev))


def _fill(rows: int, numel: int, device, kernel, twin) -> torch.Tensor:
    """A new [rows, numel] float32 tensor filled by ``kernel(out)``, or by
    ``twin(device)`` (with the one fallback warning) where no kernel is built."""
    device = torch.device(device)
    if not _ext.kernels_for(device):
        _ext.warn_fallback(device)
        return twin(device)
    out = torch.empty(rows, numel, dtype=torch.float32, device=device)
    kernel(out)
    return out


def multi_dot_(out: torch.Tensor,  # [R] float64, added to
               a: Sequence[torch.Tensor],  # each [R, ...] float32, contiguous
               b: Sequence[torch.Tensor],  # each like a[i]
               ) -> None:
    """out[r] += sum_i <a[i][r], b[i][r]> in float64, over the whole list in
    one launch (per 64 tensors) on CUDA."""
    check_multi_dot_args(out, a, b)
    if not a:
        return
    if not _ext.kernels_for(out.device):
        _ext.warn_fallback(out.device)
        reference.multi_dot_(out, a, b)
        return
    torch.ops.llcfast.multi_dot_(out, list(a), list(b))


def lanczos_step_(basis: torch.Tensor,  # [R, m, N] float32, contiguous; basis[:, j + 1] is written
                  w: torch.Tensor,  # [R, N] float32: H basis[:, j] on entry, the residual on return
                  j: int,
                  out: torch.Tensor,  # [R, 2] float64: (alpha_j, beta_j) per row, overwritten
                  ) -> None:
    """One Lanczos step with full reorthogonalization (classical
    Gram-Schmidt, twice) for every row: with V = basis[:, :j+1] orthonormal,

        alpha = <v_j, w>,  w <- w - V^T (V w)  (twice),  beta = |w|,
        basis[:, j+1] = w / beta  (when j + 1 < m).

    Three passes over V on either device, reductions in float64 (the
    least the recurrence allows: each pass needs the previous reduction)."""
    check_lanczos_step_args(basis, w, j, out)
    built = _ext.kernels_for(basis.device)
    if not built or basis.shape[1] > LANCZOS_KERNEL_MAX_STEPS:
        if not built:
            _ext.warn_fallback(basis.device)
        reference.lanczos_step_(basis, w, j, out)
        return
    torch.ops.llcfast.lanczos_step_(basis, w, j, out)
