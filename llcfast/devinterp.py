"""devinterp 1.x's entry points, run by llcfast: change the import, keep the call.

    from llcfast.devinterp import estimate_learning_coeff_with_summary

takes the arguments of ``devinterp.slt.sampler.estimate_learning_coeff_with_summary``
(devinterp 1.3.2), with devinterp's defaults, and returns the dictionary it
returns, computed by ``llcfast.estimate_llc`` with all chains at once.
devinterp need not be installed: its samplers are recognised by name.

What maps to what (devinterp -> llcfast): ``optimizer_kwargs`` lr -> epsilon,
localization -> gamma, nbeta (or the deprecated temperature) -> nbeta,
noise_level -> noise_scale, weight_decay, bounding_box_size -> bounding_box;
RMSprop-SGLD's eps -> rms_eps and alpha; SGNHT's diffusion_factor ->
diffusion. num_burnin_steps -> num_burnin, num_steps_bw_draws ->
steps_between_draws, optimize_over_per_model_param -> restrict (a parameter
left out of it stays at w*), verbose -> progress. The init loss averages
num_chains x grad_accum_steps batches and the model runs in train mode, as
in devinterp (so dropout is active, with a warning); its train/eval mode is
restored afterwards.

Where the two differ: llcfast's noise is keyed by (seed, chain), so a list
of per-chain seeds becomes one seed (a hash of the list) and seed=None one
drawn from torch's global generator. ``cores`` and ``gpu_idxs`` are not
needed (every chain already runs at once; several GPUs are a torchrun job,
README "Many processes") and gpu_idxs is refused. ``use_amp`` runs the
forward pass in bf16 on CUDA (devinterp: float16) and, as in devinterp, not
at all on a CPU. Of devinterp's callbacks only MalaAcceptanceRate is known
(its results come from ``mala=True``, one value per step, without the
placeholder 0 devinterp puts in the first column); llcfast's own callbacks
have another signature. ``init_loss=0.0`` is used as given (devinterp
recomputes it). A chain that diverges is reported (NaN in its
``llc-chain/i``) instead of raising. Further keyword arguments (backend,
precision, compile, ...) go to llcfast.estimate_llc, and the returned dict's
``.result`` is the whole LLCResult, with its diagnostics.
"""
from __future__ import annotations

import operator
import warnings
import zlib
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from ._checks import check_float, check_int
from .engine.common import active_dropout
from .estimate.llc import estimate_llc
from .estimate.result import LLCResult

_SGLD = {"lr": "epsilon", "localization": "gamma", "nbeta": "nbeta", "noise_level": "noise_scale",
         "weight_decay": "weight_decay", "bounding_box_size": "bounding_box"}
# Switches that only make devinterp's optimizer keep extra tensors for its
# callbacks; they change no number.
_RECORDING = ("save_noise", "save_mala_vars", "noise_norm", "grad_norm", "weight_norm", "distance", "metrics")
# devinterp's sampler -> (llcfast's sampler, devinterp's optimizer keyword ->
# estimate_llc's argument, devinterp's keyword -> sampler_kwargs' key).
_SAMPLERS = {
    "SGLD": ("sgld", _SGLD, {}),
    "sgld": ("sgld", _SGLD, {}),
    "rmsprop_sgld": ("rmsprop_sgld", _SGLD, {"alpha": "alpha", "eps": "rms_eps"}),
    "SGNHT": ("sgnht", {"lr": "epsilon", "nbeta": "nbeta", "bounding_box_size": "bounding_box"},
              {"diffusion_factor": "diffusion"}),
}
# devinterp's defaults that differ from estimate_llc's
_DEVINTERP_DEFAULTS = {"epsilon": 0.01, "gamma": 0.0}
_NEGATIVE = "the LLC estimate is negative"  # the start of finish()'s warning


class DevinterpResults(dict):
    """devinterp's result dictionary; ``.result`` is llcfast's LLCResult."""
    result: LLCResult


