"""Markdown tables from the benchmark JSON in benchmarks/results/, and the
result blocks of docs/performance.md rewritten from them.

    python benchmarks/tables.py                    # print every table
    python benchmarks/tables.py --readme docs/performance.md # rewrite its <!-- results:KIND --> blocks

For each benchmark and device the newest date's reports are used (smoke
runs, marked "quick", never). Reports of one day on one device are merged: a figure
measured in several of them (repeats) is shown as its range, lo-hi.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from typing import Callable, Dict, List, Sequence, Tuple

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _num(fmt: str) -> Callable[[float], str]:
    return lambda v: format(v, fmt)


def _sci(v: float) -> str:  # 100001 -> "1e5", 53057 -> "5.3e4"
    mantissa, exponent = f"{v:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def _times(v: float) -> str:
    return f"{v:.1f}x"


def _plain(v) -> str:
    return str(v)


# (header, field, format); a field missing from every report leaves its column out.
Column = Tuple[str, str, Callable]

COLUMNS: Dict[str, List[Column]] = {
    "sgld_step": [("params per chain", "params_per_chain", _sci), ("chains", "chains", _plain),
                  ("tensors", "tensors", _plain), ("fused step (ms)", "fused_ms", _num(".3g")),
                  ("GB/s", "fused_GBps", _num(".0f")), ("of copy", "fused_fraction_of_copy", _pct),
                  ("reference (ms)", "reference_ms", _num(".3g")),
                  ("vs reference", "speedup_vs_reference", _times),
                  ("vs torch + randn", "speedup_vs_torch_randn", _times), ("note", "skipped", _plain)],
    "samplers": [("sampler", "sampler", _plain), ("params per chain", "params_per_chain", _sci),
                 ("chains", "chains", _plain), ("fused step (ms)", "fused_ms", _num(".3g")),
                 ("GB/s", "fused_GBps", _num(".0f")), ("of copy", "fraction_of_copy", _pct),
                 ("twin / fused", "twin_over_fused", _times), ("note", "skipped", _plain)],
    "llc": [("case", "case", _plain), ("params", "parameters", _sci)],  # + one column per run, below
    "hessian": [("case", "case", _plain), ("params", "params", _sci), ("probes", "probes", _plain),
                ("llcfast trace", "trace.llcfast", _plain), ("in (s)", "trace.llcfast_s", _num(".3g")),
                ("loop trace", "trace.loop", _plain), ("in (s)", "trace.loop_s", _num(".3g")),
                ("speed-up", "trace.speedup", _times),
                ("vs curvlinops", "trace.speedup_vs_curvlinops", _times),
                ("vs hessian-eigenthings", "trace.speedup_vs_eigenthings", _times),
                ("tf32 vs loop", "trace.precisions.tf32.speedup_vs_loop", _times),
                ("bf16 vs loop", "trace.precisions.bf16.speedup_vs_loop", _times),
                ("bf16 shift (SE)", "trace.precisions.bf16.shift_in_se", _num("+.2f")),
                ("forward-over-reverse vs loop", "trace.precisions.fp32+forward.speedup_vs_loop", _times),
                ("fp32+compile vs loop", "trace.precisions.fp32+compile.speedup_vs_loop", _times),
                ("bf16+compile vs loop", "trace.precisions.bf16+compile.speedup_vs_loop", _times),
                ("top eig HVPs: Lanczos", "top_eig.lanczos_hvps", _plain),
                ("power", "top_eig.power_hvps", _plain)],
    "large": [("model", "size", _plain), ("params", "parameters", _sci), ("chains", "chains", _plain),
              ("draws", "draws", _plain), ("batch", "batch", _plain), ("precision", "precision", _plain),
              ("checkpointing", "checkpointing", _plain), ("activation", "activation", _plain),
              ("attention fold", "attention_fold", _plain), ("layer-norm fold", "layer_norm_fold", _plain),
              ("linear fold", "linear_fold", _plain), ("head fusion", "head_fusion", _plain),
              ("bf16 copies", "bf16_copies", _plain), ("loss", "loss", _plain),
              ("wall (s)", "wall_s", _num(".1f")), ("ms per chain-step", "ms_per_chain_step", _num(".1f")),
              ("peak memory (GiB)", "peak_memory_GiB", _num(".1f")),
              ("MFU (of measured bf16)", "mfu_vs_measured_bf16", _pct),
              ("vs devinterp", "speedup_vs_devinterp", _times), ("devinterp", "devinterp_error", _plain)],
    "traffic": [("case", "case", _plain), ("precision", "precision", _plain), ("pass", "pass", _plain),
                ("attention", "attention", _plain), ("loss", "loss", _plain), ("kernels", "kernels", _plain),
                ("matmul GFLOP", "matmul_GFLOP", _num(".0f")), ("matmul GB", "matmul_GB", _num(".2f")),
                ("other GB", "other_GB", _num(".2f")),
                ("floor (ms per chain-step)", "floor_ms_per_chain_step", _num(".3f"))],
    "traffic_large": [("model", "case", _plain), ("activation", "activation", _plain),
                      ("chains a pass", "chains", _plain), ("batch", "batch", _plain), ("kernels", "kernels", _plain),
                      ("matmul GB", "matmul_GB", _num(".1f")), ("other GB", "other_GB", _num(".1f")),
                      ("floor (ms per chain-step)", "floor_ms_per_chain_step", _num(".1f")),
                      ("MFU at the floor (of 790 TFLOP/s)", "mfu_at_floor", _pct),
                      ("saved for the backward (GB a chain)", "saved_GB_per_chain", _num(".2f"))],
    "traffic_hessian": [("case", "case", _plain), ("precision", "precision", _plain), ("pass", "pass", _plain),
                        ("llcfast HVPs", "hvp_mode", _plain),
                        ("GB per probe", "probe_GB", _num(".2f")), ("GFLOP per probe", "probe_GFLOP", _num(".1f")),
                        ("floor per probe (ms)", "probe_floor_ms", _num(".3f")),
                        ("pass shares (ms)", "shared_floor_ms", _num(".3f")),
                        ("loop: GB per HVP", "loop_GB", _num(".2f")), ("floor (ms)", "loop_floor_ms", _num(".3f")),
                        ("HVP/s at most, 100 a pass", "max_hvps_per_s", _num(".0f")),
                        ("loop's", "loop_max_hvps_per_s", _num(".0f"))],
}
# Device figures a report measures for itself, named in the table's heading.
MEASURED = [("copy bandwidth", "copy_bandwidth_GBps", lambda v: f"{v:.0f} GB/s"),
            ("bf16 matmul rate", "bf16_matmul_tflops", lambda v: f"{v:.0f} TFLOP/s")]
KEYS = {"sgld_step": ("params_per_chain", "chains", "tensors"), "samplers": ("sampler", "params_per_chain", "chains"),
        "llc": ("case",), "hessian": ("case",),
        "large": ("size", "batch", "precision", "checkpointing", "activation", "attention_fold", "layer_norm_fold",
                  "linear_fold", "head_fusion", "bf16_copies", "loss"),
        "traffic": ("case", "precision", "pass", "attention", "loss"),
        "traffic_large": ("case", "activation", "chains", "batch"),
        "traffic_hessian": ("case", "precision", "pass", "hvp_mode")}
ROW_LISTS = {"sgld_step": "rows", "samplers": "rows", "llc": "cases", "hessian": "cases", "large": "rows",
             "traffic": "rows", "traffic_large": "rows", "traffic_hessian": "rows"}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _llc_columns(cases: Sequence[dict]) -> List[Column]:
    """One ms-per-chain-step column per run, in the order the runs appear,
    then the fastest llcfast run against devinterp and the agreement checks."""
    runs: List[str] = []
    for case in cases:
        runs += [run for run in case.get("runs", {}) if run not in runs]
    cols = [("chains", "chains", _plain), ("fp32 passes", "runs.llcfast-fp32.backend", _passes)]
    cols += [(f"{run.replace('llcfast-', '')} (ms)", f"runs.{run}.ms_per_chain_step", _num(".3g")) for run in runs]
    return cols + [("fastest vs devinterp", "fastest_vs_devinterp", _times),
                   ("fp32 of matmul peak", "runs.llcfast-fp32.peak_fraction", _pct),
                   ("bf16 - fp32 (SE)", "bf16_shift_in_se", _num("+.2f")),
                   ("z vs devinterp, same steps", "same_steps_as_devinterp.z", _num("+.2f")),
                   ("note", "devinterp_error", _plain)]


def _passes(backend: str) -> str:
    return {"fast": "stacked", "fast-sequential": "chain by chain"}.get(backend, str(backend))


def _llc_derived(row: dict) -> dict:
    speedups = [v for k, v in row.items() if k.startswith("runs.llcfast-") and k.endswith(".speedup_vs_devinterp")
                and "reference" not in k]
    if speedups:
        row["fastest_vs_devinterp"] = max(speedups)
    se = row.get("bf16_vs_fp32.fp32_standard_error")
    if se:
        row["bf16_shift_in_se"] = row["bf16_vs_fp32.difference"] / se
    return row


def _hessian_derived(row: dict) -> dict:
    for side in ("llcfast", "loop"):
        if row.get(f"trace.{side}_estimate") is not None:
            row[f"trace.{side}"] = f"{row[f'trace.{side}_estimate']:.4g} ± {row[f'trace.{side}_se']:.2g}"
    return row


DERIVED = {"llc": _llc_derived, "hessian": _hessian_derived}


def load(folder: str = RESULTS) -> Dict[str, List[Tuple[str, dict]]]:
    """{kind: [(path, report)]} for every full (not quick) report."""
    found: Dict[str, List[Tuple[str, dict]]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        kind = next((k for k in sorted(COLUMNS, key=len, reverse=True)
                     if os.path.basename(path).startswith(k + "_")), None)
        if kind is None:
            continue
        with open(path) as f:
            report = json.load(f)
        if not report.get("quick"):
            found.setdefault(kind, []).append((path, report))
    return found


def render(kind: str, reports: Sequence[Tuple[str, dict]]) -> str:
    """One table per device for one benchmark, from that device's newest
    date (a new GPU run does not hide the last CPU run)."""
    if kind not in COLUMNS:
        raise ValueError(f"unknown benchmark {kind!r}; known: {sorted(COLUMNS)}")
    newest: Dict[str, str] = {}
    for _, r in reports:
        newest[r["device"]] = max(newest.get(r["device"], ""), str(r["date"])[:10])
    groups: Dict[str, List[Tuple[str, dict]]] = {}
    for path, r in reports:
        if str(r["date"])[:10] == newest[r["device"]]:
            groups.setdefault(r["device"], []).append((path, r))
    # GPUs first: the prose around each table speaks of them first; CPU reports
    # name their threads (results_io.device_name).
    order = sorted(groups.items(), key=lambda kv: (kv[0] == "cpu" or kv[0].endswith(" threads"), kv[0]))
    return "\n\n".join(_table(kind, device, newest[device], group) for device, group in order)


def _table(kind, device, date, group) -> str:
    merged: Dict[tuple, List[dict]] = {}
    raw = [row for _, report in group for row in report[ROW_LISTS[kind]]]
    for _, report in group:
        for row in report[ROW_LISTS[kind]]:
            flat = DERIVED.get(kind, lambda r: r)(flatten(row))
            merged.setdefault(tuple(flat.get(k) for k in KEYS[kind]), []).append(flat)
    rows = list(merged.values())
    columns = COLUMNS[kind] + (_llc_columns(raw) if kind == "llc" else [])
    columns = [c for c in columns if any(r.get(c[1]) is not None for rs in rows for r in rs)]
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + " --- |" * len(columns)]
    for repeats in rows:
        lines.append("| " + " | ".join(_cell([r.get(field) for r in repeats], fmt) for _, field, fmt in columns) + " |")
    versions = sorted({f"torch {r['torch']}" for _, r in group})
    measured = [(label, _cell([r.get(field) for _, r in group], fmt)) for label, field, fmt in MEASURED]
    files = ", ".join(os.path.basename(p) for p, _ in group)
    return (f"{device}, {', '.join(versions)}, {date}" + "".join(f"; {label} {v}" for label, v in measured if v)
            + f" ({files}):\n\n" + "\n".join(lines))


def _cell(values, fmt) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return fmt(values[0])
    lo, hi = fmt(min(values)), fmt(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


def update_readme(text: str, tables: Dict[str, str]) -> str:
    """Replaces each <!-- results:KIND --> ... <!-- /results:KIND --> block
    whose KIND has a table; other text is left as it is."""
    for kind, table in tables.items():
        start, end = f"<!-- results:{kind} -->", f"<!-- /results:{kind} -->"
        if start not in text:
            continue
        if text.count(start) != 1 or text.count(end) != 1 or text.index(end) < text.index(start):
            raise ValueError(f"the page must hold exactly one {start} ... {end} block, in that order")
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{table}\n{end}", text,
                      flags=re.S)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=RESULTS, help="folder of benchmark JSON")
    p.add_argument("--readme", default=None, help="rewrite this file's result blocks instead of printing")
    args = p.parse_args(argv)
    tables = {kind: render(kind, reports) for kind, reports in load(args.results).items()}
    if args.readme is None:
        for kind, table in tables.items():
            print(f"## {kind}\n\n{table}\n")
        return 0
    with open(args.readme) as f:
        text = f.read()
    new = update_readme(text, tables)
    if new != text:
        with open(args.readme, "w") as f:
            f.write(new)
    print(f"{args.readme}: {'updated' if new != text else 'already up to date'} "
          f"({', '.join(sorted(tables)) or 'no results'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
