"""The recipe's automatic settings, shared by both backends: epsilon="auto"
(pilot runs until the step-size rule holds where the chains go),
num_burnin="auto" (the slow modes' relaxation time) and gamma="auto" (halve
gamma until the estimate at gamma and gamma / 2 agree within error).

Each takes the backend's own estimate_llc, so the fast engine and the
reference run the same procedure."""
from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Callable

import numpy as np

from ..engine.common import check_differentiable, default_loss, default_nbeta, loss_at_w_star, resolve_device
from ..engine.loaders import check_loader
from .trust import first_batches, relaxation_steps, safe_epsilon, top_eigenvalues

# epsilon="auto": pilot chains, rounds at most, and the share of the last epsilon a new one may fall to and stop
AUTO_PILOT_CHAINS, AUTO_ROUNDS, AUTO_STABLE = 4, 6, 0.8
AUTO_PILOT_MIN_STEPS, AUTO_PILOT_MAX_STEPS = 100, 5000
AUTO_DIVERGED_CUT, AUTO_MAX_CUTS = 10.0, 4  # a pilot whose chains diverged runs again at a tenth of the step
# The end points of the run itself differ from the pilots': epsilon is set this far inside the rule, so that
# the run's own step-size check holds where its chains end
AUTO_MARGIN = 0.8
# gamma="auto": the first gamma of the ladder, how many halvings at most, and how many combined standard
# errors two neighbouring estimates may differ by and still agree
GAMMA_START, GAMMA_ROUNDS, GAMMA_AGREE = 100.0, 6, 1.0


def check_auto(name: str, value) -> bool:
    """True where ``value`` asks for the automatic setting; a stray string is
    refused with the values allowed."""
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"{name} must be a number or 'auto', got {value!r}")
        return True
    return False


def auto_epsilon(estimate: Callable, model, loader, loss_fn, settings: dict):
    """``estimate`` at the epsilon the step-size rule allows where pilot
    chains go: start from the rule at w*, run AUTO_PILOT_CHAINS chains for
    the slow modes' relaxation time 2 / (epsilon * gamma) (at most the run's
    own length), take the top eigenvalue at their end points, and repeat
    from the epsilon it allows until that epsilon stops falling."""
    started = time.perf_counter()
    check_loader(loader)
    device = resolve_device(settings.get("device"), model)
    accum = settings.get("grad_accum_steps", 1)
    nbeta = settings["nbeta"]
    nbeta = float(nbeta) if nbeta is not None else default_nbeta(loader, accum)
    gamma, seed = settings["gamma"], settings["seed"]
    on_device = all(p.device == device for p in model.parameters())
    # A loss that is not finite at w*, or has no gradient path to the weights, is named as the run itself
    # would name it, before any Hessian is taken
    here = model if on_device else copy.deepcopy(model).to(device)
    loss_at_w_star(here, loader, loss_fn or default_loss, 1, device, seed=seed)
    check_differentiable(here, loss_fn or default_loss, loader, device, seed=seed)
    lam = float(top_eigenvalues(model, loss_fn or default_loss, first_batches(loader, seed), None,
                                restrict=settings["restrict"], precision=settings.get("precision", "fp32"),
                                device=device, seed=seed)[0][0])
    if not math.isfinite(lam):
        raise ValueError(f"epsilon='auto': the Hessian's top eigenvalue at w* is {lam}; pass a number for epsilon")
    epsilon = AUTO_MARGIN * safe_epsilon(nbeta, gamma, lam)
    history = [{"pilot": 0, "lambda_max": lam, "epsilon": epsilon, "steps": 0}]
    burn = settings["num_burnin"]
    pilot = dict(settings, num_chains=min(settings["num_chains"], AUTO_PILOT_CHAINS), num_burnin=0,
                 steps_between_draws=1, nbeta=nbeta, progress=False, callbacks=(), init_loss="batches",
                 num_init_batches=1, mala=False, trust_checks=True)
    measured = cuts = 0
    while measured < AUTO_ROUNDS:
        total = (relaxation_steps(epsilon, gamma) if burn == "auto" else burn) + \
            settings["num_draws"] * settings["steps_between_draws"]
        steps = int(min(total, AUTO_PILOT_MAX_STEPS, max(AUTO_PILOT_MIN_STEPS, 2 / (epsilon * gamma))
                        if gamma > 0 else total))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the pilots' own verdicts are not the user's
            run = estimate(model, loader, loss_fn, **dict(pilot, epsilon=epsilon, num_draws=steps))
        pilot_number = len(history)
        if run.diagnostics.get("diverged_chains"):  # far too large a step: cut it and look again
            cuts += 1
            if cuts > AUTO_MAX_CUTS:
                raise ValueError(f"epsilon='auto': the pilot chains still diverged at epsilon {epsilon:.3g}; the "
                                 "loss may have no minimum near w* (see gamma), or pass a smaller epsilon")
            epsilon /= AUTO_DIVERGED_CUT
            history.append({"pilot": pilot_number, "diverged_chains": list(run.diagnostics["diverged_chains"]),
                            "epsilon": epsilon, "steps": steps})
            continue
        check = run.diagnostics["step_check"]
        if "skipped" in check:
            raise ValueError(f"epsilon='auto' needs the Hessian at the pilot chains' end points, which could not "
                             f"be taken ({check['skipped']}); pass a number for epsilon")
        measured += 1
        lam = max(lam, float(np.max(check["lambda_max_at_chains"])))
        allowed = AUTO_MARGIN * safe_epsilon(nbeta, gamma, lam)
        history.append({"pilot": pilot_number, "lambda_max": lam, "epsilon": allowed, "steps": steps})
        stable = allowed >= AUTO_STABLE * epsilon  # the rule holds, or nearly, where the pilot chains went
        epsilon = min(epsilon, allowed)
        if stable:
            break
    result = estimate(model, loader, loss_fn, epsilon=epsilon, **settings)
    result.config["epsilon_auto"] = history
    result.timings["epsilon_auto_s"] = time.perf_counter() - started - result.timings.get("total_s", 0.0)
    return result


