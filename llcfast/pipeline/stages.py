"""Stage detection (docs/paper.md, the authors' procedure): a Gaussian process
fitted to the LLC against log(step + 1), its mean's slope, and stage
boundaries where that slope crosses zero or comes near it.

The GP has a constant-times-RBF kernel plus white noise (plus each point's
own error variance when given); its hyperparameters maximise the marginal
likelihood from several starts, the first with length scale 3 on the
log(step + 1) axis as the authors start. Boundaries: every zero crossing
of the slope; every dip of |slope| to at most ``plateau`` x the smaller of
its neighbouring peaks (the LLC nearly stops between two developments); and
where a plateau at either end of the curve begins or ends (|slope| below
``plateau`` x the nearest peak). Stages between boundaries are type A where
the LLC rises, B where it
falls; interior stages that change the LLC by less than twice the fitted
noise are merged into a neighbour.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import List

import numpy as np
from scipy.linalg import cho_factor, cho_solve
from scipy.optimize import minimize


@dataclass
class Stage:
    index: int
    start: float  # training step
    end: float
    kind: str  # "A": the LLC rises, "B": it falls
    llc_start: float  # the fitted LLC at the start and the end
    llc_end: float

    @property
    def delta(self) -> float:
        return self.llc_end - self.llc_start

    @property
    def number(self) -> int:
        """The stage's number as reports print it: 1 for the first."""
        return self.index + 1

    def to_dict(self) -> dict:
        return {"stage": self.number, "start": self.start, "end": self.end, "kind": self.kind,
                "llc_start": self.llc_start, "llc_end": self.llc_end, "delta": self.delta}


@dataclass
class StageFit:
    stages: List[Stage]
    boundaries: List[float]  # training steps
    grid_steps: np.ndarray  # the fit, on a dense grid of steps
    mean: np.ndarray
    std: np.ndarray  # the GP's posterior standard deviation of the mean curve
    slope: np.ndarray  # d mean / d log(step + 1)
    length_scale: float  # fitted, in log(step + 1) units
    noise: float  # fitted white-noise standard deviation, in LLC units
    flat: bool  # True when the fit found no change beyond its own noise
    dropped: int = 0  # points left out for being NaN or infinite
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"stages": [s.to_dict() for s in self.stages], "boundaries": self.boundaries,
                "length_scale": self.length_scale, "noise": self.noise, "flat": self.flat, "dropped": self.dropped,
                "params": self.params}


def _rbf(a: np.ndarray, b: np.ndarray, scale: float, length: float) -> np.ndarray:
    return scale * np.exp(-0.5 * ((a[:, None] - b[None, :]) / length) ** 2)


