"""Training with checkpoints: AdamW, the paper's schedule shapes, a manifest
of the checkpoints, and resumption after interruption.

The batch of step t depends only on (seed, t) and the learning rate only on t,
so a resumed run continues exactly as the uninterrupted one would have. The
resume state (model, optimizer, step) is written atomically at every
checkpoint and when the run is interrupted (Ctrl-C), so a killed run loses
at most the steps since the last checkpoint.
"""
from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch

from ..engine.common import first_line
from ..engine.interrupt import deferred_interrupts
from ..engine.planner import GiB
from ..engine.progress import progress_bar
from .checkpoints import MANIFEST, RESUME, atomic_json, atomic_save, checkpoint_steps, read_manifest
from .config import RunConfig
from .safety import RunFileError, check_same_data, data_fingerprint, run_lock


def learning_rate(cfg: RunConfig, step: int) -> float:
    t = cfg.train
    if t.schedule == "constant":
        return t.lr
    half = t.steps / 2
    if step < half:
        return t.lr * (step + 1) / half
    return t.lr * max(t.steps - step, 0) / max(t.steps - half, 1)


def _train_step(model, opt, loss_fn, batch) -> float:
    """One AdamW step; returns the loss. A non-finite loss takes no step."""
    loss = loss_fn(model, batch)
    value = float(loss.detach())
    if not math.isfinite(value):
        return value
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return value


def _out_of_memory(exc: BaseException, model, batch_size: int, device, step: int, saved: Optional[int]) -> str:
    params = sum(p.numel() for p in model.parameters())
    free = ""
    if device.type == "cuda":
        free_b, total_b = torch.cuda.mem_get_info(device)
        free = f", {free_b / GiB:.2f} of {total_b / GiB:.2f} GiB free now"
    resume = (f"; the same command on such a device resumes from step {saved}" if saved is not None else "")
    return (f"training ran out of {device} memory at step {step} ({first_line(exc, 'out of memory')}{free}); "
            f"each step holds the {params:,}-parameter model, its AdamW state and the activations of "
            f"train.batch_size = {batch_size} sequences: lower train.batch_size or the model's size (model_args), "
            f"in a new run directory since the config changes, or use a device with more memory{resume}")


def _ckpt_name(step: int) -> str:
    return os.path.join("checkpoints", f"step_{step:08d}.pt")


def train(cfg: RunConfig, out_dir: str, *, device="cpu", progress: bool = True,
          stop_at: Optional[int] = None) -> dict:
    """Trains ``cfg``'s model on its task, writing checkpoints and
    ``manifest.json`` into ``out_dir``; resumes if ``out_dir`` holds an
    unfinished run of the same config. ``stop_at`` ends the run early at that
    step (as an interruption would, resumable). Returns the manifest."""
    cfg.validate()
    if cfg.model != "llcfast":
        raise ValueError(f"llcfast trains its own models only; a config with model {cfg.model!r} describes a run "
                         "trained elsewhere (`llcfast import`), which can be swept but not trained here")
    os.makedirs(os.path.join(out_dir, "checkpoints"), exist_ok=True)
    with run_lock(out_dir, "train"):
        return _train(cfg, out_dir, torch.device(device), progress, stop_at)


def _train(cfg: RunConfig, out_dir: str, device: torch.device, progress: bool, stop_at: Optional[int]) -> dict:
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest_path):
        manifest = read_manifest(out_dir)
        # Read through from_dict, so that a run written before a config field existed
        # (its default) still resumes.
        if RunConfig.from_dict(manifest.get("config") or {}).to_dict() != cfg.to_dict():
            raise ValueError(f"{out_dir!r} holds a run with a different config; use a new output directory "
                             "(or delete that one)")
        if manifest.get("complete"):
            return manifest
        check_same_data(manifest, data_fingerprint(cfg), manifest_path)
    # A config that cannot make its task or model leaves no manifest behind to block a rerun
    task = cfg.make_task()
    torch.manual_seed(cfg.seed)
    model = cfg.make_model(task).to(device)
    if not os.path.exists(manifest_path):
        manifest = {"version": 1, "config": cfg.to_dict(), "checkpoints": [], "complete": False}
        data = data_fingerprint(cfg)
        if data:
            manifest["data"] = data
        atomic_json(manifest, manifest_path)
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    start = 0
    resume_path = os.path.join(out_dir, RESUME)
    if os.path.exists(resume_path):
        try:
            state = torch.load(resume_path, map_location=device, weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start = int(state["step"])
        except Exception as exc:  # truncated, corrupt, or not a resume state
            raise RunFileError(f"{resume_path}: cannot be resumed from ({type(exc).__name__}: {first_line(exc)}); "
                               "delete it to train again from step 0 (training is deterministic: the same "
                               "checkpoints result)") from None
    saves = set(checkpoint_steps(t.steps, t.log_checkpoints, t.linear_checkpoints))
    done = {c["step"] for c in manifest["checkpoints"]}
    loss_fn = cfg.loss_fn
    bar = progress_bar(progress, t.steps, "train", initial=start)
    recent = []

    saved: Optional[int] = start if os.path.exists(resume_path) else None  # the step the resume state holds

    def save_resume(step: int) -> None:
        nonlocal saved
        atomic_save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict()}, resume_path)
        saved = step

    step = start
    try:
        while True:
            if step in saves and step not in done:
                name = _ckpt_name(step)
                atomic_save(model.state_dict(), os.path.join(out_dir, name))
                train_loss = sum(recent) / len(recent) if recent else None
                manifest["checkpoints"].append({"step": step, "file": name, "train_loss": train_loss})
                done.add(step)
                save_resume(step)
                atomic_json(manifest, manifest_path)
            if step >= t.steps or (stop_at is not None and step >= stop_at):
                break
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            with deferred_interrupts():  # the update and the step counter move together, or neither does
                try:
                    loss = _train_step(model, opt, loss_fn, task.train_batch(step, t.batch_size, device))
                except torch.OutOfMemoryError as exc:
                    # The state of the last checkpoint stays the resume point: an
                    # optimizer step cut short may have moved some weights.
                    raise MemoryError(_out_of_memory(exc, model, t.batch_size, device, step, saved)) from exc
                if math.isfinite(loss):
                    step += 1
            if not math.isfinite(loss):
                save_resume(step)
                raise FloatingPointError(f"training loss became {loss} at step {step}; lower train.lr")
            recent = (recent + [loss])[-50:]
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{recent[-1]:.4g}")
    except KeyboardInterrupt:
        save_resume(step)
        print(f"\ninterrupted at step {step}; the state is saved: rerun the same command to resume")
        raise
    finally:
        bar.close()
    if step >= t.steps:
        manifest["complete"] = True
        manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_json(manifest, manifest_path)
    return manifest

