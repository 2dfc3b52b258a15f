"""The llcfast command line: the pipeline (demo, train, sweep, estimate,
report, compare, calibrate), `llcfast info`, which says what this installation runs,
and `llcfast bench`, the benchmark suite of a source checkout."""
from __future__ import annotations

import argparse
import json
import sys
import warnings

EPILOG = """examples:
  llcfast demo            train a small model, sweep its LLC, detect stages, write ./llcfast-demo/report.png
  llcfast train --preset demo --out runs/demo && llcfast sweep runs/demo && llcfast report runs/demo
  llcfast estimate runs/demo --step 1000    one checkpoint's LLC, its checks and loss traces
  llcfast compare runs/seed0 runs/seed1     several runs' LLC curves and stages side by side
  llcfast info            what was built: CPU/CUDA kernels, archs, torch and CUDA versions
  llcfast bench --quick   a smoke run of the benchmark suite (from a source checkout)
  llcfast COMMAND --help  each command's options and examples
"""


# What each command can lower from the command line, after a message that
# names the Python API's settings.
_SWEEP_HINT = ("--precision bf16 (half the activations), or --no-hessian where the Hessian statistics ran out; "
               "the batch sizes are the run config's sweep.llc_batch_size and sweep.hessian_batch, which "
               "llcfast.pipeline.sweep(run_dir, settings=...) can lower")
MEMORY_HINTS = {
    "sweep": "\n  from this command: " + _SWEEP_HINT,
    "calibrate": "\n  from this command: fewer --chains, or a smaller sweep.llc_batch_size in the run's config",
    "demo": "\n  from this command: --no-hessian, or --device cpu",
}


INTERRUPTED = {None: "rerun the same command to resume",
               "estimate": "no draw was finished yet, so there is no estimate to keep"}


def _info(args) -> int:
    from . import build_info
    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    yes = lambda b: "yes" if b else "no"
    print("llcfast build")
    print(f"  compiled extension : {yes(info['extension_loaded'])}"
          + ("" if info["extension_loaded"] else f"  ({info['extension_error']})"))
    print(f"  CPU kernels        : {yes(info['cpu_kernels'])}")
    archs = info["cuda_archs"] or "-"
    print(f"  CUDA kernels       : {yes(info['cuda_kernels'])}  (archs: {archs})"
          + (f"; {info['cuda_build_choice']}" if info.get("cuda_build_choice") else ""))
    print(f"  built with         : torch {info['built_with_torch'] or '-'}, CUDA {info['built_with_cuda'] or '-'}, "
          f"{info['compiler'] or '-'}")
    print(f"  running on         : torch {info['torch']} (CUDA {info['torch_cuda'] or '-'}), "
          f"Python {info['python']}")
    print(f"  GPUs               : {', '.join(info['gpus']) if info['gpus'] else 'none visible'}")
    if not info["extension_loaded"]:
        from ._ext import BUILD_HINT
        print(f"  -> running on the pure-torch reference; {BUILD_HINT}")
    elif info["gpus"] and not info["cuda_kernels"]:
        print("  -> GPUs are visible but this build has no CUDA kernels; rebuild with LLCFAST_CUDA=1")
    return 0


def _bench(argv) -> int:
    """``python -m benchmarks`` of the source checkout this package runs
    from, with the same arguments (they are the suite's: --quick, --only,
    --device, --help)."""
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "benchmarks", "__main__.py")):
        raise FileNotFoundError(f"the benchmark suite is the benchmarks/ folder of a source checkout, and {root} "
                                "has none; install llcfast from a checkout (pip install --no-build-isolation -e .) "
                                "to run it")
    # The folder's path, not `-m benchmarks`: a benchmarks/ in the caller's working directory must not be run.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    return subprocess.call([sys.executable, os.path.join(root, "benchmarks"), *argv], env=env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llcfast", description="Fast local learning coefficient estimation.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one-line message")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from .pipeline.commands import add_commands
    add_commands(sub)
    sub.add_parser("bench", help="the benchmark suite (python -m benchmarks; its options: llcfast bench --help)",
                   add_help=False)
    info = sub.add_parser("info", help="show what was built and what this machine runs",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog="examples:\n  llcfast info\n  llcfast info --json")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=_info)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the suite parses its own options
        try:
            return _bench(argv[1:])
        except FileNotFoundError as exc:
            print(f"llcfast bench: error: {exc}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    shown = warnings.formatwarning
    warnings.formatwarning = _command_line_warning
    try:
        return args.func(args)
    except Exception:
        if args.debug:
            raise
        return _one_line(args.command)
    except KeyboardInterrupt:
        print(f"llcfast {args.command}: interrupted; {INTERRUPTED.get(args.command, INTERRUPTED[None])}",
              file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = shown


def _one_line(command: str) -> int:
    """The error being handled, said in one line with the exit status it
    deserves; an error of llcfast's own code (a bug) keeps its traceback."""
    from .pipeline.safety import RunLocked
    try:
        raise
    except RunLocked as exc:
        print(f"llcfast {command}: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError) as exc:  # bad input: say what, not where in our code
        print(f"llcfast {command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused (not a directory, no permission, disk full)
        print(f"llcfast {command}: error: {exc}; choose a path you can write to (or free space), then rerun: "
              "what was finished is kept", file=sys.stderr)
        return 1
    except (MemoryError, FloatingPointError) as exc:  # the run cannot go on as set up: which setting to change
        hint = MEMORY_HINTS.get(command, "") if isinstance(exc, MemoryError) else ""
        print(f"llcfast {command}: error: {exc}{hint}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        import torch

        from .engine.common import first_line
        if not isinstance(exc, torch.OutOfMemoryError):
            raise
        print(f"llcfast {command}: error: out of device memory ({first_line(exc, 'out of memory')})"
              f"{MEMORY_HINTS.get(command, '')}", file=sys.stderr)
        return 1


def _command_line_warning(message, category, filename, lineno, line=None) -> str:
    # From the command line the message is what matters; where in llcfast it was raised is not.
    return f"llcfast: {category.__name__}: {message}\n"


if __name__ == "__main__":
    sys.exit(main())
