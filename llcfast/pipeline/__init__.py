"""The paper's pipeline: train with checkpoints, sweep the LLC (and Hessian
statistics) over them, detect stages, calibrate, report."""
from . import fused_losses  # declares the models' losses' fast-path forms
from .checkpoints import checkpoint_steps, load_checkpoint
from .config import PRESETS, RunConfig, SweepSettings, TrainSettings, load_config, preset
from .train import train

__all__ = ["fused_losses", "PRESETS", "RunConfig", "SweepSettings", "TrainSettings", "checkpoint_steps", "load_checkpoint",
           "load_config", "preset", "train"]
