"""Where benchmark reports go: one JSON per run under benchmarks/results/,
named by benchmark, device and date unless the caller names the file."""
from __future__ import annotations

import json
import os
from typing import Optional


def save_report(report: dict, out: Optional[str], stem: str) -> str:
    """Writes ``report`` to ``out`` or to results/<stem>_<device>_<date>.json;
    returns the path."""
    if out is None:
        device = str(report["device"]).replace(" ", "_")
        out = os.path.join(os.path.dirname(__file__), "results", f"{stem}_{device}_{str(report['date'])[:10]}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print("wrote", out)
    return out
