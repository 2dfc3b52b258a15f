"""Sweeps: the LLC (all chains), the test loss, the task's behavioural
metrics (behaviour.py) and, when asked, the Hessian trace and top eigenvalue
at every checkpoint of a run.

Each checkpoint's record is appended to ``results.jsonl`` as one line the
moment it is finished (written with one call and fsync'd); a line cut short
by a kill is skipped on reading. A rerun skips checkpoints already done with
the same settings, and a checkpoint that fails to load is recorded with its
error and retried on the next run while the sweep goes on.

Inside a torch.distributed job (torchrun) the checkpoints are dealt out to
the ranks; each rank appends to its own part file, and rank 0 merges the
parts into the one results file when all are done (parts left by a killed
run count as done and are merged by the next).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, replace
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..engine.progress import progress_bar, warnings_above_bars
from ..engine.samplers import check_sampler
from ..estimate.llc import estimate_llc
from ..landscape.paths import loss_along_path
from .behaviour import for_task as behaviour_for_task
from .checkpoints import load_checkpoint, read_manifest
from .config import RunConfig, SweepSettings
from .safety import RunFileError, check_same_data, data_fingerprint, inside, record_problem, run_lock

RESULTS = "results.jsonl"


# Settings added after results files existed: left out of the key while at
# their defaults, so older results keep their keys and are not re-measured.
_LATER_DEFAULTS = {"sampler": "sgld", "sampler_kwargs": {}, "bounding_box": None, "precision": "fp32",
                   "num_init_batches": None, "draw_batches": "step"}  # the draws of sweeps before the field


# Extra measurements that change no other number: a sweep with or without
# them is the same sweep.
_NOT_IN_KEY = ("behaviour", "landscape", "landscape_points")


def settings_key(settings: SweepSettings) -> str:
    d = asdict(settings)
    for name in _NOT_IN_KEY:
        d.pop(name)
    for name, default in _LATER_DEFAULTS.items():
        if d.get(name) == default:
            d.pop(name)
    blob = json.dumps(d, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def read_results(path: str, problem: Callable[[object], Optional[str]] = record_problem) -> List[dict]:
    """The records of a results file; a torn last line (a killed write), and
    any line ``problem`` finds is not a record, are skipped with a warning
    that names the line."""
    if not os.path.exists(path):
        return []
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError:
        raise RunFileError(f"{path}: not a text file (results are JSON lines)") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{path}: line {i + 1} is incomplete (a write was interrupted) and is ignored",
                          RuntimeWarning, stacklevel=2)
            continue
        wrong = problem(record)
        if wrong:
            warnings.warn(f"{path}: line {i + 1} is not a record ({wrong}) and is ignored", RuntimeWarning,
                          stacklevel=2)
            continue
        records.append(record)
    return records


def latest_sweep(path: str, settings: Optional[str] = None) -> Tuple[List[dict], str, List[str]]:
    """The finished records of one sweep in a results file: ``settings``'s
    (a key of its 'settings' column), else the latest sweep's, one per step
    (a re-measured step: its last record). Returns them, the key chosen and
    every key the file holds, the latest first."""
    if not os.path.exists(path):
        run = os.path.dirname(path) or "."
        raise FileNotFoundError(f"{path} does not exist; run `llcfast sweep {run}` first")
    records = [r for r in read_results(path) if "error" not in r]
    keys = list(dict.fromkeys(r.get("settings") for r in reversed(records)))
    chosen = settings or (keys[0] if keys else None)
    if chosen not in keys:
        raise ValueError(f"settings key {chosen!r} matches no sweep in {path}; its sweeps: {keys}")
    latest = {r["step"]: r for r in records if r.get("settings") == chosen}
    return sorted(latest.values(), key=lambda r: r["step"]), chosen, keys


def failed_checkpoints(path: str, key: str) -> List[dict]:
    """The error records of sweep ``key`` whose checkpoint has no successful
    record: the checkpoints that sweep could not measure, by step."""
    records = [r for r in read_results(path) if r.get("settings") == key]
    measured = {r.get("checkpoint") for r in records if "error" not in r}
    failed = {r.get("checkpoint"): r for r in records if "error" in r and r.get("checkpoint") not in measured}
    return sorted(failed.values(), key=lambda r: r["step"])


def append_record(path: str, record: dict) -> None:
    """One fsync'd line; never through a symbolic link (O_NOFOLLOW), so a run
    folder from elsewhere cannot point the write at another file."""
    data = json.dumps(record, allow_nan=False) + "\n"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        if os.path.islink(path):
            raise RunFileError(f"{path} is a symbolic link; llcfast does not write through links (remove it)") \
                from None
        raise RunFileError(f"{path}: cannot be opened for appending ({exc.strerror})") from None
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a previous torn write left no newline: a fresh line
            data = "\n" + data
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _finite(x):
    return None if x is None or not math.isfinite(x) else float(x)


def eval_loss(model, loss_fn: Callable, data: Tuple[torch.Tensor, ...], chunk: int = 64) -> float:
    """Mean loss over the evaluation set, in chunks so that large sets fit."""
    n = data[0].shape[0]
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, chunk):
            part = tuple(t[i:i + chunk] for t in data)
            total += float(loss_fn(model, part)) * part[0].shape[0]
    return total / n


def checkpoint_llc(model, loss_fn: Callable, llc_batches: Sequence, s: SweepSettings, *, device,
                   progress: bool = True, engine: Optional[dict] = None):
    """The LLCResult of one checkpoint under sweep settings ``s``: what a
    sweep records for it, and what ``llcfast estimate`` shows."""
    with warnings.catch_warnings():
        # The chains draw from a fixed pre-sampled set by design (docs/paper.md), so reuse is expected.
        warnings.filterwarnings("ignore", message="the loader holds", category=UserWarning)
        return estimate_llc(model, llc_batches, loss_fn, num_chains=s.num_chains, num_draws=s.num_draws,
                            num_burnin=s.num_burnin, epsilon=s.epsilon, gamma=s.gamma, nbeta=s.nbeta,
                            seed=s.seed, device=device, progress=progress, split_chains=False, sampler=s.sampler,
                            sampler_kwargs=s.sampler_kwargs, bounding_box=s.bounding_box, precision=s.precision,
                            num_init_batches=s.num_init_batches, draw_batches=s.draw_batches, **(engine or {}))


def checkpoint_hessian(model, loss_fn: Callable, eval_set, s: SweepSettings, *, progress: bool = True,
                       compiled: bool = False) -> dict:
    """Hutchinson trace (± its standard error) and top eigenvalue of the
    Hessian of the loss on the first s.hessian_batch evaluation sequences."""
    from ..estimate.hessian import hessian_eigs, hessian_trace
    batch = [tuple(t[:s.hessian_batch] for t in eval_set)]
    tr = hessian_trace(model, loss_fn, batch, num_probes=s.hessian_probes, seed=s.seed, precision=s.precision,
                       compile=compiled, progress=progress)
    eig = hessian_eigs(model, loss_fn, batch, k=1, tol=1e-3, precision=s.precision, compile=compiled,
                       progress=progress)
    return {"hessian_trace": float(tr.trace[0]), "hessian_trace_se": float(tr.std_error[0]),
            "hessian_top_eig": float(eig.values[0, 0])}


def measure(model, loss_fn: Callable, llc_batches: Sequence, eval_set, s: SweepSettings, *, device,
            progress: bool = True, engine: Optional[dict] = None,
            behaviour: Optional[Callable[[torch.nn.Module], dict]] = None) -> dict:
    """One checkpoint's record: LLC, test loss and (if asked) Hessian
    statistics and ``behaviour(model)`` (a dict of numbers)."""
    started = time.perf_counter()
    model = model.to(device)
    res = checkpoint_llc(model, loss_fn, llc_batches, s, device=device, progress=progress, engine=engine)
    rec = {
        "llc_mean": _finite(res.llc_mean), "llc_std": _finite(res.llc_std),
        "llc_per_chain": [_finite(v) for v in res.llc_per_chain.tolist()], "init_loss": res.init_loss,
        "rhat": _finite(res.diagnostics.get("rhat")), "ess": _finite(res.diagnostics.get("ess")),
        "trend_t": _finite(res.diagnostics.get("trend_t")),
        "diverged_chains": res.diagnostics["diverged_chains"],
        # LLCResult.checks() that failed (divergence, rhat, trend, init_loss, sign): the report marks these points
        "failed_checks": [name for name, passed, _ in res.checks() if passed is False],
        "llc_se_from_init_loss": _finite(res.diagnostics.get("llc_se_from_init_loss")),
        **({"mala_acceptance": _finite(res.diagnostics["mala_acceptance"])} if "mala_acceptance" in res.diagnostics
           else {}),
        "test_loss": eval_loss(model, loss_fn, eval_set),
    }
    if s.hessian:
        rec.update(checkpoint_hessian(model, loss_fn, eval_set, s, progress=progress,
                                      compiled=bool((engine or {}).get("compile"))))
    if behaviour is not None:
        rec["behaviour"] = {k: _finite(v) for k, v in behaviour(model).items()}
    rec["seconds"] = time.perf_counter() - started
    return rec


def checkpoint_landscape(model, load: Callable[[str], torch.nn.Module], previous: Optional[str], final: str,
                         path: str, loss_fn: Callable, eval_set, s: SweepSettings, *, device) -> dict:
    """The loss barriers on the straight paths to the previous checkpoint
    and to the final one, on the first s.hessian_batch evaluation
    sequences (landscape/paths.py)."""
    batch = [tuple(t[:s.hessian_batch] for t in eval_set)]

    def barrier_to(other: Optional[str]):
        if other is None:
            return None
        if other == path:  # the path to itself: a constant loss
            return 0.0
        return _finite(loss_along_path(model, load(other), batch, loss_fn, points=s.landscape_points,
                                       device=device, progress=False).barrier)

    return {"barrier_prev": barrier_to(previous), "barrier_final": barrier_to(final)}


def _add_landscape(records: List[dict], ordered: List[Tuple[int, str]], load, loss_fn, eval_set,
                   s: SweepSettings, out: str, device) -> None:
    """Records of this sweep measured without the barriers get them, appended
    as the records' newer versions (the LLC is not measured again)."""
    previous = {path: (ordered[i - 1][1] if i else None) for i, (_, path) in enumerate(ordered)}
    for record in records:
        if "barrier_final" in record or record["checkpoint"] not in previous:
            continue
        model = load(record["checkpoint"]).to(device)
        record.update(checkpoint_landscape(model, load, previous[record["checkpoint"]], ordered[-1][1],
                                           record["checkpoint"], loss_fn, eval_set, s, device=device))
        append_record(out, record)


