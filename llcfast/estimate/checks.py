"""Pieces both estimate_llc backends share: argument checks, the plan for the
loss at w*, and the result of a finished run."""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import numpy as np

from .._checks import check_float, check_int
from ..engine.common import finite_batches
from ..engine.samplers import check_sampler
from .result import LLCResult


def check_llc_args(*, num_chains, num_draws, num_burnin, steps_between_draws, epsilon, gamma, nbeta, weight_decay,
                   noise_scale, num_init_batches, seed, grad_accum_steps=1) -> None:
    check_int("num_chains", num_chains, minimum=1, maximum=2**32)
    check_int("grad_accum_steps", grad_accum_steps, minimum=1)
    check_int("num_draws", num_draws, minimum=1)
    check_int("num_burnin", num_burnin)
    check_int("steps_between_draws", steps_between_draws, minimum=1)
    check_float("epsilon", epsilon, minimum=0.0)
    if epsilon == 0:
        raise ValueError("epsilon must be > 0, got 0")
    check_float("gamma", gamma, minimum=0.0)
    if nbeta is not None and check_float("nbeta", nbeta) <= 0:
        raise ValueError(f"nbeta must be > 0, got {nbeta}")
    check_float("weight_decay", weight_decay, minimum=0.0)
    check_float("noise_scale", noise_scale, minimum=0.0)
    if num_init_batches is not None and num_init_batches != "all":
        if isinstance(num_init_batches, str):
            raise ValueError(f"num_init_batches must be an int >= 1, 'all' or None, got {num_init_batches!r}")
        check_int("num_init_batches", num_init_batches, minimum=1)
    check_int("seed", seed)


def check_callbacks(callbacks) -> tuple:
    """The callbacks as a tuple; one function alone, or None, is accepted."""
    if callbacks is None:
        return ()
    if callable(callbacks):
        return (callbacks,)
    try:
        found = tuple(callbacks)
    except TypeError:
        raise TypeError(f"callbacks must be a list of functions, got {type(callbacks).__name__}") from None
    for i, cb in enumerate(found):
        if not callable(cb):
            raise TypeError(f"callbacks[{i}] is {cb!r}, which is not callable; each callback is a function called "
                            "after every step as cb(step=..., chains=..., loss=..., params=...)")
    return found


def check_sampler_args(sampler, sampler_kwargs, bounding_box, noise_scale):
    """check_sampler plus the one cross-check estimate_llc needs: SGNHT's
    noise is set by its diffusion factor, not by noise_scale."""
    sampler, kwargs, box = check_sampler(sampler, sampler_kwargs, bounding_box)
    if sampler == "sgnht" and noise_scale != 1.0:
        raise ValueError(f"noise_scale={noise_scale} does not apply to sampler='sgnht', whose noise is "
                         "sqrt(2 * diffusion * epsilon); set sampler_kwargs={'diffusion': ...} instead")
    return sampler, kwargs, box


def check_mala(mala, sampler: str, bounding_box: float, noise_scale: float) -> bool:
    """MALA acceptance is defined for plain SGLD's Gaussian proposal."""
    if not isinstance(mala, bool):
        raise TypeError(f"mala must be True or False, got {mala!r}")
    if mala and sampler != "sgld":
        raise ValueError(f"mala=True measures SGLD's Langevin proposal; sampler={sampler!r} proposes differently. "
                         "Use sampler='sgld' or mala=False")
    if mala and bounding_box:
        raise ValueError("mala=True needs the unclamped Gaussian proposal; drop bounding_box or set mala=False")
    if mala and noise_scale == 0:
        raise ValueError("mala=True needs noise (noise_scale > 0): without it the proposal has no density")
    return mala


def mala_diagnostics(trace: Optional[np.ndarray], diverged_at: dict) -> dict:
    """Per-chain and overall mean MALA acceptance of the steps, NaN for the
    steps from a chain's divergence on; {} when not recorded."""
    if trace is None:
        return {}
    trace = np.array(trace, dtype=np.float64)
    for c, t in diverged_at.items():
        trace[c, max(t - 1, 0):] = np.nan
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN chains
        per_chain = np.nanmean(trace, axis=1) if trace.shape[1] else np.full(trace.shape[0], np.nan)
        overall = float(np.nanmean(trace)) if np.isfinite(trace).any() else math.nan
    return {"mala_acceptance": overall, "mala_acceptance_per_chain": per_chain, "mala_acceptance_trace": trace}


INIT_LOSSES = ("auto", "exact", "paired", "batches")