def _sampler(sampling_method) -> Tuple[str, dict, dict]:
    if isinstance(sampling_method, str):
        name = {"sgnht": "SGNHT", "SGLD": None, "SGNHT": None}.get(sampling_method, sampling_method)
    else:
        name = getattr(sampling_method, "__name__", None)
        owner = getattr(getattr(sampling_method, "__self__", None), "__name__", None)
        if name == "sgnht" and owner == "SGMCMC":
            raise ValueError("devinterp's SGMCMC.sgnht is another update than llcfast's sgnht; pass "
                             "devinterp.optim.SGNHT (the class) or sampling_method='sgnht' for llcfast's")
    if name not in _SAMPLERS:
        raise ValueError(f"sampling_method must be devinterp's SGLD, SGMCMC.sgld, SGMCMC.rmsprop_sgld or SGNHT, or "
                         f"one of 'sgld', 'rmsprop_sgld', 'sgnht'; got {sampling_method!r}")
    return _SAMPLERS[name]


def _translate(sampling_method, optimizer_kwargs: Optional[dict]) -> dict:
    sampler, common, own = _sampler(sampling_method)
    given = dict(optimizer_kwargs or {})
    if "temperature" in given:
        if "nbeta" in given:
            raise ValueError("optimizer_kwargs has both temperature and nbeta; temperature is the deprecated name "
                             "of nbeta, so pass nbeta only")
        given["nbeta"] = given.pop("temperature")
    if sampler == "rmsprop_sgld" and given.pop("add_grad_correction", False):
        raise ValueError("add_grad_correction=True is not implemented by llcfast's rmsprop_sgld; leave it False")
    out: dict = {"sampler": sampler, "sampler_kwargs": {}, **_DEVINTERP_DEFAULTS}
    for key, value in given.items():
        if key in common:
            out[common[key]] = value
        elif key in own:
            out["sampler_kwargs"][own[key]] = value
        elif key in _RECORDING:
            continue
        elif key == "optimize_over":
            raise ValueError("optimizer_kwargs['optimize_over'] is not taken; pass optimize_over_per_model_param "
                             "({parameter name: bool mask}) instead")
        else:
            allowed = sorted([*common, *own, *_RECORDING, *(("temperature",) if "nbeta" in common else ())])
            raise ValueError(f"optimizer_kwargs: {key!r} is not an argument of {sampler}; allowed: {allowed}")
    labels = {v: k for k, v in common.items()}
    for key in ("epsilon", "gamma", "nbeta", "noise_scale", "weight_decay", "bounding_box"):
        if out.get(key) is not None:
            minimum = None if key in ("epsilon", "nbeta", "bounding_box") else 0.0
            value = check_float(f"optimizer_kwargs[{labels.get(key, key)!r}]", out[key], minimum=minimum)
            if minimum is None and value <= 0:
                raise ValueError(f"optimizer_kwargs[{labels.get(key, key)!r}] must be > 0, got {out[key]}")
    return out


def _integer(name: str, value) -> int:
    """An int >= 0 from any integer type (numpy's too, as devinterp takes)."""
    try:
        return check_int(name, operator.index(value))
    except TypeError:
        raise TypeError(f"{name} must be an int >= 0, got {value!r}") from None


def _seed(seed, num_chains: int) -> int:
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, ()).item())
    if isinstance(seed, (list, tuple, np.ndarray)):
        if len(seed) != num_chains:
            raise ValueError(f"a list of seeds needs one per chain: {num_chains} chains, got {len(seed)} seeds")
        return zlib.crc32(repr([_integer(f"seed[{i}]", s) for i, s in enumerate(seed)]).encode())
    return _integer("seed", seed)


def _loss_fn(evaluate: Optional[Callable]) -> Optional[Callable]:
    """devinterp's evaluate returns a loss tensor, a tuple or list starting
    with it, a dict with 'loss', or an object with .loss."""
    if evaluate is None:
        return None
    if not callable(evaluate):
        raise TypeError(f"evaluate must be a function evaluate(model, batch), got {evaluate!r}")

    def loss_fn(model, batch):
        out = evaluate(model, batch)
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, (tuple, list)) and out:
            return out[0]
        if isinstance(out, dict) and "loss" in out:
            return out["loss"]
        if hasattr(out, "loss"):
            return out.loss
        raise TypeError(f"evaluate must return a loss tensor, a tuple starting with it, a dict with 'loss' or an "
                        f"object with .loss; got {type(out).__name__}")
    return loss_fn