class _GP:
    def __init__(self, x: np.ndarray, y: np.ndarray, err_var: np.ndarray):
        self.x, self.y, self.err_var = x, y, err_var
        # An RBF much narrower than the spacing of the points is white noise in
        # disguise, and its mean then threads every point; keep it wider.
        gaps = np.diff(np.unique(x))
        shortest = max(0.05, 2.0 * float(np.median(gaps))) if gaps.size else 0.05
        self.BOUNDS = [(math.log(1e-3), math.log(1e3)),  # signal variance (y standardised)
                       (math.log(shortest), math.log(max(100.0, 2 * shortest))),  # length, log(step+1) units
                       (math.log(1e-4), math.log(10.0))]  # noise standard deviation

    def _neg_log_likelihood(self, theta: np.ndarray) -> float:
        scale, length, noise = np.exp(theta)
        k = _rbf(self.x, self.x, scale, length) + np.diag(noise ** 2 + self.err_var + 1e-10)
        try:
            c = cho_factor(k, lower=True)
        except np.linalg.LinAlgError:
            return 1e25
        alpha = cho_solve(c, self.y)
        return 0.5 * float(self.y @ alpha) + float(np.log(np.diag(c[0])).sum())

    def fit(self, length_scale: float, restarts: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        starts = [np.array([0.0, math.log(length_scale), math.log(0.1)])]
        for _ in range(restarts):
            starts.append(np.array([rng.uniform(lo, hi) for lo, hi in self.BOUNDS]))
        best = None
        for theta0 in starts:
            theta0 = np.clip(theta0, [b[0] for b in self.BOUNDS], [b[1] for b in self.BOUNDS])
            res = minimize(self._neg_log_likelihood, theta0, method="L-BFGS-B", bounds=self.BOUNDS)
            if best is None or res.fun < best.fun:
                best = res
        self.theta = best.x
        scale, length, noise = np.exp(best.x)
        k = _rbf(self.x, self.x, scale, length) + np.diag(noise ** 2 + self.err_var + 1e-10)
        self._chol = cho_factor(k, lower=True)
        self._alpha = cho_solve(self._chol, self.y)
        return best.x

    def predict(self, xs: np.ndarray):
        scale, length, _ = np.exp(self.theta)
        ks = _rbf(xs, self.x, scale, length)
        mean = ks @ self._alpha
        slope = (ks * (-(xs[:, None] - self.x[None, :]) / length ** 2)) @ self._alpha
        var = scale - np.einsum("ij,ji->i", ks, cho_solve(self._chol, ks.T))
        return mean, slope, np.sqrt(np.maximum(var, 0.0))


def _check_inputs(steps, values, errors):
    steps = np.asarray(steps, dtype=np.float64).reshape(-1)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if steps.size != values.size:
        raise ValueError(f"steps and values must have the same length, got {steps.size} and {values.size}")
    if errors is not None:
        errors = np.asarray(errors, dtype=np.float64).reshape(-1)
        if errors.size != values.size:
            raise ValueError(f"errors must have one entry per value ({values.size}), got {errors.size}")
    if steps.size == 0:
        raise ValueError("steps and values are empty; pass at least one (step, value) pair")
    ok = np.isfinite(steps) & np.isfinite(values) & (errors is None or np.isfinite(errors))
    if np.any(steps[np.isfinite(steps)] < 0):
        raise ValueError(f"steps must be >= 0, got {steps[steps < 0][:3].tolist()}")
    dropped = int((~ok).sum())
    if dropped:
        warnings.warn(f"detect_stages: {dropped} of {steps.size} points are NaN or infinite and were left out",
                      RuntimeWarning, stacklevel=3)
    order = np.argsort(steps[ok], kind="stable")
    errors = None if errors is None else errors[ok][order]
    return steps[ok][order], values[ok][order], errors, dropped


def detect_stages(steps, values, errors=None, *, length_scale: float = 3.0, plateau: float = 0.2,
                  restarts: int = 4, grid: int = 500, seed: int = 0) -> StageFit:
    """Developmental stages from an LLC curve (docs/paper.md's procedure).

    steps, values: the checkpoints' training steps and LLC estimates (any
        order; NaN/Inf points are dropped with a warning).
    errors: optional standard errors of the values (e.g. llc_std /
        sqrt(chains)), added to the GP's noise point by point.
    length_scale: the GP length scale's starting value, log(step + 1) units.
    plateau: a dip of |slope| to at most ``plateau`` x its neighbouring peaks
        (or a zero crossing) is a boundary.
    restarts: extra random starts of the hyperparameter fit.
    """
    if not 0 <= plateau < 1:
        raise ValueError(f"plateau must be in [0, 1), got {plateau}")
    if not (isinstance(length_scale, (int, float)) and length_scale > 0):
        raise ValueError(f"length_scale must be > 0, got {length_scale!r}")
    if not (isinstance(grid, int) and grid >= 10):
        raise ValueError(f"grid must be an int >= 10, got {grid!r}")
    steps, values, errors, dropped = _check_inputs(steps, values, errors)
    params = {"length_scale_start": length_scale, "plateau": plateau, "restarts": restarts}
    if steps.size == 0:
        raise ValueError("no finite (step, value) pairs are left after dropping NaN/Inf")
    x = np.log(steps + 1.0)
    lo_x, hi_x = float(x.min()), float(x.max())
    center, spread = float(values.mean()), float(values.std())
    if steps.size < 3 or spread == 0.0 or hi_x == lo_x:
        return _single_stage(steps, values, dropped, params)
    y = (values - center) / spread
    err_var = np.zeros_like(y) if errors is None else (errors / spread) ** 2
    gp = _GP(x, y, err_var)
    theta = gp.fit(length_scale, restarts, seed)
    xs = np.linspace(lo_x, hi_x, grid)
    mean, slope, std = gp.predict(xs)
    noise = float(np.exp(theta[2]))
    mean, slope, std = center + spread * mean, spread * slope, spread * std
    noise_llc = spread * math.sqrt(noise ** 2 + float(err_var.mean()))
    grid_steps = np.exp(xs) - 1.0
    flat = float(mean.max() - mean.min()) < 2.0 * noise_llc
    boundaries = [] if flat else _boundaries(xs, slope, mean, plateau, 2.0 * noise_llc, x)
    edges = [lo_x] + boundaries + [hi_x]
    stages = []
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        ma, mb = float(np.interp(a, xs, mean)), float(np.interp(b, xs, mean))
        stages.append(Stage(i, float(np.exp(a) - 1), float(np.exp(b) - 1), "A" if mb >= ma else "B", ma, mb))
    return StageFit(stages, [float(np.exp(b) - 1) for b in boundaries], grid_steps, mean, std, slope,
                    float(np.exp(theta[1])), noise * spread, flat, dropped, params)


def _boundaries(xs: np.ndarray, slope: np.ndarray, mean: np.ndarray, plateau: float,
                min_change: float, points: np.ndarray) -> List[float]:
    """Boundaries on the grid: interior dips of |slope| (zero crossings, or
    minima at most ``plateau`` x the smaller of the two neighbouring peaks),
    and the inner edges of plateaus at either end (where |slope| stays below
    ``plateau`` x the nearest peak, over two of the ``points``, the
    checkpoints' positions, or more). Before the plateau edges are placed,
    stages that change the LLC by less than ``min_change`` are merged into a
    neighbour, so noise wiggles make no boundaries."""
    a = np.abs(slope)
    n = len(xs)
    sign = np.sign(slope)
    minima = [k for k in range(1, n - 1) if a[k] <= a[k - 1] and a[k] < a[k + 1]]
    minima += [k for k in range(n - 1) if sign[k] * sign[k + 1] < 0 and k not in minima]
    minima = sorted(set(minima))
    cuts = []  # grid positions (floats, for interpolated zero crossings)
    for i, k in enumerate(minima):
        lo = minima[i - 1] if i else 0
        hi = minima[i + 1] if i + 1 < len(minima) else n - 1
        left, right = a[lo:k + 1].max(), a[k:hi + 1].max()
        if k + 1 < n and sign[k] * sign[k + 1] < 0:
            cuts.append(k + slope[k] / (slope[k] - slope[k + 1]))
        elif a[k] <= plateau * min(left, right):
            cuts.append(float(k))

    def value(c: float) -> float:
        return float(np.interp(c, np.arange(n), mean))

    while cuts:  # merge the smallest stage (edge stages too) while its change is below the noise
        ends = [0.0] + cuts + [float(n - 1)]
        deltas = [abs(value(b) - value(c)) for c, b in zip(ends[:-1], ends[1:])]
        j = int(np.argmin(deltas))
        if deltas[j] >= min_change:
            break
        if j == 0:
            del cuts[0]
        elif j == len(cuts):
            del cuts[-1]
        else:
            del cuts[j - 1 if a[int(round(cuts[j - 1]))] >= a[int(round(cuts[j]))] else j]
    first = int(np.argmax(a[: int(cuts[0]) + 1])) if cuts else int(np.argmax(a))
    last = int(cuts[-1]) + int(np.argmax(a[int(cuts[-1]):])) if cuts else int(np.argmax(a))
    start_plateau = end_plateau = None
    # A plateau at an end holds two checkpoints or more: the GP's mean can
    # bend between the first two, and a slope passing through zero there
    # is no plateau anyone observed.
    flat_before = np.flatnonzero(a[: first + 1] <= plateau * a[first])
    if flat_before.size and flat_before[-1] > 0 and np.sum(points <= xs[flat_before[-1]]) >= 2:
        start_plateau = float(flat_before[-1])  # the initial plateau ends (nearest the first development)
    flat_after = np.flatnonzero(a[last:] <= plateau * a[last])
    if flat_after.size and last + flat_after[0] < n - 1 and np.sum(points >= xs[last + flat_after[0]]) >= 2:
        end_plateau = float(last + flat_after[0])  # the final plateau begins
    cuts = ([start_plateau] if start_plateau is not None else []) + cuts + \
        ([end_plateau] if end_plateau is not None else [])
    return [float(np.interp(c, np.arange(n), xs)) for c in cuts]


def _single_stage(steps, values, dropped, params) -> StageFit:
    lo, hi = float(steps.min()), float(steps.max())
    v0, v1 = float(values[0]), float(values[-1])
    grid = np.array([lo, hi])
    mean = np.array([v0, v1])
    stage = Stage(0, lo, hi, "A" if v1 >= v0 else "B", v0, v1)
    return StageFit([stage], [], grid, mean, np.zeros(2), np.zeros(2), math.nan, 0.0, True, dropped, params)
