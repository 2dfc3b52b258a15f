"""The pipeline's subcommands: demo, train, import, sweep, estimate, landscape, report, compare, calibrate."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

F = argparse.RawDescriptionHelpFormatter

DEMO_EPILOG = """examples:
  llcfast demo                         train, sweep and report into ./llcfast-demo (a few minutes on a CPU)
  llcfast demo --out /tmp/d --no-hessian
  llcfast demo --device cuda --full    the paper-scale regression run (500k steps: a GPU job)
  llcfast demo --language              a small attention-only language model instead, into ./llcfast-demo-language
  llcfast demo --language --full --device cuda    the paper's language model (50k steps: a GPU job)
Rerunning the same command resumes where it stopped."""

TRAIN_EPILOG = """examples:
  llcfast train --preset demo --out runs/demo
  llcfast train --preset regression --out runs/lr --device cuda
  llcfast train --config my_run.json --out runs/mine     (JSON: {"preset": "language", "train": {"steps": 2000}})
presets: demo, regression (docs/paper.md's LR model), language (docs/paper.md's LM model on the synthetic language),
language-demo (a small LM on a small synthetic language: minutes on a CPU).
An interrupted run resumes when the same command is run again."""

SWEEP_EPILOG = """examples:
  llcfast sweep runs/demo
  llcfast sweep runs/lr --device cuda --hessian --chains 8 --draws 500
  llcfast sweep runs/lr --device cuda --compile --mala    compiled passes; MALA acceptance per checkpoint
  torchrun --nproc-per-node 4 -m llcfast.cli sweep runs/lm --device cuda   checkpoints dealt out to 4 GPUs
Results are appended to RUN_DIR/results.jsonl as each checkpoint finishes; a rerun skips what is done."""

ESTIMATE_EPILOG = """examples:
  llcfast estimate runs/demo                       the last checkpoint, with the run's sweep settings
  llcfast estimate runs/lr --step 40000 --draws 2000 --burnin 500    longer chains on one checkpoint
  llcfast estimate runs/lr --hessian               also the Hessian trace and top eigenvalue
Prints the estimate and its checks (divergence, R-hat, trend, ESS, init-loss error); writes
estimate_stepN.json and estimate_stepN.png (the loss traces) into RUN_DIR/estimates/. With the run's
settings the LLC is the one `llcfast sweep` records for that checkpoint. Ctrl-C keeps the draws finished."""

REPORT_EPILOG = """examples:
  llcfast report runs/demo                 report.png/.svg, summary.json, results.csv into runs/demo
  llcfast report runs/demo --plateau 0.3   a looser near-zero slope for stage boundaries"""

LANDSCAPE_EPILOG = """examples:
  llcfast landscape runs/demo --step 605 --to-step 750       the loss between two checkpoints of a run
  llcfast landscape runs/seed0 --to runs/seed1 --align activations   two seeds' last checkpoints, aligned
  llcfast landscape runs/demo --ablate --heads               the last checkpoint with blocks and heads removed
On the run's evaluation sequences that the sweep's barriers use (its first sweep.hessian_batch), so a
straight path between consecutive checkpoints gives the barrier `llcfast sweep --landscape` records.
Writes path_*.json/png and ablation_stepN.json/png into RUN_DIR/landscape/."""

COMPARE_EPILOG = """examples:
  llcfast compare runs/lr-seed0 runs/lr-seed1 runs/lr-seed2 --out runs/lr-seeds
  llcfast compare runs/demo runs/demo-long --labels short long
  llcfast compare runs/demo runs/demo --settings 3f2a9c01d4e7 8b01c5e2f9a3    one run's two sweeps
Each run's latest sweep (--settings KEY: the sweep with that key in every run; KEY KEY ...: one per
run; `llcfast report RUN` lists a run's keys). Writes compare.png/.svg, compare.json (each run's
stages, the first run's boundaries beside the others' nearest, the LLC's spread across runs at the
steps they share) and compare.csv into --out."""

IMPORT_EPILOG = """examples:
  llcfast import runs/my-gpt --tokens data/train.bin              HF Trainer's checkpoint-N folders
  llcfast import pythia-70m --tokens pile.npy --context 512 --chains 8 --draws 200
then: llcfast estimate runs/my-gpt (one checkpoint, to settle the settings), llcfast sweep runs/my-gpt,
llcfast report runs/my-gpt. The LLC settings start from docs/paper.md's language model (eps 3e-3, gamma 300,
nbeta 21.7, 20 chains x 200 draws, batches of 100 sequences); sweep and estimate take overrides too.
Run it again after more checkpoints are written: the list is refreshed, and the settings, the context and
the results already measured are kept (options given then change the settings)."""

CALIBRATE_EPILOG = """examples:
  llcfast calibrate runs/demo                                  the last checkpoint, a default grid
  llcfast calibrate runs/demo --step 1000 --epsilons 1e-4 3e-4 1e-3 3e-3 --gammas 1 10 100