def _mala(callbacks) -> bool:
    mala = False
    for i, cb in enumerate(callbacks or ()):
        if type(cb).__name__ == "MalaAcceptanceRate":
            mala = True
        elif type(cb).__name__ in ("LLCEstimator", "OnlineLLCEstimator"):
            raise ValueError(f"callbacks[{i}] is devinterp's {type(cb).__name__}, which the function adds itself "
                             "(online=True for the online one); leave it out")
        else:
            raise ValueError(f"callbacks[{i}] is a {type(cb).__name__}; of devinterp's callbacks only "
                             "MalaAcceptanceRate is known here. For others, call llcfast.estimate_llc with "
                             "callbacks=[f], f(step=..., chains=..., loss=..., params=...)")
    return mala


def _precision(use_amp, device, llcfast_kwargs: dict) -> str:
    if not isinstance(use_amp, bool):
        raise TypeError(f"use_amp must be True or False, got {use_amp!r}")
    if "precision" in llcfast_kwargs:
        if use_amp:
            raise ValueError("pass either use_amp or precision, not both")
        return llcfast_kwargs.pop("precision")
    if use_amp and torch.device(device).type != "cuda":
        warnings.warn("use_amp=True is ignored on a CPU, as in devinterp", stacklevel=3)
        return "fp32"
    return "bf16" if use_amp else "fp32"


def _restrict(masks: Optional[dict]):
    if masks is None:
        return None
    if not isinstance(masks, dict):
        raise TypeError(f"optimize_over_per_model_param must be a dict {{parameter name: bool mask}}, "
                        f"got {type(masks).__name__}")
    return {name: torch.as_tensor(m).to("cpu", torch.bool) for name, m in masks.items()}


def estimate_learning_coeff_with_summary(model: torch.nn.Module, loader, callbacks=(), evaluate=None,
                                         sampling_method="sgld", optimizer_kwargs: Optional[dict] = None,
                                         num_draws: int = 100, num_chains: int = 10, num_burnin_steps: int = 0,
                                         num_steps_bw_draws: int = 1, init_loss: Optional[float] = None,
                                         grad_accum_steps: int = 1, cores=1, seed=None, device="cpu",
                                         gpu_idxs=None, verbose: bool = True, optimize_over_per_model_param=None,
                                         online: bool = False, use_amp: bool = False,
                                         **llcfast_kwargs) -> DevinterpResults:
    """devinterp 1.3.2's estimate_learning_coeff_with_summary on llcfast's
    engine: {"llc/mean", "llc/std", "llc-chain/i", "loss/trace"}, or with
    online=True {"init_loss", "llc/means", "llc/stds", "llc/trace",
    "loss/trace"} (per draw: nbeta * (loss - init loss), and its mean and
    standard deviation across chains), plus "mala_accept/trace", "/mean" and
    "/std" when a MalaAcceptanceRate is among the callbacks. See the module
    docstring for how the arguments map."""
    if gpu_idxs is not None:
        raise ValueError(f"gpu_idxs={gpu_idxs!r}: llcfast runs every chain at once on `device`; to spread chains "
                         "over several GPUs, launch with torchrun (README, 'Many processes')")
    if not isinstance(cores, (int, list, tuple)):
        raise TypeError(f"cores must be an int or a list of devices, got {cores!r}")
    taken = set(llcfast_kwargs) & {"loss_fn", "num_burnin", "steps_between_draws", "epsilon", "gamma", "nbeta",
                                   "sampler", "sampler_kwargs", "restrict", "mala", "num_init_batches", "progress"}
    if taken:
        raise ValueError(f"{sorted(taken)} are set from devinterp's arguments here; pass those instead "
                         "(or call llcfast.estimate_llc)")
    if not isinstance(online, bool):
        raise TypeError(f"online must be True or False, got {online!r}")
    kwargs = _translate(sampling_method, optimizer_kwargs)
    num_chains = check_int("num_chains", num_chains, minimum=1)
    grad_accum_steps = check_int("grad_accum_steps", grad_accum_steps, minimum=1)
    given_init = None if init_loss is None else check_float("init_loss", init_loss)
    precision = _precision(use_amp, device, llcfast_kwargs)
    args = dict(num_chains=num_chains, num_draws=check_int("num_draws", num_draws, minimum=1),
                num_burnin=check_int("num_burnin_steps", num_burnin_steps),
                steps_between_draws=check_int("num_steps_bw_draws", num_steps_bw_draws, minimum=1),
                grad_accum_steps=grad_accum_steps, num_init_batches=num_chains * grad_accum_steps,
                restrict=_restrict(optimize_over_per_model_param), seed=_seed(seed, num_chains), device=device,
                progress=bool(verbose), mala=_mala(callbacks), precision=precision,
                **dict(dict(draw_batches="step"), **kwargs, **llcfast_kwargs))  # devinterp's draws unless asked
    was_training = model.training
    model.train()
    dropout = active_dropout(model)
    if dropout:
        warnings.warn(f"dropout is active ({dropout}), since devinterp runs the model in train mode, so the loss "
                      "is random and seed does not fix it; for a deterministic loss call llcfast.estimate_llc on "
                      "model.eval()", UserWarning, stacklevel=2)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="dropout is active")  # estimate_llc's, said above
            if given_init is None:
                result = estimate_llc(model, loader, _loss_fn(evaluate), **args)
            else:
                result = _with_init_loss(model, loader, _loss_fn(evaluate), given_init, args)
    finally:
        model.train(was_training)
    return to_devinterp(result, online=online)


