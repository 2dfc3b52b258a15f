"""The landscape around a run's checkpoints, from the command line: the loss
on the path from one checkpoint to another (of the same run, or of another
run such as a second seed), after aligning the second to the first where
asked, and the ablations of the first. Both use the evaluation sequences
the sweep's barriers use (its first sweep.hessian_batch), so a straight
path between consecutive checkpoints gives the barrier the sweep records."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..landscape.ablation import AblationResult, layer_ablation
from ..landscape.paths import PATHS, PathResult, loss_along_path
from ..landscape.permutation import align_permutation
from .checkpoints import atomic_json
from .estimate import open_checkpoint
from .safety import inside, save_figure

ALIGNMENTS = ("none", "weights", "activations")


@dataclass
class LandscapeView:
    run_dir: str
    step: int
    other: Optional[str] = None  # "RUN_DIR step N" of the path's far end
    path: Optional[PathResult] = None
    ablation: Optional[AblationResult] = None
    align: str = "none"
    files: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = []
        if self.path is not None:
            r = self.path
            aligned = "" if self.align == "none" else f", aligned by {self.align}"
            lines.append(f"{self.path.path} path from step {self.step} to {self.other}{aligned}: barrier "
                         f"{r.barrier:.4g} at t = {r.barrier_t:.2f} (loss {r.loss[0]:.4g} -> {r.loss[-1]:.4g}, "
                         f"{len(r.t)} points)")
        if self.ablation is not None:
            worst = sorted(self.ablation.increase.items(), key=lambda kv: -kv[1])[:3]
            lines.append(f"ablations of step {self.step} (loss {self.ablation.loss['none']:.4g}): largest increases "
                         + ", ".join(f"{k} +{v:.3g}" for k, v in worst))
        return "\n".join(lines)


def landscape_of(run_dir: str, *, step: Optional[int] = None, to_run: Optional[str] = None,
                 to_step: Optional[int] = None, align: str = "none", points: int = 33, path: str = "linear",
                 ablate: bool = False, heads: bool = False, device=None, out: Optional[str] = None,
                 progress: bool = True) -> LandscapeView:
    """The loss along ``path`` from checkpoint ``step`` of ``run_dir`` (default:
    its last) to checkpoint ``to_step`` of ``to_run`` (default: the same run;
    its last checkpoint where only the run is given), with the far end
    aligned to the near one by ``align``; and with ``ablate`` the near
    checkpoint's block (and ``heads``: head) ablations. Writes the curve and
    the ablations as JSON and PNG into ``out`` (RUN_DIR/landscape)."""
    if align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {ALIGNMENTS}, got {align!r}")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if to_run is None and to_step is None and not ablate:
        raise ValueError("nothing to measure: give another checkpoint (to_step, or to_run for another run) or "
                         "ablate=True")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    near = open_checkpoint(run_dir, step, device)
    s = near.config.sweep
    batch = [tuple(t[:s.hessian_batch] for t in near.task.eval_set(s.eval_sequences, device))]
    loss_fn = near.config.loss_fn
    view = LandscapeView(run_dir, near.step, align=align)
    out = out or inside(run_dir, os.path.join(run_dir, "landscape"))
    os.makedirs(out, exist_ok=True)
    if to_run is not None or to_step is not None:
        far = open_checkpoint(to_run or run_dir, to_step, device)
        if to_run is None and far.step == near.step:
            raise ValueError(f"the path from step {near.step} to itself is flat; pick another checkpoint to end in")
        other = far.model
        if align != "none":
            other = align_permutation(near.model, other, batch if align == "activations" else None, loss_fn)
        view.path = loss_along_path(near.model, other, batch, loss_fn, points=points, path=path, device=device,
                                    progress=progress)
        view.other = f"{to_run + ' ' if to_run else ''}step {far.step}"
        name = f"path_step{near.step}_to_{_label(to_run)}step{far.step}"
        view.files["path"] = _write(out, name, {"from": {"run": run_dir, "step": near.step},
                                                "to": {"run": to_run or run_dir, "step": far.step},
                                                "align": align, "barrier": view.path.barrier,
                                                "barrier_t": view.path.barrier_t, "t": view.path.t.tolist(),
                                                "loss": view.path.loss.tolist(), "config": view.path.config},
                                    view.path.plot)
    if ablate:
        view.ablation = layer_ablation(near.model, batch, loss_fn, heads=heads, device=device, progress=progress)
        view.files["ablation"] = _write(out, f"ablation_step{near.step}",
                                        {"run": run_dir, "step": near.step, "loss": view.ablation.loss,
                                         "increase": view.ablation.increase, "config": view.ablation.config},
                                        view.ablation.plot)
    return view


def _label(run: Optional[str]) -> str:
    return "" if run is None else os.path.basename(os.path.normpath(run)) + "_"


def _write(out: str, name: str, record: dict, plot) -> dict:
    import matplotlib.pyplot as plt
    files = {"json": os.path.join(out, name + ".json"), "png": os.path.join(out, name + ".png")}
    atomic_json(json.loads(json.dumps(record, default=float)), files["json"])
    ax = plot()
    save_figure(ax.figure, files["png"], dpi=120, bbox_inches="tight")
    plt.close(ax.figure)
    return files