Writes calibration.png, calibration.csv and the recommendation into RUN_DIR/calibration/."""


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _init_batches(text):
    if text == "all":
        return text
    try:
        return _positive(int)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number of batches >= 1 or 'all', got {text!r}") from None


def _sweep_overrides(parser) -> None:
    e = _llc_overrides(parser)
    e.add_argument("--no-behaviour", dest="behaviour", action="store_false", default=None,
                   help="skip the task's behavioural metrics (ICL score, head scores, ...; on by default)")
    e.add_argument("--landscape", action="store_true", default=None,
                   help="also the loss barrier on the straight path to the previous and to the final checkpoint "
                        "(added to checkpoints measured before without re-measuring their LLC)")
    _hessian_switch(parser)


def _hessian_switch(parser) -> None:
    h = parser.add_mutually_exclusive_group()
    h.add_argument("--hessian", dest="hessian", action="store_true", default=None,
                   help="also Hessian trace and top eigenvalue (default: as the run's config says)")
    h.add_argument("--no-hessian", dest="hessian", action="store_false", help="skip the Hessian statistics")


def _llc_overrides(parser, engine: bool = True):
    """The LLC's settings and (``engine``) the engine's options; returns the engine's group."""
    g = parser.add_argument_group("LLC settings (default: the run's own)")
    g.add_argument("--chains", type=_positive(int), help="number of SGLD chains")
    g.add_argument("--draws", type=_positive(int), help="draws per chain")
    g.add_argument("--burnin", type=int, help="burn-in steps per chain")
    g.add_argument("--epsilon", type=_positive(float), help="SGLD step size")
    g.add_argument("--gamma", type=_positive(float), help="localization strength")
    g.add_argument("--nbeta", type=_positive(float), help="inverse temperature times n")
    g.add_argument("--sampler", metavar="SAMPLER[:KEY=VALUE,...]",
                   help="sgld (default), rmsprop_sgld or sgnht, e.g. rmsprop_sgld:alpha=0.9999")
    g.add_argument("--bounding-box", type=_positive(float), help="keep every element within w* +- this")
    g.add_argument("--init-batches", type=_init_batches, dest="num_init_batches", metavar="N|all",
                   help="batches of the LLC set the loss at w* averages (default: the run's, else one per chain); "
                        "more shrink the init loss's error, which every chain shares, and 'all' makes it 0")
    g.add_argument("--precision", choices=("fp32", "tf32", "bf16"),
                   help="matmul precision of the LLC's and the Hessian's passes (default fp32)")
    if not engine:
        return None
    e = parser.add_argument_group("engine options (they do not change the estimate)")
    e.add_argument("--compile", action="store_true", help="torch.compile the LLC's and the Hessian's batched "
                                                          "passes (compiled once, reused across checkpoints)")
    e.add_argument("--mala", action="store_true", help="record the mean MALA acceptance per checkpoint")
    return e


def _settings(base, args):
    return replace(base, **_setting_changes(args))


def _setting_changes(args) -> dict:
    """The sweep settings the LLC options on the command line set."""
    fields = dict(num_chains=args.chains, num_draws=args.draws, num_burnin=args.burnin, epsilon=args.epsilon,
                  gamma=args.gamma, nbeta=args.nbeta, hessian=getattr(args, "hessian", None),
                  bounding_box=args.bounding_box, precision=args.precision, behaviour=getattr(args, "behaviour", None),
                  landscape=getattr(args, "landscape", None),
                  num_init_batches=args.num_init_batches)
    if args.sampler:
        (fields["sampler"], fields["sampler_kwargs"]), = _parse_samplers([args.sampler], "--sampler")
    return {k: v for k, v in fields.items() if v is not None}


def _device(name):
    import torch
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return name


def cmd_demo(args) -> int:
    from .demo import demo
    out = args.out or ("llcfast-demo-language" if args.language else "llcfast-demo")
    demo(out, device=_device(args.device), full=args.full, hessian=args.hessian, progress=not args.quiet,
         language=args.language)
    return 0


