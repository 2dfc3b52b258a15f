"""Where benchmark reports go: one JSON per run under benchmarks/results/,
named by benchmark, device and date unless the caller names the file."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
from typing import Optional

import torch


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the threads torch uses: what a
    reader needs to compare a report with another."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def file_tag(device: str) -> str:
    """A device name as part of a file name: "NVIDIA H100 80GB HBM3" ->
    "NVIDIA_H100_80GB_HBM3", "AMD EPYC, 2 threads" -> "AMD_EPYC_2_threads"."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", str(device)).strip("_")


def report_header(benchmark: str, device: torch.device) -> dict:
    """What every report starts with: which benchmark, on what, when, under
    which torch and Python."""
    return {"benchmark": benchmark, "device": device_name(device),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": platform.python_version()}


def save_report(report: dict, out: Optional[str], stem: str) -> str:
    """Writes ``report`` to ``out`` or to results/<stem>_<device>_<date>.json;
    returns the path."""
    if out is None:
        out = os.path.join(os.path.dirname(__file__), "results",
                           f"{stem}_{file_tag(report['device'])}_{str(report['date'])[:10]}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print("wrote", out)
    return out
