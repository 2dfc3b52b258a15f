"""What a run is: task, model, training and the LLC sweep settings, as one
JSON-able config, with the paper's settings (docs/paper.md) and the demo's as
presets."""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict

from . import models, tasks
from .presets import PRESETS

TASKS = ("regression", "language", "tokens")
# "llcfast": the paper's models (llcfast.pipeline.models), built from model_args;
# "hf": Hugging Face causal-LM checkpoint directories of a run trained
# elsewhere and brought in by `llcfast import`.
MODELS = ("llcfast", "hf")
SCHEDULES = ("one_cycle", "constant")


@dataclass
class TrainSettings:
    steps: int = 5000
    batch_size: int = 64
    lr: float = 3e-3
    schedule: str = "one_cycle"  # linear warm-up over the first half, linear decay over the second
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    log_checkpoints: int = 20
    linear_checkpoints: int = 20


@dataclass
class SweepSettings:
    num_chains: int = 4
    num_draws: int = 200
    num_burnin: int = 0
    epsilon: float = 1e-3
    gamma: float = 6.0
    nbeta: float = 60.0
    llc_sequences: int = 1024  # the fixed pre-sampled set the chains draw minibatches from
    llc_batch_size: int = 64
    eval_sequences: int = 1024  # test loss
    hessian: bool = False  # Hessian trace and top eigenvalue on one evaluation batch
    hessian_probes: int = 32
    hessian_batch: int = 256
    seed: int = 0
    sampler: str = "sgld"  # or "rmsprop_sgld", "sgnht" (llcfast.estimate_llc)
    sampler_kwargs: Dict[str, float] = field(default_factory=dict)
    bounding_box: Any = None  # None or a float > 0
    precision: str = "fp32"  # or "tf32", "bf16": the LLC's and the Hessian's passes (estimate_llc)
    num_init_batches: Any = None  # batches of the LLC set the loss at w* averages; None: num_chains, "all": every one
    behaviour: bool = True  # the task's behavioural metrics (pipeline/behaviour.py); not part of the settings key
    draw_batches: str = "independent"  # or "step" (devinterp's): the batch each draw's loss is taken on
    landscape: bool = False  # loss barriers to the previous and the final checkpoint; not part of the settings key
    landscape_points: int = 9  # points on each path (evaluated on the first hessian_batch evaluation sequences)


