"""What the sampler, the Hessian statistics and the estimators all use: the loss
convention, devices and batches, the nbeta default, the loss at w*, restriction
masks, precision."""
from __future__ import annotations

import contextlib
import fnmatch
import itertools
import math
import warnings
from collections.abc import Mapping
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from .loaders import batch_size_of, loader_batches


def call_model(model: torch.nn.Module, batch):
    """The model called on the batch's parts: ``model(**batch)`` for a
    mapping, ``model(*batch)`` for a tuple or list, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(*batch) if isinstance(batch, (tuple, list)) else model(batch)


def default_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    """Hugging Face convention: the model's output carries ``.loss``."""
    call = "model(**batch)" if isinstance(batch, Mapping) else \
        "model(*batch)" if isinstance(batch, (tuple, list)) else "model(batch)"
    try:
        out = call_model(model, batch)
    except TypeError as exc:
        raise TypeError(f"no loss_fn was given, so the loss is taken from {call}.loss (the Hugging Face "
                        f"convention), but that call failed: {exc}; pass loss_fn=lambda model, batch: "
                        "<scalar loss>") from exc
    loss = getattr(out, "loss", None)
    if loss is None:
        raise TypeError(f"no loss_fn was given, and the output of {call} has no .loss; "
                        "pass loss_fn=lambda model, batch: <scalar loss>")
    return loss


def map_tensors(batch, fn: Callable):
    """``fn`` applied to every tensor of a batch (nested tuples, lists, dicts)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def resolve_device(device, model: torch.nn.Module) -> torch.device:
    """``device`` as a torch.device (default: where the model's parameters
    are), with a message that says what to pass where it cannot be used."""
    if device is None:
        first = next(model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a device torch knows ({first_line(exc)}); "
                         "pass 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(resolved)!r}, but torch sees no CUDA GPU here "
                             "(torch.cuda.is_available() is False); pass device='cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(resolved)!r}, but torch sees {torch.cuda.device_count()} CUDA GPU(s); "
                             f"pass cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return resolved


def to_device(batch, device: torch.device):
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def default_nbeta(loader, grad_accum_steps: int = 1) -> float:
    """m / log(m) for batch size m, devinterp 1.x's default; with gradient
    accumulation m is the effective batch, micro-batch size x steps."""
    m = batch_size_of(loader) * grad_accum_steps
    if m < 2:
        raise ValueError(f"the default nbeta = m/log(m) needs batch size m >= 2, got {m}; pass nbeta explicitly")
    return m / math.log(m)


HOT_NBETA = 4.0  # nbeta this many times m / log m, with minibatches, heats the chains measurably


def resolve_nbeta(nbeta, loader, grad_accum_steps: int = 1, stacklevel: int = 3) -> float:
    """nbeta as given, or m / log m; a warning where a given nbeta is far
    above m / log m and the chains step on minibatches: each step's gradient
    noise is then amplified by nbeta beyond what the temperature allows, the
    chains run hot, and the estimate comes out high."""
    if nbeta is None:
        return default_nbeta(loader, grad_accum_steps)
    nbeta = float(nbeta)
    total = finite_batches(loader)
    if total == 1:  # full-batch sampling: no minibatch noise
        return nbeta
    try:
        m = batch_size_of(loader) * grad_accum_steps
    except ValueError:
        return nbeta
    if m >= 2 and nbeta > HOT_NBETA * m / math.log(m):
        warnings.warn(f"nbeta={nbeta:.4g} is {nbeta / (m / math.log(m)):.1f} x m / log m = {m / math.log(m):.4g} for "
                      f"minibatches of m = {m}: the minibatch gradient noise, scaled by nbeta, heats the chains and "
                      "biases the estimate up; use larger batches (or grad_accum_steps), full-batch sampling, or "
                      "a smaller nbeta", UserWarning, stacklevel=stacklevel)
    return nbeta


def cool_accumulation(nbeta: float, loader) -> int:
    """The fewest micro-batches per step (grad_accum_steps) whose effective
    batch M keeps nbeta within HOT_NBETA x M / log M, so that the minibatch
    noise does not heat the chains; at most one epoch of a fixed set of
    batches (the full-batch gradient), 1 where the batch size is unknown."""
    total = finite_batches(loader)
    try:
        m = batch_size_of(loader)
    except ValueError:
        return 1
    k = 1
    while (total is None or k < total) and (m * k < 2 or nbeta > HOT_NBETA * m * k / math.log(m * k)):
        k += 1
    return k


def checked_loss(loss, where: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor, got {shape} {where}")
    return loss.reshape(())


def draw_slice(num_burnin: int, steps_between_draws: int) -> slice:
    """The steps whose losses are the draws: the last step of each interval
    of steps_between_draws after burn-in, as in devinterp 1.x (draw j is
    step num_burnin + (j + 1) * steps_between_draws - 1), so a run ends on a
    draw and no step is wasted."""
    return slice(num_burnin + steps_between_draws - 1, None, steps_between_draws)


def is_draw_step(step: int, num_burnin: int, steps_between_draws: int) -> bool:
    """Whether ``step`` is one of draw_slice's steps."""
    return step >= num_burnin and (step - num_burnin) % steps_between_draws == steps_between_draws - 1


