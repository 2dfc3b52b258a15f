"""One checkpoint of a training run, looked at closely: its LLC under the
run's sweep settings (or others), with the summary of checks and the loss
traces a user reads before trusting it, or before sweeping every
checkpoint with those settings. The number is the one the sweep records."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ..engine.interrupt import LLCInterrupted
from ..estimate.result import LLCResult
from .checkpoints import atomic_json, load_checkpoint, read_manifest
from .config import RunConfig, SweepSettings
from .safety import inside, save_figure
from .sweep import checkpoint_hessian, checkpoint_llc, settings_key


@dataclass
class RunCheckpoint:
    """A checkpoint of a run made by ``llcfast.pipeline.train``, loaded."""
    config: RunConfig
    task: object
    step: int
    model: torch.nn.Module


def open_checkpoint(run_dir: str, step: Optional[int] = None, device=None) -> RunCheckpoint:
    """The run's checkpoint at ``step`` (default: the last), on ``device``."""
    manifest = read_manifest(run_dir)
    cfg = RunConfig.from_dict(manifest["config"])
    ckpts = {c["step"]: c["file"] for c in manifest["checkpoints"]}
    if not ckpts:
        raise ValueError(f"{run_dir!r} has no checkpoints yet")
    step = max(ckpts) if step is None else step
    if step not in ckpts:
        raise ValueError(f"no checkpoint at step {step} in {run_dir!r}; steps: {sorted(ckpts)}")
    task = cfg.make_task()
    model = load_checkpoint(os.path.join(run_dir, ckpts[step]), lambda: cfg.make_model(task))
    return RunCheckpoint(cfg, task, step, model.to(device) if device is not None else model)


@dataclass
class CheckpointEstimate:
    step: int
    settings: SweepSettings
    result: LLCResult
    paths: dict  # "json", "png"
    # Ctrl-C: "chains" (the estimate is from the draws finished) or "hessian"
    # (the LLC is whole, the Hessian statistics were not finished)
    interrupted: Optional[str] = None
    hessian: Optional[dict] = None  # with settings.hessian: trace, its standard error, top eigenvalue

    def summary(self) -> str:
        lines = [f"step {self.step}: {self.result.summary()}"]
        if self.hessian:
            h = self.hessian
            lines.append(f"Hessian trace {h['hessian_trace']:.4g} ± {h['hessian_trace_se']:.2g} "
                         f"({self.settings.hessian_probes} probes), top eigenvalue {h['hessian_top_eig']:.4g}")
        return "\n".join(lines)


def estimate_checkpoint(run_dir: str, *, step: Optional[int] = None, settings: Optional[SweepSettings] = None,
                        device=None, out: Optional[str] = None, progress: bool = True,
                        engine: Optional[dict] = None) -> CheckpointEstimate:
    """The LLC of one checkpoint with the run's sweep settings (or
    ``settings``), and with ``settings.hessian`` the Hessian trace and top
    eigenvalue, as the sweep measures them; writes ``estimate_stepN.json``
    (the whole result, the settings and their sweep key) and
    ``estimate_stepN.png`` (the loss traces) into ``out``
    (RUN_DIR/estimates). After Ctrl-C the draws finished are written and
    returned, marked interrupted (without the Hessian); during burn-in there
    are none, and the interrupt goes on. Ctrl-C during the Hessian
    statistics keeps the whole LLC estimate."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = open_checkpoint(run_dir, step, device)
    s = settings or ckpt.config.sweep
    llc_batches = ckpt.task.llc_batches(s.llc_sequences, s.llc_batch_size, device)
    interrupted, hessian = None, None
    try:
        result = checkpoint_llc(ckpt.model, ckpt.config.loss_fn, llc_batches, s, device=device, progress=progress,
                                engine=engine)
    except LLCInterrupted as stop:
        if stop.result is None:
            raise
        result, interrupted = stop.result, "chains"
    if s.hessian and not interrupted:
        try:
            hessian = checkpoint_hessian(ckpt.model, ckpt.config.loss_fn, ckpt.task.eval_set(s.eval_sequences, device),
                                         s, progress=progress, compiled=bool((engine or {}).get("compile")))
        except KeyboardInterrupt:
            interrupted = "hessian"
    est = CheckpointEstimate(ckpt.step, s, result, {}, interrupted, hessian)
    est.paths = _write(est, out or inside(run_dir, os.path.join(run_dir, "estimates")))
    return est


def _write(est: CheckpointEstimate, out: str) -> dict:
    import matplotlib.pyplot as plt
    os.makedirs(out, exist_ok=True)
    result, step = est.result, est.step
    paths = {kind: os.path.join(out, f"estimate_step{step}.{kind}") for kind in ("json", "png")}
    atomic_json({"step": step, "settings": settings_key(est.settings), "sweep_settings": asdict(est.settings),
                 "summary": est.summary(), **(est.hessian or {}), **result.to_dict()}, paths["json"])
    fig = result.plot()
    fig.suptitle(f"step {step}", x=0.01, ha="left")
    save_figure(fig, paths["png"], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths
