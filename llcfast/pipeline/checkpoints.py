"""Checkpoint files: which steps to keep, atomic writes, the run manifest,
and loading a user's own checkpoints (state dicts, pickled modules, Hugging
Face directories)."""
from __future__ import annotations

import json
import os
from typing import Callable, List, Optional, Union

import numpy as np
import torch

from ..engine.common import first_line
from .safety import atomic_write_bytes, check_manifest, read_json

MANIFEST = "manifest.json"
RESUME = "resume.pt"


def checkpoint_steps(total: int, log_count: int, linear_count: int) -> List[int]:
    """Step 0, ``log_count`` log-spaced steps in [1, total] and
    ``linear_count`` evenly spaced ones in (0, total], overlaps merged."""
    steps = {0, total}
    if log_count:
        steps.update(int(round(s)) for s in np.logspace(0, np.log10(max(total, 1)), log_count))
    if linear_count:
        steps.update(int(round(s)) for s in np.linspace(0, total, linear_count + 1))
    return sorted(s for s in steps if 0 <= s <= total)


def atomic_save(obj, path: str) -> None:
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def atomic_json(obj, path: str) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def _is_zip(path: str) -> bool:
    """torch.save writes a zip archive: a complete one ends in its directory."""
    import zipfile
    return zipfile.is_zipfile(path)


def read_manifest(run_dir: str) -> dict:
    path = os.path.join(run_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir!r} is not a training run: it has no {MANIFEST} "
                                "(create one with `llcfast train`)")
    return check_manifest(read_json(path), path, run_dir)


def _quietly(load: Callable, path: str):
    """``load(path)`` without transformers' per-file progress bar, which a
    sweep would print for every checkpoint beneath its own bar."""
    try:
        from transformers.utils import logging as hf_logging
        shown = hf_logging.is_progress_bar_enabled()
    except (ImportError, AttributeError):
        return load(path)
    hf_logging.disable_progress_bar()
    try:
        return load(path)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def load_checkpoint(path: str, model: Optional[Union[torch.nn.Module, Callable[[], torch.nn.Module]]] = None, *,
                    map_location="cpu", weights_only: bool = True) -> torch.nn.Module:
    """A model from a checkpoint written by llcfast, a user's own
    ``torch.save`` file, or a Hugging Face directory.

    - A directory with ``config.json``: ``transformers.AutoModelForCausalLM``
      in fp32 and eval mode (``model`` unused).
    - A file holding a state dict (or a dict with a ``"model"``,
      ``"state_dict"`` or ``"model_state_dict"`` entry): loaded into
      ``model`` (a module, or a function returning a fresh one), strictly.
    - A file holding a whole pickled module: returned as is; that needs
      ``weights_only=False`` (only for files you trust: unpickling runs code).
    """
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"checkpoint directory {path!r} has no config.json; a Hugging Face checkpoint "
                             "directory was expected")
        try:
            from transformers import AutoModelForCausalLM
        except ImportError as exc:
            raise ImportError(f"loading the Hugging Face checkpoint {path!r} needs `pip install transformers`") \
                from exc
        return _quietly(AutoModelForCausalLM.from_pretrained, path).float()  # the sampler keeps fp32 parameters
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as exc:
        # Only an intact file that unpickling refused (a whole module) can take weights_only=False; a truncated
        # or corrupt one cannot, and a file from elsewhere must not.
        refused = weights_only and "weights_only" in str(exc) and "Unsupported" in str(exc)
        hint = (" It holds pickled objects beyond tensors (a whole module?): pass weights_only=False only if you "
                "made the file yourself, since unpickling runs code." if refused else
                " The file is truncated or corrupt: write it again (for a training run, delete it and rerun "
                "`llcfast train`, which saves it anew)." if not _is_zip(path) else "")
        raise ValueError(f"cannot read checkpoint {path!r}: {type(exc).__name__}: {first_line(exc)}.{hint}") \
            from exc
    if isinstance(obj, torch.nn.Module):
        return obj
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise ValueError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state dict or a module")
    if model is None:
        raise ValueError(f"checkpoint {path!r} holds a state dict; pass model= (a module or a function that "
                         "builds one) to load it into")
    module = model if isinstance(model, torch.nn.Module) else model()
    try:
        module.load_state_dict(obj, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path!r} does not fit the model: {exc}") from exc
    return module