def cmd_train(args) -> int:
    from .config import load_config, preset
    from .training import train
    cfg = load_config(args.config) if args.config else preset(args.preset)
    if args.steps is not None:
        cfg = replace(cfg, train=replace(cfg.train, steps=args.steps))
    cfg.validate()
    manifest = train(cfg, args.out, device=_device(args.device), progress=not args.quiet)
    print(f"{len(manifest['checkpoints'])} checkpoints in {os.path.abspath(args.out)}; next: llcfast sweep {args.out} "
          f"(or first llcfast estimate {args.out}: one checkpoint, to check the settings)")
    return 0


def cmd_sweep(args) -> int:
    from .checkpoints import read_manifest
    from .config import RunConfig
    from .sweep import RESULTS, failed_checkpoints, settings_key, sweep
    cfg = RunConfig.from_dict(read_manifest(args.run_dir)["config"])
    rank = _join_torchrun(args.device)
    try:
        engine = {k: True for k in ("compile", "mala") if getattr(args, k, False)}
        records = sweep(args.run_dir, settings=_settings(cfg.sweep, args), device=args.device and _device(args.device),
                        progress=not args.quiet, engine=engine)
    finally:
        if rank is not None:
            import torch.distributed as dist
            dist.destroy_process_group()
    if rank:
        return 0
    results = os.path.join(args.run_dir, RESULTS)
    failed = failed_checkpoints(results, settings_key(_settings(cfg.sweep, args)))
    print(f"{len(records)} checkpoints measured: {results}; next: llcfast report {args.run_dir}")
    if failed:
        print(f"{len(failed)} checkpoint(s) could not be measured (a rerun retries them):", file=sys.stderr)
        for r in failed:
            print(f"  step {r['step']} ({r['checkpoint']}): {r['error'].splitlines()[0][:200]}", file=sys.stderr)
        return 1
    return 0