def sweep_checkpoints(checkpoints: Iterable[Tuple[int, str]], load: Callable[[str], torch.nn.Module],
                      loss_fn: Callable, llc_batches: Sequence, eval_set, settings: SweepSettings, out: str, *,
                      device="cpu", progress: bool = True, engine: Optional[dict] = None,
                      behaviour: Optional[Callable[[torch.nn.Module], dict]] = None) -> List[dict]:
    """Measures each (step, path) not yet in ``out`` (JSON lines) with these
    settings; returns all successful records for these settings, by step.
    ``engine``: estimate_llc options that do not change the estimate
    (compile, mala); they are not part of the settings key. ``behaviour``:
    a function of the model whose dict of numbers each record keeps
    (pipeline/behaviour.py has the paper tasks')."""
    check_sampler(settings.sampler, settings.sampler_kwargs, settings.bounding_box)  # before any work
    checkpoints = sorted(checkpoints, key=lambda c: c[0])
    key = settings_key(settings)
    rank, world = _rank_world()
    done = {(r.get("checkpoint"), r.get("settings")) for path in [out] + _parts(out, world) for r in read_results(path)
            if "error" not in r}
    todo = [(step, path) for step, path in checkpoints if (path, key) not in done]
    final_out = out
    if world > 1:
        torch.distributed.barrier()  # every rank has read the files before any writes
        todo, out = todo[rank::world], _part(final_out, rank)
    shown = progress and bool(todo) and rank == 0
    bar = progress_bar(shown, len(todo), "checkpoints", unit="ckpt", leave=True)
    flagged: Dict[int, List[str]] = {}  # step -> its estimate's warnings, shown once at the end
    try:
        with warnings_above_bars(shown):
            for step, path in todo:
                base = {"step": int(step), "checkpoint": path, "settings": key, "sweep_settings": asdict(settings)}
                try:
                    model = load(path)
                except Exception as exc:  # report, record, go on: one bad file must not end a long sweep
                    msg = f"{type(exc).__name__}: {exc}"
                    warnings.warn(f"checkpoint {path} (step {step}) could not be loaded and was skipped: {msg}",
                                  RuntimeWarning, stacklevel=2)
                    append_record(out, {**base, "error": msg})
                else:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        record = measure(model, loss_fn, llc_batches, eval_set, settings, device=device,
                                         progress=progress, engine=engine, behaviour=behaviour)
                    notes = sorted({str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)})
                    if notes:  # kept with the record, and summed up in one line after the sweep
                        record["warnings"] = flagged[int(step)] = notes
                    append_record(out, {**base, **record})
                bar.update(1)
    finally:
        bar.close()
    if flagged:
        steps = sorted(flagged)
        shown_steps = ", ".join(map(str, steps[:8])) + (f" and {len(steps) - 8} more" if len(steps) > 8 else "")
        warnings.warn(f"{len(steps)} of {len(todo)} checkpoints measured with warnings (steps {shown_steps}), kept "
                      f"in their records of {out}; the report circles them. First, step {steps[0]}: "
                      + " | ".join(flagged[steps[0]]), RuntimeWarning, stacklevel=2)
    out = final_out
    if world > 1:
        torch.distributed.barrier()
    if rank == 0 and _parts(out, world):  # this job's parts, or those a killed job left
        merge_parts(out, world)
    if world > 1:
        torch.distributed.barrier()
    records = [r for r in read_results(out) if r.get("settings") == key and "error" not in r]
    latest: Dict[str, dict] = {r["checkpoint"]: r for r in records}
    if settings.landscape and rank == 0 and checkpoints:
        _add_landscape(sorted(latest.values(), key=lambda r: r["step"]), checkpoints, load, loss_fn, eval_set,
                       settings, out, device)
    return sorted(latest.values(), key=lambda r: r["step"])