def gammas_agree(a, b) -> bool:
    """Two estimates agree when they differ by at most GAMMA_AGREE combined
    standard errors."""
    return abs(a.llc_mean - b.llc_mean) <= GAMMA_AGREE * math.hypot(a.llc_se, b.llc_se)


def auto_gamma(estimate: Callable, model, loader, loss_fn, settings: dict):
    """The recipe's gamma: from GAMMA_START, halve gamma until the estimates
    at gamma and gamma / 2 agree within their error, and return the estimate
    at the larger of the two (the smallest gamma whose answer halving no
    longer moves). ``config["gamma_auto"]`` lists the ladder."""
    started = time.perf_counter()
    gamma = GAMMA_START
    current = estimate(model, loader, loss_fn, gamma=gamma, **settings)
    ladder = [_rung(gamma, current)]
    chosen = None
    for _ in range(GAMMA_ROUNDS):
        half = estimate(model, loader, loss_fn, gamma=gamma / 2, **settings)
        ladder.append(_rung(gamma / 2, half))
        if gammas_agree(current, half):
            chosen = current
            break
        gamma, current = gamma / 2, half
    if chosen is None:
        warnings.warn(f"gamma='auto': the estimate still moved between gamma = {2 * gamma:g} and {gamma:g} "
                      f"after {GAMMA_ROUNDS} halvings from {GAMMA_START:g}; returning gamma = {gamma:g}. The loss "
                      "may have no minimum here (see the gradient check), or the chains need more draws to "
                      "resolve the difference", stacklevel=3)
        chosen = current
    chosen.config["gamma_auto"] = ladder
    chosen.timings["gamma_auto_s"] = time.perf_counter() - started - chosen.timings.get("total_s", 0.0)
    return chosen


def _rung(gamma: float, result) -> dict:
    return {"gamma": gamma, "llc_mean": result.llc_mean, "llc_se": result.llc_se,
            "epsilon": result.config["epsilon"], "verdict": result.verdict()}