def init_loss_plan(init_loss: str, num_init_batches, num_chains: int, num_draws: int, loader,
                   grad_accum_steps: int = 1) -> Tuple[str, int, bool]:
    """(method, batches the loss at w* averages up front, whether the user
    chose that count) for estimate_llc's ``init_loss``:

    "exact": the mean loss at w* over every batch of a loader that is one
        fixed set (a list, a DataLoader over a map-style dataset without
        replacement); no sampling error.
    "paired": at every step the loss at w* on the very batch of each chain's
        draw, so each draw is L_B(w_t) - L_B(w*): w* is one more chain that
        never moves. No fixed set needed, and its error shows in the spread
        across chains.
    "batches": the mean over ``num_init_batches`` batches (default one per
        chain, devinterp 1.x's estimate), whose sampling error, times nbeta,
        shifts every chain alike and is not in the spread across chains.
    "auto": exact where the loader is a fixed set of no more batches than
        the pairing would evaluate (chains x draws), else paired; an int
        ``num_init_batches`` means "batches", "all" means "exact"."""
    if init_loss not in INIT_LOSSES:
        raise ValueError(f"init_loss must be one of {INIT_LOSSES}, got {init_loss!r}")
    if num_init_batches == "all":
        if init_loss not in ("auto", "exact"):
            raise ValueError(f"num_init_batches='all' is init_loss='exact'; it does not go with "
                             f"init_loss={init_loss!r}")
        init_loss = "exact"
    elif num_init_batches is not None:
        if init_loss not in ("auto", "batches"):
            raise ValueError(f"num_init_batches={num_init_batches!r} sets how many batches init_loss='batches' "
                             f"averages; it does not go with init_loss={init_loss!r}")
        return "batches", num_init_batches, True
    total = finite_batches(loader)
    if init_loss == "auto":
        init_loss = "exact" if total is not None and total <= num_chains * num_draws * grad_accum_steps else "paired"
    if init_loss == "batches":
        return "batches", num_chains, False
    if init_loss == "paired":
        return "paired", 0, False
    if total is None:
        shown = "num_init_batches='all'" if num_init_batches == "all" else "init_loss='exact'"
        raise ValueError(f"{shown} needs a loader that is one fixed set of batches (a list of "
                         f"batches, or a DataLoader over a map-style dataset without replacement); this "
                         f"{type(loader).__name__} is not one, so use init_loss='paired' (the loss at w* on "
                         "each draw's batch) or pass a number of batches")
    return "exact", total, True


def paired_spread(loader) -> dict:
    """init_loss's spread for init_loss="paired", which averages no batches up front."""
    return {"init_loss_per_batch": [], "init_loss_se": math.nan, "loader_batches": finite_batches(loader)}


def init_loss_diagnostics(spread: dict, nbeta: float, method: str = "batches") -> dict:
    """llc_se_from_init_loss: nbeta times the init loss's standard error,
    with the finite-population correction sqrt(1 - k/N) where its k batches
    are drawn from the N the chains sample: an init loss over all N is the
    exact loss at w* on the data the chains see. A paired init loss hides
    no error: it varies with each draw's batch, so the spread across
    chains carries it."""
    k, total = len(spread["init_loss_per_batch"]), spread.get("loader_batches")
    correction = math.sqrt(max(1.0 - k / total, 0.0)) if total else 1.0
    se = spread["init_loss_se"]
    if correction == 0.0 or method == "paired":  # the whole set, or paired: no hidden error, even from one batch
        se = 0.0
    return dict(spread, init_loss_method=method, llc_se_from_init_loss=nbeta * se * correction)


def finish(trace, l0: float, nbeta: float, stats: np.ndarray, steps_run: np.ndarray, *, config: dict,
           timings: dict, diagnostics: Optional[dict] = None, stacklevel: int = 3, init_trace=None):
    """The LLCResult of a finished run, with the warnings a user must see:
    diverged chains (left out) and a negative estimate. ``init_trace``
    [C, draws]: the paired losses at w* on the draws' batches (l0 is then
    ignored: the result's init_loss is their mean)."""
    per_step = stats / np.maximum(steps_run, 1)[:, None]
    diag = {"grad_norm_sq_mean": per_step[:, 0], "distance_sq_mean": per_step[:, 1],
            "noise_norm_sq_mean": per_step[:, 2], **(diagnostics or {})}
    if init_trace is not None:
        finite = np.asarray(init_trace)[np.isfinite(init_trace)]
        l0 = float(finite.mean()) if finite.size else math.nan
    result = LLCResult.from_traces(trace, l0, nbeta, config=config, diagnostics=diag, timings=timings,
                                   init_trace=init_trace)
    diverged = result.diagnostics["diverged_chains"]
    if diverged:
        warnings.warn(f"chains {diverged} diverged (non-finite loss) and were left out of the estimate; "
                      "lower epsilon or raise gamma", RuntimeWarning, stacklevel=stacklevel)
    if math.isfinite(result.llc_mean) and result.llc_mean < 0:
        warnings.warn(f"the LLC estimate is negative ({result.llc_mean:.4g}): the loss fell below its value at w*, "
                      "so w* is not a local minimum of the sampled loss (or the chains have not equilibrated)",
                      RuntimeWarning, stacklevel=stacklevel)
    return result