def loss_at_w_star(model, loader, loss_fn: Callable, num_batches: int, device, *, seed: int = 0,
                   requested: bool = False, stacklevel: int = 3) -> Tuple[float, dict]:
    """Mean minibatch loss at w* over the loader's first ``num_batches``
    batches (fetched on the init stream of loader_batches), each once: a
    loader with fewer gives all it holds, as in devinterp 1.x (repeating a
    batch would weight it twice and shrink the spread below). ``requested``:
    the user asked for ``num_batches`` and is told when fewer were there.
    Its spread goes into the diagnostics: the
    init loss is subtracted from every chain alike, so its sampling error
    moves the LLC by nbeta times that error and never shows in the spread
    across chains; ``llc_se_from_init_loss`` says how large it is (NaN from
    a single batch)."""
    values = []
    with torch.no_grad():
        for batch in itertools.islice(loader_batches(loader, seed, endless=False), num_batches):
            value = float(checked_loss(loss_fn(model, to_device(batch, device)), "at w*"))
            if not math.isfinite(value):
                raise ValueError(f"the loss at w* is {value}; the estimate needs a finite loss at the checkpoint")
            values.append(value)
    if not values:
        raise ValueError("the loader yielded no batches; pass a non-empty loader")
    n = len(values)
    if requested and n < num_batches:
        warnings.warn(f"num_init_batches={num_batches}, but the loader holds {n} batches; the init loss averages "
                      f"those {n}", UserWarning, stacklevel=stacklevel)
    mean = sum(values) / n
    se = (float(np.std(values, ddof=1)) / math.sqrt(n)) if n > 1 else math.nan
    return mean, {"init_loss_per_batch": values, "init_loss_se": se, "loader_batches": finite_batches(loader)}


def check_differentiable(model, loss_fn: Callable, loader, device, *, seed: int = 0) -> None:
    """The loss on the loader's first batch must reach the parameters through
    autograd: a loss_fn that detaches (``.detach()``, ``.item()``, a
    ``torch.no_grad()`` block) would give every chain a zero gradient, and
    the chains would sample the prior alone."""
    batch = next(loader_batches(loader, seed, endless=False), None)
    if batch is None:
        raise ValueError("the loader yielded no batches; pass a non-empty loader")
    with torch.enable_grad():
        loss = checked_loss(loss_fn(model, to_device(batch, device)), "at w*")
    if not loss.requires_grad:
        raise ValueError("loss_fn's loss has no gradient path to the model's parameters (a .detach(), .item(), "
                         "torch.no_grad() or a tensor rebuilt from numbers inside it?); the chains would see a "
                         "zero gradient. Return the loss as computed from model(...)")


def finite_batches(loader) -> Optional[int]:
    """How many batches the chains draw from, where they are one fixed set:
    a list of batches, or a DataLoader over a map-style dataset sampled
    without replacement (one epoch's batches); None otherwise."""
    from torch.utils.data import DataLoader, IterableDataset
    if isinstance(loader, (list, tuple)):
        return len(loader)
    if isinstance(loader, DataLoader):
        if isinstance(loader.dataset, IterableDataset) or getattr(loader.sampler, "replacement", False):
            return None
        try:
            return len(loader)
        except TypeError:
            return None
    return None