@dataclass
class RunConfig:
    task: str = "regression"
    task_args: Dict[str, Any] = field(default_factory=dict)
    model_args: Dict[str, Any] = field(default_factory=dict)
    train: TrainSettings = field(default_factory=TrainSettings)
    sweep: SweepSettings = field(default_factory=SweepSettings)
    seed: int = 0
    model: str = "llcfast"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train"]["betas"] = list(self.train.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        if not isinstance(d, dict):
            raise TypeError(f"a run config must be a JSON object, got {type(d).__name__}")
        d = copy.deepcopy(d)
        _check_keys("config", d, {f.name for f in fields(cls)})
        train = d.pop("train", {})
        sweep = d.pop("sweep", {})
        for name, part in (("train", train), ("sweep", sweep), ("task_args", d.get("task_args", {})),
                           ("model_args", d.get("model_args", {}))):
            if not isinstance(part, dict):
                raise ValueError(f"{name} must be an object, got {json.dumps(part)}")
        _check_keys("train", train, {f.name for f in fields(TrainSettings)})
        _check_keys("sweep", sweep, {f.name for f in fields(SweepSettings)})
        if "betas" in train:
            if not isinstance(train["betas"], (list, tuple)):
                raise ValueError(f"train.betas must be a list of two numbers, got {json.dumps(train['betas'])}")
            train["betas"] = tuple(train["betas"])
        cfg = cls(train=TrainSettings(**train), sweep=SweepSettings(**sweep), **d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.model == "hf" and self.task == "regression":
            raise ValueError("model 'hf' (Hugging Face causal LMs) needs a token task ('tokens' or 'language'), "
                             "got task 'regression'")
        if self.train.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {self.train.schedule!r}")
        t = self.train
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        for name in ("steps", "batch_size"):
            if not _is_int(getattr(t, name)) or getattr(t, name) < 1:
                raise ValueError(f"train.{name} must be an int >= 1, got {getattr(t, name)!r}")
        for name in ("log_checkpoints", "linear_checkpoints"):
            if not _is_int(getattr(t, name)) or getattr(t, name) < 0:
                raise ValueError(f"train.{name} must be an int >= 0, got {getattr(t, name)!r}")
        if not _positive(t.lr):
            raise ValueError(f"train.lr must be a finite number > 0, got {t.lr!r}")
        if not (_is_number(t.weight_decay) and math.isfinite(t.weight_decay) and t.weight_decay >= 0):
            raise ValueError(f"train.weight_decay must be a finite number >= 0, got {t.weight_decay!r}")
        if len(t.betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in t.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {list(t.betas)!r}")
        s = self.sweep
        for name in ("num_chains", "num_draws", "llc_sequences", "llc_batch_size", "eval_sequences",
                     "hessian_probes", "hessian_batch"):
            if not _is_int(getattr(s, name)) or getattr(s, name) < 1:
                raise ValueError(f"sweep.{name} must be an int >= 1, got {getattr(s, name)!r}")
        for name in ("num_burnin", "seed"):
            if not _is_int(getattr(s, name)) or getattr(s, name) < 0:
                raise ValueError(f"sweep.{name} must be an int >= 0, got {getattr(s, name)!r}")
        for name in ("epsilon", "nbeta"):
            if not _positive(getattr(s, name)):
                raise ValueError(f"sweep.{name} must be a finite number > 0, got {getattr(s, name)!r}")
        if not (_is_number(s.gamma) and math.isfinite(s.gamma) and s.gamma >= 0):
            raise ValueError(f"sweep.gamma must be a finite number >= 0, got {s.gamma!r}")
        if s.num_init_batches not in (None, "all") and (not isinstance(s.num_init_batches, int)
                                                        or isinstance(s.num_init_batches, bool)
                                                        or s.num_init_batches < 1):
            raise ValueError(f"sweep.num_init_batches must be null, \"all\" or an int >= 1, got {s.num_init_batches!r}")
        if s.llc_batch_size > s.llc_sequences:
            raise ValueError(f"sweep.llc_batch_size ({s.llc_batch_size}) must be <= sweep.llc_sequences "
                             f"({s.llc_sequences})")
        if not _is_int(s.landscape_points) or s.landscape_points < 2:
            raise ValueError(f"sweep.landscape_points must be an int >= 2, got {s.landscape_points!r}")
        for name in ("hessian", "behaviour", "landscape"):
            if not isinstance(getattr(s, name), bool):
                raise ValueError(f"sweep.{name} must be true or false, got {getattr(s, name)!r}")
        from ..engine.common import check_precision
        check_precision(s.precision, "sweep.precision")
        from ..engine.loaders import DRAW_BATCHES
        if s.draw_batches not in DRAW_BATCHES:
            raise ValueError(f"sweep.draw_batches must be one of {DRAW_BATCHES}, got {s.draw_batches!r}")
        from ..engine.samplers import check_sampler
        try:
            check_sampler(s.sampler, s.sampler_kwargs, s.bounding_box)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"sweep: {exc}") from None

    def make_task(self):
        args = dict(self.task_args, seed=self.seed)
        try:
            if self.task == "regression":
                return tasks.RegressionTask(**args)
            if self.task == "language":
                return tasks.SyntheticLanguage(**args)
            return tasks.TokenFile(**args)
        except TypeError as exc:
            raise ValueError(f"bad task_args for task {self.task!r}: {exc}") from exc

    def make_model(self, task=None):
        if self.model == "hf":
            raise ValueError("an imported Hugging Face run's models are its checkpoint directories; "
                             "load one with llcfast.pipeline.load_checkpoint")
        task = task or self.make_task()
        try:
            if self.task == "regression":
                args = dict(task_dim=task.task_dim, max_pairs=task.pairs)
                args.update(self.model_args)
                return models.InContextRegression(**args)
            args = dict(vocab=task.vocab, context=task.context)
            args.update(self.model_args)
            return models.AttentionOnlyLM(**args)
        except TypeError as exc:
            raise ValueError(f"bad model_args for task {self.task!r}: {exc}") from exc

    @property
    def loss_fn(self):
        if self.model == "hf":
            return models.hf_next_token_loss
        return models.regression_loss if self.task == "regression" else models.next_token_loss


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive(v) -> bool:
    return _is_number(v) and math.isfinite(v) and v > 0


def _check_keys(where: str, d: dict, allowed: set) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        import difflib
        close = {k: difflib.get_close_matches(k, sorted(allowed), n=1) for k in unknown}
        hints = "".join(f" ({k!r}: did you mean {c[0]!r}?)" for k, c in close.items() if c)
        raise ValueError(f"unknown key(s) {unknown} in {where}{hints}; allowed: {sorted(allowed)}")


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    return RunConfig.from_dict(PRESETS[name])


def load_config(path: str) -> RunConfig:
    """A JSON config file; a ``"preset"`` key starts from that preset and the
    other keys override it (nested dicts merge). A relative data path
    (``task_args.path``) is read against the config file's folder, and kept
    absolute, so the run reads the same file from wherever it is started."""
    from .safety import read_json
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    d = read_json(path)
    if not isinstance(d, dict):
        raise ValueError(f"config file {path!r} must hold a JSON object")
    base = {}
    if "preset" in d:
        name = d.pop("preset")
        if name not in PRESETS:
            raise ValueError(f"config file {path!r}: unknown preset {name!r}; allowed: {sorted(PRESETS)}")
        base = copy.deepcopy(PRESETS[name])
    merged = merge(base, d)
    data = (merged.get("task_args") or {}).get("path") if isinstance(merged.get("task_args"), dict) else None
    if isinstance(data, str) and not os.path.isabs(data):
        merged["task_args"]["path"] = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(path)), data))
    return RunConfig.from_dict(merged)


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
