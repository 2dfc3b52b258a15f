"""The one switch for the fast paths: which GPU-only rewrite serves which
device, and the losses they substitute.

Every fast path computes what the plain torch path computes (the tests hold
each to it); they differ only in speed. A path is on by default only where a
GPU run has measured it to help; until then it is experimental and a caller
turns it on by name: ``estimate_llc(..., fastpath="all")`` or
``fastpath={"attention": True}``. The settings in force live in a context
variable that ``using`` sets around a run, so that the folds, the fused head
and loss, and the bf16 copies read one object instead of module globals.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Mapping
from typing import Callable, Dict, Tuple

import torch

PATHS = ("attention", "layer_norm", "linear", "head", "token_loss", "bf16_copies")
DEVICE_TYPES = ("cpu", "cuda")

# Paths a GPU run has measured to help, on by default on CUDA. None yet: the
# fast paths were written after the last GPU measurement (docs/performance.md).
MEASURED: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class FastPath:
    """For each fast path, the device types whose calls it serves (empty: off).

    attention: SDPA folded over stacked chains; layer_norm and linear: their
    chain folds; head: the unembedding and mean next-token loss as one
    function; token_loss: the next-token loss as one kernel each way;
    bf16_copies: bf16 working copies of the weights under bf16 autocast.
    """
    attention: Tuple[str, ...] = ()
    layer_norm: Tuple[str, ...] = ()
    linear: Tuple[str, ...] = ()
    head: Tuple[str, ...] = ()
    token_loss: Tuple[str, ...] = ()
    bf16_copies: Tuple[str, ...] = ()

    def __post_init__(self):
        for path in PATHS:
            devices = getattr(self, path)
            if isinstance(devices, str):
                devices = (devices,)
            devices = tuple(sorted(set(devices)))
            bad = [d for d in devices if d not in DEVICE_TYPES]
            if bad:
                raise ValueError(f"fastpath {path}: device types {bad} are not among {list(DEVICE_TYPES)}")
            object.__setattr__(self, path, devices)

    @classmethod
    def default(cls) -> "FastPath":
        """What runs when nothing is asked: the measured paths, on CUDA."""
        return cls(**{path: ("cuda",) for path in MEASURED})

    @classmethod
    def every(cls, devices=("cuda",)) -> "FastPath":
        """Every path on ``devices`` (the tests add "cpu", where the paths
        serve as the CUDA paths' semantics on every machine)."""
        return cls(**{path: tuple(devices) for path in PATHS})

    def on(self, path: str, device) -> bool:
        kind = device.type if isinstance(device, torch.device) else str(device)
        return kind in getattr(self, path)

    def widened(self, devices=("cuda",)) -> "FastPath":
        """Every path on ``devices`` as well as where it already is (the
        benchmarks' starting point, from which their variants leave paths out)."""
        return FastPath(**{path: tuple(set(getattr(self, path)) | set(devices)) for path in PATHS})

    def replace(self, **paths) -> "FastPath":
        return dataclasses.replace(self, **paths)

    def as_config(self) -> Dict[str, list]:
        return {path: list(getattr(self, path)) for path in PATHS}


def resolve(fastpath) -> FastPath:
    """estimate_llc's ``fastpath`` argument as settings: None (the settings
    in force: FastPath.default() unless a caller's ``using`` chose others),
    "off", "all" (every path on CUDA), a FastPath, or a mapping from path
    names to True/False or to device types (the other paths as in force)."""
    if fastpath is None:
        return current()
    if isinstance(fastpath, FastPath):
        return fastpath
    if fastpath == "off":
        return FastPath()
    if fastpath == "all":
        return FastPath.every()
    if isinstance(fastpath, Mapping):
        unknown = sorted(set(fastpath) - set(PATHS))
        if unknown:
            raise ValueError(f"fastpath: unknown paths {unknown}; the paths are {list(PATHS)}")
        chosen = dataclasses.asdict(current())
        for path, value in fastpath.items():
            if value is True:
                chosen[path] = ("cuda",)
            elif value is False or value is None:
                chosen[path] = ()
            else:
                chosen[path] = value
        return FastPath(**chosen)
    raise ValueError(f"fastpath={fastpath!r}: expected None, 'off', 'all', a llcfast.fastpath.FastPath, or a dict "
                     f"from path names {list(PATHS)} to True/False or device types")


_current: contextvars.ContextVar = contextvars.ContextVar("llcfast_fastpath", default=None)


def current() -> FastPath:
    """The settings in force: those ``using`` set, else the default."""
    settings = _current.get()
    return FastPath.default() if settings is None else settings


@contextlib.contextmanager
def using(settings: FastPath):
    """Inside, ``current()`` is ``settings``."""
    token = _current.set(resolve(settings))
    try:
        yield
    finally:
        _current.reset(token)


# plain loss function -> the same loss written to take the fast paths
_SUBSTITUTES: Dict[Callable, Callable] = {}


def register_substitute(plain: Callable, fast: Callable) -> None:
    """Declares ``fast`` the same loss as ``plain`` (same arguments, same
    numbers), written so that the fast paths can serve it; the fast engine
    calls it in place of ``plain``."""
    _SUBSTITUTES[plain] = fast


def substitute(loss_fn: Callable) -> Callable:
    """The loss the fast engine calls for ``loss_fn``."""
    try:
        return _SUBSTITUTES.get(loss_fn, loss_fn)
    except TypeError:  # an unhashable callable has no substitute
        return loss_fn
