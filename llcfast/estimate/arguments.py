"""The checks both estimate_llc backends run on their shared arguments,
before any work: "auto" values stand in as numbers, so a bad argument fails
before the pilots that would resolve them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..engine.loaders import check_draw_batches, check_loader
from .auto import check_auto
from .checks import check_callbacks, check_llc_args, check_mala, check_sampler_args, init_loss_plan
from .trust import check_trust_checks, relaxation_steps


@dataclass
class Arguments:
    """The shared arguments, checked: which are "auto", the numeric ones as
    both backends take them, the init-loss plan and the sampler."""
    auto: set
    args: dict
    init_method: str
    init_batches: Optional[int]
    init_chosen: bool
    sampler: str
    sampler_kwargs: dict
    bounding_box: Optional[float]
    callbacks: tuple

    @property
    def sampling(self) -> dict:
        return dict(sampler=self.sampler, sampler_kwargs=self.sampler_kwargs,
                    bounding_box=self.bounding_box or None)


def check_arguments(a, loader) -> Arguments:
    """``a``: the call's keyword arguments as attributes."""
    auto = {name for name, value in (("gamma", a.gamma), ("epsilon", a.epsilon), ("num_burnin", a.num_burnin))
            if check_auto(name, value)}
    args = dict(num_chains=a.num_chains, num_draws=a.num_draws,
                num_burnin=0 if "num_burnin" in auto else a.num_burnin,
                steps_between_draws=a.steps_between_draws, epsilon=1.0 if "epsilon" in auto else a.epsilon,
                gamma=1.0 if "gamma" in auto else a.gamma, nbeta=a.nbeta, weight_decay=a.weight_decay,
                noise_scale=a.noise_scale, num_init_batches=a.num_init_batches, seed=a.seed,
                grad_accum_steps=a.grad_accum_steps)
    check_llc_args(**args)
    check_draw_batches(a.draw_batches)
    if "num_burnin" in auto and "gamma" not in auto:
        relaxation_steps(1.0, a.gamma)  # refuses gamma = 0, whose flat directions never relax
    check_trust_checks(a.trust_checks)
    callbacks = check_callbacks(a.callbacks)
    check_loader(loader)
    init_method, init_batches, init_chosen = init_loss_plan(a.init_loss, a.num_init_batches, a.num_chains,
                                                            a.num_draws, loader, a.grad_accum_steps)
    sampler, sampler_kwargs, box = check_sampler_args(a.sampler, a.sampler_kwargs, a.bounding_box, a.noise_scale)
    check_mala(a.mala, sampler, box, a.noise_scale)
    return Arguments(auto=auto, args=args, init_method=init_method, init_batches=init_batches,
                     init_chosen=init_chosen, sampler=sampler, sampler_kwargs=sampler_kwargs, bounding_box=box,
                     callbacks=callbacks)