def _join_torchrun(device) -> "int | None":
    """Under torchrun (WORLD_SIZE > 1) joins the process group (NCCL for
    CUDA, gloo otherwise) and returns this rank; else None."""
    import torch
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return None
    cuda = device == "cuda" or (device is None and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank()


def cmd_estimate(args) -> int:
    from .checkpoints import read_manifest
    from .config import RunConfig
    from .estimate import estimate_checkpoint
    cfg = RunConfig.from_dict(read_manifest(args.run_dir)["config"])
    engine = {k: True for k in ("compile", "mala") if getattr(args, k, False)}
    est = estimate_checkpoint(args.run_dir, step=args.step, settings=_settings(cfg.sweep, args),
                              device=args.device and _device(args.device), out=args.out, progress=not args.quiet,
                              engine=engine)
    print(est.summary())
    print(f"traces: {os.path.abspath(est.paths['png'])}\nresult: {os.path.abspath(est.paths['json'])}")
    if est.interrupted:
        print("interrupted: " + ("the estimate above is from the draws finished" if est.interrupted == "chains"
                                 else "the LLC above is whole; the Hessian statistics were not finished"),
              file=sys.stderr)
        return 130
    return 0


def cmd_landscape(args) -> int:
    from .landscape import landscape_of
    if args.to is None and args.to_step is None and not args.ablate:
        raise ValueError("nothing to measure: give a checkpoint to end in (--to-step, or --to RUN_DIR) or --ablate")
    view = landscape_of(args.run_dir, step=args.step, to_run=args.to, to_step=args.to_step, align=args.align,
                        points=args.points, path="bezier" if args.bezier else "linear", ablate=args.ablate,
                        heads=args.heads, device=args.device and _device(args.device), out=args.out,
                        progress=not args.quiet)
    print(view.summary())
    for kind, files in view.files.items():
        print(f"{kind}: {os.path.abspath(files['png'])}")
    return 0


def cmd_report(args) -> int:
    from .report import check_lines, stage_table, write_report
    from .sweep import RESULTS, latest_sweep
    path = os.path.join(args.run_dir, RESULTS)
    records, chosen, keys = latest_sweep(path, args.settings)
    if len(keys) > 1:
        print(f"{path} holds sweeps with {len(keys)} different settings {keys}; reporting {chosen} "
              "(choose with --settings)")
    paths = write_report(records, args.out or args.run_dir, plateau=args.plateau)
    print("\n".join(stage_table(paths["fit"], paths["curvature"], paths.get("behaviour"))))
    flagged = check_lines(records)
    if flagged:
        print("\n".join(flagged))
    print(f"report: {os.path.abspath(paths['png'])}")
    return 0


def cmd_import(args) -> int:
    from .imported import import_run
    changes = dict(_setting_changes(args), **{k: getattr(args, k) for k in
                                              ("llc_sequences", "llc_batch_size", "eval_sequences")
                                              if getattr(args, k) is not None})
    manifest = import_run(args.run_dir, args.tokens, context=args.context, dtype=args.dtype, changes=changes)
    steps = [c["step"] for c in manifest["checkpoints"]]
    task = manifest["config"]["task_args"]
    print(f"{len(steps)} checkpoints (steps {steps[0]} to {steps[-1]}), sequences of {task['context']} tokens from "
          f"{task['path']}; next: llcfast estimate {args.run_dir} (one checkpoint, to check the settings), "
          f"then llcfast sweep {args.run_dir}")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare_runs, comparison_lines
    keys = args.settings[0] if args.settings and len(args.settings) == 1 else args.settings
    done = compare_runs(args.run_dirs, args.out, labels=args.labels, settings=keys, plateau=args.plateau)
    print("\n".join(comparison_lines(done["summary"])))
    print(f"comparison: {os.path.abspath(done['paths']['png'])}")
    return 0


def _parse_samplers(specs, option: str = "--samplers"):
    """'rmsprop_sgld:alpha=0.9999,rms_eps=0.1' -> ("rmsprop_sgld", {...})."""
    if not specs:
        return None
    out = []
    for spec in specs:
        name, _, rest = spec.partition(":")
        kwargs = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            try:
                kwargs[key.strip()] = float(value)
            except ValueError:
                eq = ""
            if not eq:
                raise ValueError(f"{option} {spec!r}: expected NAME or NAME:KEY=NUMBER[,KEY=NUMBER...], "
                                 f"got {item!r}")
        out.append((name, kwargs))
    return out


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate_run
    result = calibrate_run(args.run_dir, step=args.step, epsilons=args.epsilons, gammas=args.gammas,
                           nbetas=args.nbetas, samplers=_parse_samplers(args.samplers), num_chains=args.chains,
                           num_draws=args.draws,
                           device=args.device and _device(args.device), out=args.out, progress=not args.quiet)
    print(result.describe())
    return 0


def add_commands(sub) -> None:
    from .presets import PRESETS
    p = sub.add_parser("demo", help="the whole pipeline on a small model it trains itself", formatter_class=F,
                       epilog=DEMO_EPILOG, description="Train a small in-context regression transformer (or, "
                       "with --language, a small attention-only language model), sweep the LLC, behavioural metrics "
                       "and Hessian statistics over its checkpoints, detect stages, write the report.")
    p.add_argument("--out", help="output directory (default: ./llcfast-demo, or ./llcfast-demo-language)")
    p.add_argument("--language", action="store_true",
                   help="the attention-only language model on a synthetic language (about 11 minutes on 2 CPU cores)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    p.add_argument("--full", action="store_true",
                   help="the paper-scale run (500k training steps, or 50k with --language: use a GPU)")
    p.add_argument("--no-hessian", dest="hessian", action="store_false", help="skip the Hessian statistics")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a model with checkpoints (resumable)", formatter_class=F,
                       epilog=TRAIN_EPILOG,
                       description="Train one of the presets' models (or a JSON config's) on its task, writing "
                                   "checkpoints at log-spaced and evenly spaced steps and a manifest.json into "
                                   "--out. A killed or interrupted run resumes from where it stopped when the "
                                   "same command is run again.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="a named run config (docs/pipeline.md lists them)")
    src.add_argument("--config", help="a JSON run config (may start from a preset)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, manifest.json)")
    p.add_argument("--steps", type=_positive(int), help="override the number of training steps")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="LLC (and Hessian statistics) at every checkpoint of a run", formatter_class=F,
                       epilog=SWEEP_EPILOG)
    p.add_argument("run_dir", help="a run folder (from llcfast train or llcfast import)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if visible")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    _sweep_overrides(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("import", help="make a folder of Hugging Face checkpoints trained elsewhere a run",
                       formatter_class=F, epilog=IMPORT_EPILOG,
                       description="Write RUN_DIR/manifest.json for its Hugging Face causal-LM checkpoint folders "
                       "(checkpoint-N, stepN, ... each with a config.json) and the token file they were trained on, "
                       "so that sweep, estimate, calibrate, report and compare work on it.")
    p.add_argument("run_dir", help="a run folder (from llcfast train or llcfast import)")
    p.add_argument("--tokens", required=True, help="token ids: a .npy file, or a raw .bin (see --dtype)")
    p.add_argument("--dtype", default="uint16", help="the .bin file's integer type (default uint16, as nanoGPT)")
    p.add_argument("--context", type=_positive(int),
                   help="tokens per sequence (default: the model's positions, at most 1024)")
    d = p.add_argument_group("data the LLC sees (default: docs/paper.md's language model)")
    d.add_argument("--llc-sequences", type=_positive(int), help="the fixed set the chains draw batches from")
    d.add_argument("--llc-batch-size", type=_positive(int), help="sequences per SGLD step")
    d.add_argument("--eval-sequences", type=_positive(int), help="held-out sequences for the test loss")
    _llc_overrides(p, engine=False)
    _hessian_switch(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("estimate", help="the LLC of one checkpoint, with its checks and loss traces",
                       formatter_class=F, epilog=ESTIMATE_EPILOG)
    p.add_argument("run_dir", help="a run folder (from llcfast train or llcfast import)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the last)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if visible")
    p.add_argument("--out", help="output directory (default: RUN_DIR/estimates)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    _hessian_switch(p)
    _llc_overrides(p)
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("landscape", help="the loss between two checkpoints (or two runs), and ablations",
                       formatter_class=F, epilog=LANDSCAPE_EPILOG)
    p.add_argument("run_dir", help="a run folder (from llcfast train or llcfast import)")
    p.add_argument("--step", type=int, help="the checkpoint to start from (default: the last)")
    p.add_argument("--to", metavar="RUN_DIR", help="another run to end in, such as a second seed (default: the same)")
    p.add_argument("--to-step", type=int, help="the checkpoint to end in (default with --to: that run's last)")
    p.add_argument("--align", choices=["none", "weights", "activations"], default="none",
                   help="permute the far end's heads, MLP units and residual stream to match the near one first "
                        "(default: none; two seeds want weights or activations)")
    p.add_argument("--points", type=_positive(int), default=33, help="points on the path (default 33)")
    p.add_argument("--bezier", action="store_true", help="a quadratic Bezier path with a trained midpoint")
    p.add_argument("--ablate", action="store_true", help="also the loss with each block removed or swapped")
    p.add_argument("--heads", action="store_true", help="with --ablate, each attention head silenced too")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if visible")
    p.add_argument("--out", help="output directory (default: RUN_DIR/landscape)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_landscape)

    p = sub.add_parser("report", help="detect stages and draw the report of a sweep", formatter_class=F,
                       epilog=REPORT_EPILOG)
    p.add_argument("run_dir", help="a run folder (from llcfast train or llcfast import)")
    p.add_argument("--out", help="directory for the report (default: the run directory)")
    p.add_argument("--settings", help="which sweep to report when results.jsonl holds several (the key in its "
                                      "'settings' column; default: the latest sweep)")
    p.add_argument("--plateau", type=float, default=0.2,
                   help="a dip of |slope| to this fraction of its neighbouring peaks is a boundary (default 0.2)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="several runs' sweeps side by side (seeds, settings)", formatter_class=F,
                       epilog=COMPARE_EPILOG)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="two or more run folders")
    p.add_argument("--out", default="llcfast-compare", help="directory for the comparison (default: ./llcfast-compare)")
    p.add_argument("--labels", nargs="+", help="one name per run (default: the run directories' names)")
    p.add_argument("--settings", nargs="+", metavar="KEY",
                   help="the sweep with this settings key in every run, or one key per run, e.g. a run twice with "
                        "two keys (default: each run's latest)")
    p.add_argument("--plateau", type=float, default=0.2,
                   help="a dip of |slope| to this fraction of its neighbouring peaks is a boundary (default 0.2)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("calibrate", help="choose epsilon, gamma (and nbeta) on one checkpoint", formatter_class=F,
                       epilog=CALIBRATE_EPILOG)
    p.add_argument("run_dir", help="a run folder (from llcfast train or llcfast import)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the last)")
    p.add_argument("--epsilons", type=_positive(float), nargs="+",
                   help="step sizes to try (default: the run's sweep.epsilon times 0.1, 0.3, 1, 3 and 10)")
    p.add_argument("--gammas", type=_positive(float), nargs="+",
                   help="localisation strengths to try (default: the run's sweep.gamma times 0.1, 1 and 10)")
    p.add_argument("--nbetas", type=_positive(float), nargs="+",
                   help="inverse temperatures to try (default: the run's sweep.nbeta only)")
    p.add_argument("--samplers", nargs="+", metavar="SAMPLER[:KEY=VALUE,...]",
                   help="samplers to compare, each with optional hyperparameters, e.g. sgld "
                        "rmsprop_sgld:alpha=0.9999 sgnht:diffusion=0.01 (default: sgld)")
    p.add_argument("--chains", type=_positive(int), help="chains per setting (default: the run's)")
    p.add_argument("--draws", type=_positive(int), help="draws per chain (default: the run's)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if visible")
    p.add_argument("--out", help="output directory (default: RUN_DIR/calibration)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    p.set_defaults(func=cmd_calibrate)