def _with_init_loss(model, loader, loss_fn, init_loss: float, args: dict) -> LLCResult:
    """estimate_llc's chains measured against a given init loss: its own
    (from one batch) is replaced, and so is the warning a negative LLC gets."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = estimate_llc(model, loader, loss_fn, **dict(args, num_init_batches=1))
    for w in caught:
        if not str(w.message).startswith(_NEGATIVE):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    diagnostics = {k: v for k, v in result.diagnostics.items() if not k.startswith("init_loss")}
    diagnostics["llc_se_from_init_loss"] = float("nan")  # the caller's value: its error is not known here
    result = LLCResult.from_traces(result.loss_trace, init_loss, result.config["nbeta"],
                                   config=dict(result.config, init_loss_given=True), timings=result.timings,
                                   diagnostics=diagnostics)
    if result.llc_mean < 0:
        warnings.warn(f"{_NEGATIVE} ({result.llc_mean:.4g}) against the given init_loss {init_loss:.6g}: the "
                      "chains' loss fell below it", RuntimeWarning, stacklevel=3)
    return result


def to_devinterp(result: LLCResult, *, online: bool = False) -> DevinterpResults:
    """An LLCResult as devinterp's result dictionary (see
    estimate_learning_coeff_with_summary)."""
    trace = np.asarray(result.loss_trace, dtype=np.float32)  # [C, draws]; devinterp keeps float32
    out: Dict[str, object]
    if online:
        llcs = (result.config["nbeta"] * (result.loss_trace - result.init_loss)).astype(np.float32)  # [C, draws]
        stds = llcs.std(axis=0, ddof=1) if llcs.shape[0] > 1 else np.full(llcs.shape[1], np.nan, np.float32)
        out = {"init_loss": result.init_loss, "llc/means": llcs.mean(axis=0), "llc/stds": stds, "llc/trace": llcs,
               "loss/trace": trace}
    else:
        out = {"llc/mean": result.llc_mean, "llc/std": result.llc_std,
               **{f"llc-chain/{c}": float(v) for c, v in enumerate(result.llc_per_chain)}, "loss/trace": trace}
    accept = result.diagnostics.get("mala_acceptance_trace")
    if accept is not None:
        # numpy float32 scalars, as devinterp's np.mean of its float32 trace gives
        out.update({"mala_accept/trace": np.asarray(accept, dtype=np.float32),
                    "mala_accept/mean": np.float32(np.nanmean(accept)),
                    "mala_accept/std": np.float32(np.nanstd(accept))})
    results = DevinterpResults(out)
    results.result = result
    return results


def estimate_learning_coeff(model: torch.nn.Module, loader, *args, **kwargs) -> float:
    """devinterp 1.3.2's estimate_learning_coeff: the mean LLC across chains
    (the arguments of estimate_learning_coeff_with_summary)."""
    if kwargs.get("online"):
        raise ValueError("estimate_learning_coeff returns one number; for online=True call "
                         "estimate_learning_coeff_with_summary")
    return float(estimate_learning_coeff_with_summary(model, loader, *args, **kwargs)["llc/mean"])