def _rank_world() -> Tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _part(out: str, rank: int) -> str:
    return f"{out}.rank{rank}"


def _parts(out: str, world: int) -> List[str]:
    """Part files of this world size and any left by an earlier job."""
    folder, name = os.path.split(os.path.abspath(out))
    found = [os.path.join(folder, f) for f in os.listdir(folder)] if os.path.isdir(folder) else []
    return sorted({p for p in found if os.path.basename(p).startswith(name + ".rank")} |
                  {_part(out, r) for r in range(world) if os.path.exists(_part(out, r))})


def merge_parts(out: str, world: int = 1) -> None:
    """Appends the records of every part file to ``out`` in step order (each
    fsync'd), then removes the parts."""
    parts = _parts(out, world)
    records = sorted((r for p in parts for r in read_results(p)), key=lambda r: (r.get("step", 0), "error" in r))
    for r in records:
        append_record(out, r)
    for p in parts:
        os.remove(p)


def sweep(run_dir: str, *, settings: Optional[SweepSettings] = None, hessian: Optional[bool] = None,
          device=None, out: Optional[str] = None, progress: bool = True,
          engine: Optional[dict] = None) -> List[dict]:
    """Sweeps every checkpoint of a run made by ``llcfast.pipeline.train``
    with the run's own sweep settings (or ``settings``); results go to
    ``run_dir/results.jsonl`` (or ``out``). ``engine``: as in sweep_checkpoints."""
    manifest = read_manifest(run_dir)
    cfg = RunConfig.from_dict(manifest["config"])
    check_same_data(manifest, data_fingerprint(cfg), os.path.join(run_dir, "manifest.json"))
    s = settings or cfg.sweep
    if hessian is not None:
        s = replace(s, hessian=bool(hessian))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and _rank_world()[1] > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # torchrun: one GPU per rank
    task = cfg.make_task()
    llc_batches = task.llc_batches(s.llc_sequences, s.llc_batch_size, device)
    eval_set = task.eval_set(s.eval_sequences, device)

    def load(rel_path: str):
        return load_checkpoint(os.path.join(run_dir, rel_path), lambda: cfg.make_model(task))

    ckpts = [(c["step"], c["file"]) for c in manifest["checkpoints"]]
    # The metrics read llcfast's own attention modules; an imported model has others.
    probe = behaviour_for_task(task, eval_set, llc_batches) if s.behaviour and cfg.model == "llcfast" else None
    out = out or inside(run_dir, os.path.join(run_dir, RESULTS))
    if _rank_world()[1] > 1:  # torchrun's ranks share the folder by design; rank 0 merges their parts
        return sweep_checkpoints(ckpts, load, cfg.loss_fn, llc_batches, eval_set, s, out, device=device,
                                 progress=progress, engine=engine, behaviour=probe)
    with run_lock(run_dir, "sweep"):
        return sweep_checkpoints(ckpts, load, cfg.loss_fn, llc_batches, eval_set, s, out, device=device,
                                 progress=progress, engine=engine, behaviour=probe)