def trainable(model: torch.nn.Module) -> List[tuple]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def restriction_masks(named, restrict) -> Optional[List[torch.Tensor]]:
    """None (everything moves), parameter-name globs, or {name: bool mask}."""
    if restrict is None:
        return None
    if isinstance(restrict, str):
        restrict = [restrict]
    names = [n for n, _ in named]
    if isinstance(restrict, Mapping):
        unknown = sorted(set(restrict) - set(names))
        if unknown:
            raise ValueError(f"restrict names parameters that do not exist: {unknown}; parameters: {names}")
        masks = []
        for n, p in named:
            m = restrict.get(n)
            if m is None:
                masks.append(torch.zeros(p.shape, dtype=torch.bool, device=p.device))
                continue
            m = torch.as_tensor(m, device=p.device)
            if m.dtype != torch.bool or tuple(m.shape) != tuple(p.shape):
                raise ValueError(f"restrict[{n!r}] must be a bool mask of shape {tuple(p.shape)}, "
                                 f"got {m.dtype} {tuple(m.shape)}")
            masks.append(m.contiguous())
        return _some_element_moves(masks, restrict)
    patterns = list(restrict)
    for pat in patterns:
        if not isinstance(pat, str):
            raise TypeError(f"restrict must be globs or a dict of masks, got {pat!r}")
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise ValueError(f"restrict pattern {pat!r} matches no parameter; parameters: {names}")
    return _some_element_moves([torch.full(p.shape, any(fnmatch.fnmatchcase(n, pat) for pat in patterns),
                                           dtype=torch.bool, device=p.device) for n, p in named], restrict)


def _some_element_moves(masks: List[torch.Tensor], restrict) -> List[torch.Tensor]:
    # Selecting nothing would give an "LLC" of pure batch noise, or an empty Hessian.
    if not any(bool(m.any()) for m in masks):
        shown = (f"restrict's masks for {sorted(restrict)}" if restrict else "restrict={}") \
            if isinstance(restrict, Mapping) else f"restrict={restrict!r}"
        raise ValueError(f"{shown} selects no parameter element; name at least one parameter (a glob) or give "
                         "a mask with a True element (None selects all)")
    return masks


def active_dropout(model: torch.nn.Module) -> str:
    """The dropout modules that draw masks in the model's current mode, named
    (the first three), or "" where none does."""
    active = [n or type(model).__name__ for n, m in model.named_modules()
              if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training and m.p > 0]
    return ", ".join(active[:3]) + (f" and {len(active) - 3} more" if len(active) > 3 else "")


def warn_if_dropout(model: torch.nn.Module, stacklevel: int = 3) -> None:
    """Dropout left on (train mode) makes every loss a random draw that the
    seed does not fix; users comparing with devinterp should know it calls
    model.train(), and that model.eval() gives a deterministic loss."""
    shown = active_dropout(model)
    if shown:
        warnings.warn(f"dropout is active ({shown}: the model is in train mode), so every loss draws random "
                      "masks that seed does not fix and the estimate is not reproducible; call model.eval() for "
                      "a deterministic loss (devinterp 1.x calls model.train(), so its numbers include dropout)",
                      UserWarning, stacklevel=stacklevel)


PRECISIONS = ("fp32", "tf32", "bf16")


def first_line(exc: BaseException, default: str = "") -> str:
    """The first line of an exception's message (torch's run to pages), or ``default`` if it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else default


def check_precision(precision, name: str = "precision") -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"{name} must be one of {PRECISIONS}, got {precision!r}")


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device):
    """fp32: full-precision matmuls (TF32 off); tf32: TF32 matmuls on CUDA;
    bf16: the forward pass under bf16 autocast (parameters, gradients and the
    SGLD update stay fp32). Restores the global TF32 flags afterwards."""
    check_precision(precision)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        if precision == "bf16":
            # The autocast cache must be off for CUDA-graph capture.
            with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def first_nonfinite(trace: np.ndarray) -> dict:
    """{chain: first draw-or-step index whose loss is not finite}."""
    bad = ~np.isfinite(trace)
    return {int(c): int(np.argmax(bad[c])) for c in np.flatnonzero(bad.any(axis=1))}
