"""Argument checks shared by the kernels' wrappers (llcfast.ops) and their
pure-torch twins (llcfast.reference), so both reject bad input alike."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

MAX_NOISE_GROUPS = 2**32  # the noise counter's group word is 32 bits


def check_int(name: str, value, *, minimum: int = 0, maximum: int = 2**63 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int in [{minimum}, {maximum}], got {value!r}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value}")
    return value


def check_float(name: str, value, *, minimum: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _tensor_list(name: str, value) -> list:
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(value).__name__}")
    for i, t in enumerate(value):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return list(value)


def _check_entry(name: str, i: int, t: torch.Tensor, dtype, device: torch.device, shape) -> None:
    """``dtype``: the allowed dtype, or a tuple of them."""
    allowed = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in allowed:
        raise TypeError(f"{name}[{i}] has dtype {t.dtype}; allowed: {' or '.join(map(str, allowed))}")
    if t.device != device:
        raise ValueError(f"{name}[{i}] is on {t.device} but params[0] is on {device}; all tensors must share one device")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}; expected {tuple(shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name}[{i}] is not contiguous; pass .contiguous() tensors")


def check_sgld_args(params, grads, centers, masks, noise, stats, *, seed, step, chain_offset,
                    eps, nbeta, gamma, weight_decay, noise_scale, step_tensor=None):
    """Validates one sgld_step_ call; returns (params, grads, centers, masks,
    noise, hyper) with lists normalised and hyper a dict of floats."""
    params = _tensor_list("params", params)
    grads = _tensor_list("grads", grads)
    centers = _tensor_list("centers", centers)
    masks = None if masks is None else _tensor_list("masks", masks)
    noise = None if noise is None else _tensor_list("noise", noise)
    for name, lst in (("grads", grads), ("centers", centers), ("masks", masks), ("noise", noise)):
        if lst is not None and len(lst) != len(params):
            raise ValueError(f"{name} has {len(lst)} tensors but params has {len(params)}; "
                             "the lists must have one entry per parameter tensor")
    hyper = dict(
        eps=check_float("eps", eps, minimum=0.0),
        nbeta=check_float("nbeta", nbeta),
        gamma=check_float("gamma", gamma, minimum=0.0),
        weight_decay=check_float("weight_decay", weight_decay, minimum=0.0),
        noise_scale=check_float("noise_scale", noise_scale, minimum=0.0),
    )
    check_int("seed", seed)
    check_int("step", step)
    check_int("chain_offset", chain_offset, maximum=2**32 - 1)
    if not params:
        return params, grads, centers, masks, noise, hyper
    device = params[0].device
    if params[0].dim() < 1:
        raise ValueError("params[0] has no chain dimension; each params tensor must be [C, ...]")
    chains = params[0].shape[0]
    if chains < 1:
        raise ValueError(f"params have {chains} chains; need at least 1")
    if chain_offset + chains > 2**32:
        raise ValueError(f"chain_offset + chains = {chain_offset + chains} exceeds 2^32")
    groups = 0
    for i, p in enumerate(params):
        if p.dim() < 1 or p.shape[0] != chains:
            raise ValueError(f"params[{i}] has shape {tuple(p.shape)}; expected a leading chain dimension of {chains}")
        _check_entry("params", i, p, torch.float32, device, p.shape)
        _check_entry("grads", i, grads[i], (torch.float32, torch.bfloat16), device, p.shape)
        _check_entry("centers", i, centers[i], torch.float32, device, p.shape[1:])
        if masks is not None:
            _check_entry("masks", i, masks[i], torch.bool, device, p.shape[1:])
        if noise is not None:
            _check_entry("noise", i, noise[i], torch.float32, device, p.shape)
        groups += -(-p[0].numel() // 4)
    if groups > MAX_NOISE_GROUPS:
        raise ValueError(f"{4 * groups} elements per chain exceed the noise counter's 2^34 limit")
    if stats is not None:
        if not isinstance(stats, torch.Tensor):
            raise TypeError(f"stats must be a torch.Tensor or None, got {type(stats).__name__}")
        _check_entry_stats(stats, chains, device)
    if step_tensor is not None:
        if not isinstance(step_tensor, torch.Tensor):
            raise TypeError(f"step_tensor must be a torch.Tensor or None, got {type(step_tensor).__name__}")
        if step_tensor.dtype != torch.int64 or step_tensor.numel() != 1 or step_tensor.device != device:
            raise ValueError(f"step_tensor must be a one-element torch.int64 tensor on {device}, got "
                             f"{step_tensor.dtype} of shape {tuple(step_tensor.shape)} on {step_tensor.device}")
    return params, grads, centers, masks, noise, hyper


def check_bf16_copies(params, copies):
    """sgld_step_'s ``bf16_copies``: None, or one entry per params tensor,
    each None or a contiguous bfloat16 tensor of its shape on its device.
    Returns the list (or None)."""
    if copies is None:
        return None
    if isinstance(copies, torch.Tensor) or not isinstance(copies, Sequence):
        raise TypeError(f"bf16_copies must be a list or tuple of tensors or None, got {type(copies).__name__}")
    if len(copies) != len(params):
        raise ValueError(f"bf16_copies has {len(copies)} entries but params has {len(params)}; "
                         "the lists must have one entry per parameter tensor (None: no copy)")
    for i, (c, p) in enumerate(zip(copies, params)):
        if c is None:
            continue
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"bf16_copies[{i}] must be a torch.Tensor or None, got {type(c).__name__}")
        if isinstance(p, torch.Tensor):
            _check_entry("bf16_copies", i, c, torch.bfloat16, p.device, p.shape)
    return list(copies)


def _check_entry_stats(stats: torch.Tensor, chains: int, device: torch.device) -> None:
    if stats.dtype != torch.float64:
        raise TypeError(f"stats has dtype {stats.dtype}; allowed: torch.float64")
    if stats.device != device:
        raise ValueError(f"stats is on {stats.device} but params are on {device}")
    if tuple(stats.shape) != (chains, 3) or not stats.is_contiguous():
        raise ValueError(f"stats must be a contiguous ({chains}, 3) tensor, got shape {tuple(stats.shape)}")


def _check_counter_args(rows: tuple, numel, seed, word: tuple, row_offset: tuple, group_offset, counter: str):
    """One fill of a Philox counter layout: rows, row offset and the 64-bit
    word (step or stream) each named as the caller's signature names them."""
    check_int(rows[0], rows[1], minimum=1, maximum=2**32)
    check_int("numel", numel)
    check_int("seed", seed)
    check_int(*word)
    check_int(row_offset[0], row_offset[1], maximum=2**32 - rows[1])
    check_int("group_offset", group_offset, maximum=MAX_NOISE_GROUPS)
    if group_offset + -(-numel // 4) > MAX_NOISE_GROUPS:
        raise ValueError(f"group_offset + numel/4 exceeds the {counter} counter's 2^32 groups")


def check_philox_args(num_chains, numel, seed, step, chain_offset, group_offset):
    _check_counter_args(("num_chains", num_chains), numel, seed, ("step", step), ("chain_offset", chain_offset),
                        group_offset, "noise")


def check_rademacher_args(num_rows, numel, seed, stream, row_offset, group_offset):
    _check_counter_args(("num_rows", num_rows), numel, seed, ("stream", stream), ("row_offset", row_offset),
                        group_offset, "probe")


def group_offsets_for_sizes(sizes) -> list:
    """Tensor i's element 0 is counter group offsets[i]; each tensor starts a
    new group of four, so offsets depend only on the per-row sizes and order."""
    out, acc = [], 0
    for n in sizes:
        out.append(acc)
        acc += -(-n // 4)
    return out


def noise_group_offsets(params) -> list:
    """group_offsets_for_sizes of chain-stacked [C, ...] tensors."""
    return group_offsets_for_sizes(p.numel() // max(p.shape[0], 1) for p in params)


def check_multi_dot_args(out, a, b) -> None:
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float64 or out.dim() != 1 \
            or not out.is_contiguous():
        desc = f"{out.dtype} of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"out must be a contiguous 1-D torch.float64 tensor, got {desc}")
    a, b = _tensor_list("a", a), _tensor_list("b", b)
    if len(a) != len(b):
        raise ValueError(f"a has {len(a)} tensors but b has {len(b)}; the lists must pair up")
    rows = out.shape[0]
    for i, (x, y) in enumerate(zip(a, b)):
        if x.dim() < 1 or x.shape[0] != rows:
            raise ValueError(f"a[{i}] has shape {tuple(x.shape)}; expected a leading dimension of {rows} (out's rows)")
        _check_entry("a", i, x, torch.float32, out.device, x.shape)
        _check_entry("b", i, y, torch.float32, out.device, x.shape)


def check_state_list(name: str, state, params) -> list:
    """A sampler's per-chain state: one float32 contiguous tensor per params
    entry, of the same shape, on the same device."""
    state = _tensor_list(name, state)
    if len(state) != len(params):
        raise ValueError(f"{name} has {len(state)} tensors but params has {len(params)}; "
                         "the lists must have one entry per parameter tensor")
    for i, (s, p) in enumerate(zip(state, params)):
        _check_entry(name, i, s, torch.float32, p.device, p.shape)
    return state


def check_thermostat(thermostat, params) -> None:
    chains = params[0].shape[0] if params else 0
    if not isinstance(thermostat, torch.Tensor):
        raise TypeError(f"thermostat must be a torch.Tensor, got {type(thermostat).__name__}")
    if thermostat.dtype != torch.float32 or tuple(thermostat.shape) != (chains,) or not thermostat.is_contiguous():
        raise ValueError(f"thermostat must be a contiguous float32 tensor of shape ({chains},), got "
                         f"{thermostat.dtype} of shape {tuple(thermostat.shape)}")
    if params and thermostat.device != params[0].device:
        raise ValueError(f"thermostat is on {thermostat.device} but params are on {params[0].device}")


def check_rmsprop_hyper(alpha, rms_eps, label=str) -> dict:
    """RMSprop-SGLD's own hyperparameters; ``label`` names each in errors."""
    alpha = check_float(label("alpha"), alpha, minimum=0.0)
    if alpha >= 1.0:
        raise ValueError(f"{label('alpha')} must be in [0, 1), got {alpha}")
    rms_eps = check_float(label("rms_eps"), rms_eps)
    if rms_eps <= 0:
        raise ValueError(f"{label('rms_eps')} must be > 0, got {rms_eps}")
    return dict(alpha=alpha, rms_eps=rms_eps)


def check_sgnht_hyper(diffusion, label=str) -> dict:
    return dict(diffusion=check_float(label("diffusion"), diffusion, minimum=0.0))


def check_rmsprop_step_args(params, square_avg, grads, centers, masks, noise, stats, *, alpha, rms_eps, bounding_box,
                            **sgld):
    """Validates one rmsprop_sgld_step_ call (the kernel wrapper and its twin
    alike); returns (params, square_avg, grads, centers, masks, noise, hyper)
    with hyper every float the step takes."""
    params, grads, centers, masks, noise, hyper = check_sgld_args(params, grads, centers, masks, noise, stats, **sgld)
    square_avg = check_state_list("square_avg", square_avg, params)
    hyper.update(check_rmsprop_hyper(alpha, rms_eps),
                 bounding_box=check_float("bounding_box", bounding_box, minimum=0.0))
    return params, square_avg, grads, centers, masks, noise, hyper


def check_sgnht_step_args(params, momentum, thermostat, grads, centers, masks, noise, stats, *, diffusion,
                          bounding_box, **sgld):
    """Validates one sgnht_step_ call; returns (params, momentum, grads,
    centers, masks, noise, hyper). SGNHT has no noise_scale: its noise is
    set by the diffusion factor."""
    params, grads, centers, masks, noise, hyper = check_sgld_args(params, grads, centers, masks, noise, stats,
                                                                  noise_scale=1.0, **sgld)
    momentum = check_state_list("momentum", momentum, params)
    check_thermostat(thermostat, params)
    hyper.pop("noise_scale")
    hyper.update(check_sgnht_hyper(diffusion), bounding_box=check_float("bounding_box", bounding_box, minimum=0.0))
    return params, momentum, grads, centers, masks, noise, hyper


def check_lanczos_step_args(basis, w, j, out) -> None:
    """basis [R, m, N] float32, w [R, N] float32, out [R, 2] float64, all
    contiguous on one device, and 0 <= j < m."""
    def desc(t):
        return f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
    if not isinstance(basis, torch.Tensor) or basis.dtype != torch.float32 or basis.dim() != 3 \
            or not basis.is_contiguous():
        raise TypeError(f"basis must be a contiguous torch.float32 [R, m, N] tensor, got {desc(basis)}")
    rows, m, n = basis.shape
    if m < 1 or n < 1:
        raise ValueError(f"basis has shape {tuple(basis.shape)}; m (vectors per row) and N (elements) must be >= 1")
    check_int("j", j, minimum=0, maximum=m - 1)
    if not isinstance(w, torch.Tensor) or w.dtype != torch.float32 or tuple(w.shape) != (rows, n) \
            or not w.is_contiguous():
        raise TypeError(f"w must be a contiguous torch.float32 tensor of shape {(rows, n)}, got {desc(w)}")
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float64 or tuple(out.shape) != (rows, 2) \
            or not out.is_contiguous():
        raise TypeError(f"out must be a contiguous torch.float64 tensor of shape {(rows, 2)}, got {desc(out)}")
    if w.device != basis.device or out.device != basis.device:
        raise ValueError(f"basis, w and out must be on one device, got {basis.device}, {w.device}, {out.device}")


_LOGIT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_token_nll_args(logits, targets) -> torch.Tensor:
    """token_nll's arguments; returns the targets as int64."""
    if not isinstance(logits, torch.Tensor) or logits.dtype not in _LOGIT_DTYPES or logits.dim() < 1:
        desc = f"{logits.dtype} of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) \
            else type(logits).__name__
        raise TypeError(f"logits must be a float32, float64, bfloat16 or float16 tensor with a vocabulary "
                        f"dimension last, got {desc}")
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype.is_complex \
            or targets.dtype == torch.bool:
        desc = str(targets.dtype) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"targets must be an integer tensor of class indices, got {desc}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])} (logits without the vocabulary "
                         f"dimension), got {tuple(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device} but logits on {logits.device}")
    if logits.shape[-1] == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    return targets.long()
