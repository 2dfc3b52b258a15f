"""The samplers estimate_llc can run, their hyperparameters, and the per-chain
state each carries; one Stepper applies a sampler's fused step to a stack of
chains, through the kernels (llcfast.ops) or their twins (llcfast.reference)."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from .._checks import check_float, check_rmsprop_hyper, check_sgnht_hyper, noise_group_offsets

SAMPLERS = ("sgld", "rmsprop_sgld", "sgnht")
# Hyperparameters beyond SGLD's, with their defaults (those of devinterp's
# RMSprop preconditioner and SGNHT).
SAMPLER_DEFAULTS: Dict[str, Dict[str, float]] = {
    "sgld": {},
    "rmsprop_sgld": {"alpha": 0.99, "rms_eps": 0.1},
    "sgnht": {"diffusion": 0.01},
}
# SGNHT's initial momentum sqrt(eps) * N(0, I) is drawn from the noise stream
# at this step index, which no run reaches, so it is keyed by (seed, chain,
# element) like every other draw and is the same for any backend or split.
MOMENTUM_INIT_STEP = 2**62


def check_sampler(sampler, sampler_kwargs: Optional[dict], bounding_box) -> Tuple[str, Dict[str, float], float]:
    """(sampler, its full hyperparameters, box) or a ValueError/TypeError that
    names the bad value and what is allowed."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    kwargs = dict(SAMPLER_DEFAULTS[sampler])
    for key, value in (sampler_kwargs or {}).items():
        if key not in kwargs:
            allowed = sorted(kwargs) or "none"
            raise ValueError(f"sampler_kwargs: {key!r} is not a hyperparameter of {sampler!r}; allowed: {allowed}")
        kwargs[key] = value
    label = lambda key: f"sampler_kwargs[{key!r}]"  # noqa: E731
    if sampler == "rmsprop_sgld":
        kwargs = check_rmsprop_hyper(kwargs["alpha"], kwargs["rms_eps"], label)
    elif sampler == "sgnht":
        kwargs = check_sgnht_hyper(kwargs["diffusion"], label)
    box = 0.0 if bounding_box is None else check_float("bounding_box", bounding_box)
    if bounding_box is not None and box <= 0:
        raise ValueError(f"bounding_box must be > 0 (or None for no box), got {bounding_box}")
    return sampler, kwargs, box


class Stepper:
    """A sampler's state for chains ``chain_offset .. chain_offset + C - 1``
    stacked on dim 0 of ``params`` ([C, ...] each), and its step."""

    def __init__(self, impl, sampler: str, kwargs: Dict[str, float], box: float, params: List[torch.Tensor], *,
                 epsilon: float, seed: int, chain_offset: int = 0):
        self.impl, self.sampler, self.kwargs, self.box = impl, sampler, kwargs, box
        self.state: List[torch.Tensor] = []
        self.thermostat: Optional[torch.Tensor] = None
        if sampler == "rmsprop_sgld":
            self.state = [torch.zeros_like(p) for p in params]
        elif sampler == "sgnht":
            chains = params[0].shape[0]
            scale = math.sqrt(epsilon)
            self.state = [scale * impl.philox_normal(chains, p[0].numel(), seed=seed, step=MOMENTUM_INIT_STEP,
                                                     chain_offset=chain_offset, group_offset=off,
                                                     device=p.device).view_as(p)
                          for p, off in zip(params, noise_group_offsets(params))]
            self.thermostat = torch.full((chains,), kwargs["diffusion"], dtype=torch.float32,
                                         device=params[0].device)

    def step(self, params, grads, centers, *, eps: float, nbeta: float, gamma: float, weight_decay: float,
             noise_scale: float, seed: int, step: int, chain_offset: int = 0, masks=None, stats=None,
             step_tensor=None, noise=None, bf16_copies=None) -> None:
        """``bf16_copies`` (SGLD only): see llcfast.ops.sgld_step_."""
        if bf16_copies is not None and self.sampler != "sgld":
            raise ValueError(f"bf16_copies are written by the SGLD step only, not by {self.sampler!r}")
        common = dict(eps=eps, nbeta=nbeta, gamma=gamma, weight_decay=weight_decay, seed=seed, step=step,
                      chain_offset=chain_offset, masks=masks, noise=noise, stats=stats, step_tensor=step_tensor,
                      bounding_box=self.box)
        if self.sampler == "sgld":
            self.impl.sgld_step_(params, grads, centers, noise_scale=noise_scale, bf16_copies=bf16_copies, **common)
        elif self.sampler == "rmsprop_sgld":
            self.impl.rmsprop_sgld_step_(params, self.state, grads, centers, noise_scale=noise_scale,
                                         **self.kwargs, **common)
        else:
            self.impl.sgnht_step_(params, self.state, self.thermostat, grads, centers, **self.kwargs, **common)
