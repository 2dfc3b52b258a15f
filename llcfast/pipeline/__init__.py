"""The paper's pipeline: train with checkpoints, sweep the LLC (and Hessian
statistics) over them, detect stages, calibrate, report. Its public names
load on first use (see llcfast/__init__.py)."""
import importlib

# public name -> the module that defines it (tests/package/test_import_graph.py reads this table)
_LAZY = {"PRESETS": "llcfast.pipeline.presets", "RunConfig": "llcfast.pipeline.config",
         "SweepSettings": "llcfast.pipeline.config", "TrainSettings": "llcfast.pipeline.config",
         "load_config": "llcfast.pipeline.config", "preset": "llcfast.pipeline.config",
         "checkpoint_steps": "llcfast.pipeline.checkpoints", "load_checkpoint": "llcfast.pipeline.checkpoints",
         "train": "llcfast.pipeline.training"}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'llcfast.pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
