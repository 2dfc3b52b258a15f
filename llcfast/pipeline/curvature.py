"""Where the curvature statistics' own stage boundaries lie against the
LLC's. The paper finds boundaries in the LLC that the Hessian trace and top
eigenvalue miss; here each statistic's curve gets the same stage fit as the
LLC (stages.detect_stages), and each LLC boundary is listed with the nearest
boundary of each statistic and how far apart they are, as a ratio of
step + 1 (the axis the fits work on). No verdict is drawn: a plateau's
boundary sits where its slope is least, which moves along a long plateau,
so how near counts as the same boundary is for the reader to judge with the
plot."""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Sequence

from .stages import StageFit, detect_stages

# statistic -> the record key of its standard error (None: it has none)
STATISTICS = {"hessian_trace": "hessian_trace_se", "hessian_top_eig": None}
LABELS = {"hessian_trace": "Hessian trace", "hessian_top_eig": "top eigenvalue"}


def curvature_fits(records: Sequence[dict], **stage_kwargs) -> Dict[str, StageFit]:
    """The stage fit of each curvature statistic the records hold (at three
    checkpoints or more)."""
    fits = {}
    for key, se_key in STATISTICS.items():
        points = [(r["step"], r[key], r.get(se_key) if se_key else None) for r in records
                  if r.get(key) is not None]
        if len(points) < 3:
            continue
        steps, values, errors = zip(*points)
        if se_key is None or any(e is None for e in errors):
            errors = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # points dropped as non-finite are counted in the fit
            fits[key] = detect_stages(steps, values, errors, **stage_kwargs)
    return fits


def boundary_matches(llc_fit: StageFit, fits: Dict[str, StageFit]) -> List[dict]:
    """Per LLC boundary b: {"step": b, statistic: {"nearest": c, "ratio":
    (c + 1) / (b + 1)}, or None where the statistic's fit has no boundary}."""
    rows = []
    for b in llc_fit.boundaries:
        row = {"step": b}
        for key, fit in fits.items():
            near = min(fit.boundaries, key=lambda c: abs(math.log((c + 1) / (b + 1))), default=None)
            row[key] = None if near is None else {"nearest": near, "ratio": (near + 1) / (b + 1)}
        rows.append(row)
    return rows


def match_table(rows: List[dict], fits: Dict[str, StageFit]) -> List[str]:
    """The rows as text, one LLC boundary a line."""
    if not fits:
        return []
    keys = list(fits)
    lines = [f"{'LLC boundary':>12} " + " ".join(f"{'nearest ' + LABELS[k] + ' boundary':>32}" for k in keys)]
    for row in rows:
        cells = [f"{'none':>32}" if row[k] is None else
                 f"{format(row[k]['nearest'], '.0f') + ' (x' + format(row[k]['ratio'], '.2g') + ')':>32}"
                 for k in keys]
        lines.append(f"{row['step']:>12.0f} " + " ".join(cells))
    lines.append("(x: the ratio of step + 1 between the two; each statistic's own stage fit, as the LLC's)")
    return lines
