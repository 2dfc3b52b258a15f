"""Runs trained elsewhere: a folder of Hugging Face causal-LM checkpoints
(``checkpoint-500/``, ``step1000/``, ... each with a ``config.json``) and
the token file they were trained on become an llcfast run, by a
``manifest.json`` written beside them. sweep, estimate, calibrate, report
and compare then work on it as on a run of ``llcfast train``."""
from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from typing import List, Optional, Tuple

from .checkpoints import MANIFEST, atomic_json, read_manifest
from .config import PRESETS, RunConfig, SweepSettings
from .safety import data_fingerprint
from .sweep import RESULTS

# HF Trainer writes checkpoint-N; Pythia's revisions and many scripts use stepN.
CHECKPOINT_DIR = re.compile(r"^(?:checkpoint|step|global_step|iter)[-_]?(\d+)$")
# Where the LLC settings start: docs/paper.md's language-model sweep. Behavioural
# metrics need llcfast's own attention modules, so they are off.
DEFAULT_SWEEP = replace(SweepSettings(**PRESETS["language"]["sweep"]), behaviour=False, hessian=False)
MAX_CONTEXT = 1024  # docs/paper.md's LM context; longer windows only cost more per step


def find_checkpoints(run_dir: str) -> List[Tuple[int, str]]:
    """(step, folder name) of every checkpoint folder in ``run_dir``, by step."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
    found, skipped = [], []
    for name in os.listdir(run_dir):
        m = CHECKPOINT_DIR.match(name)
        if m and os.path.isdir(os.path.join(run_dir, name)):
            (found if os.path.isfile(os.path.join(run_dir, name, "config.json")) else skipped).append(
                (int(m.group(1)), name))
    if not found:
        extra = f" ({len(skipped)} such folders lack config.json)" if skipped else ""
        raise ValueError(f"{run_dir!r} holds no Hugging Face checkpoint folders{extra}: expected folders named "
                         "checkpoint-N, stepN, step-N, global_stepN or iterN (N the training step), each with a "
                         "config.json")
    steps = [s for s, _ in found]
    twice = sorted({s for s in steps if steps.count(s) > 1})
    if twice:
        raise ValueError(f"{run_dir!r} has several checkpoint folders for step(s) {twice}: "
                         f"{sorted(n for s, n in found if s in twice)}; keep one per step")
    return sorted(found)


def _model_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def _positions(config: dict) -> Optional[int]:
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def previous_import(run_dir: str) -> Optional[RunConfig]:
    """The config of an earlier import into ``run_dir``; None if there was
    none. A run of ``llcfast train`` there is refused."""
    if not os.path.isfile(os.path.join(run_dir, MANIFEST)):
        return None
    config = read_manifest(run_dir).get("config") or {}
    if config.get("model") != "hf":
        raise ValueError(f"{run_dir!r} already holds an llcfast training run ({MANIFEST}); import writes its "
                         "own manifest only into a folder of checkpoints trained elsewhere")
    return RunConfig.from_dict(config)


def import_run(run_dir: str, tokens: str, *, context: Optional[int] = None, dtype: str = "uint16",
               settings: Optional[SweepSettings] = None, changes: Optional[dict] = None, seed: int = 0) -> dict:
    """Writes ``run_dir/manifest.json`` for its Hugging Face checkpoints and
    the token file ``tokens`` (.npy, or .bin of ``dtype``); returns the
    manifest. ``context``: tokens per sequence the LLC sees (default: the
    earlier import's, else the model's positions, at most 1024);
    ``settings``: default the earlier import's, else DEFAULT_SWEEP;
    ``changes``: SweepSettings fields set on top of those. Run
    again after more checkpoints have been written: the list is refreshed,
    and the results already swept stay valid, so the data (token file,
    context, dtype, seed) may not change once there are results."""
    from .tasks import TokenFile
    ckpts = find_checkpoints(run_dir)
    old = previous_import(run_dir)
    if old is not None:
        context = old.task_args["context"] if context is None else context
    settings = replace(settings or (old.sweep if old is not None else DEFAULT_SWEEP), **(changes or {}))
    config = _model_config(os.path.join(run_dir, ckpts[-1][1]))
    positions = _positions(config)
    if context is None:
        if positions is None:
            raise ValueError("the checkpoints' config.json names no maximum sequence length; pass --context")
        context = min(positions, MAX_CONTEXT)
    elif positions is not None and context > positions:
        raise ValueError(f"context {context} exceeds the model's {positions} positions")
    vocab = config.get("vocab_size")
    task_args = dict(path=os.path.abspath(tokens), context=context, dtype=dtype)
    task = TokenFile(**task_args, seed=seed)  # checks the file now, not at the first checkpoint
    if isinstance(vocab, int):
        largest = task.vocab - 1  # TokenFile's own scan, when given no vocabulary
        if largest >= vocab:
            raise ValueError(f"token file {tokens!r} holds token id {largest}, but the model's vocabulary has "
                             f"{vocab} ids; is it the file these checkpoints were trained on (and --dtype right)?")
        task_args["vocab"] = vocab
    cfg = RunConfig(task="tokens", task_args=task_args, model="hf", sweep=settings, seed=seed)
    cfg.validate()
    if old is not None and (old.task_args, old.seed) != (cfg.task_args, cfg.seed) and \
            os.path.exists(os.path.join(run_dir, RESULTS)):
        # A sweep skips checkpoints already measured with the same LLC settings; on other data that would be wrong.
        was = {k: old.task_args.get(k) for k in ("path", "context", "dtype")}
        raise ValueError(f"{run_dir!r} holds results measured on other data ({was}, seed {old.seed}); import into "
                         f"a new folder, or move {RESULTS} away first")
    manifest = {"version": 1, "config": cfg.to_dict(), "complete": True, "imported": "hf",
                "checkpoints": [{"step": step, "file": name} for step, name in ckpts]}
    data = data_fingerprint(cfg)
    if data:
        manifest["data"] = data
    atomic_json(manifest, os.path.join(run_dir, MANIFEST))
    return manifest
