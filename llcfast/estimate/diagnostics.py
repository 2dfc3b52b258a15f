"""Convergence diagnostics of per-chain traces: split R-hat and effective
sample size, in the rank-normalised form of Vehtari, Gelman, Simpson,
Carpenter & Bürkner (2021), which is what Stan and ArviZ report.

Traces are arrays [chains, draws]. NaN draws (a diverged chain's tail) must
be removed by the caller, by dropping that chain.
"""
from __future__ import annotations

import math

import numpy as np


def _as_traces(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"traces must be [chains, draws], got shape {x.shape}")
    if x.shape[1] < 4:
        raise ValueError(f"need at least 4 draws per chain for split diagnostics, got {x.shape[1]}")
    if not np.isfinite(x).all():
        raise ValueError("traces contain NaN or Inf; drop diverged chains first")
    return x


def _split(x: np.ndarray) -> np.ndarray:
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half:]], axis=0)


def _variances(x: np.ndarray):
    """Within-chain variance W and the pooled estimate var+ = (n-1)/n W + B/n,
    B = n * variance of the chain means."""
    n = x.shape[1]
    w = x.var(axis=1, ddof=1).mean()
    return w, (n - 1) / n * w + x.mean(axis=1).var(ddof=1)


def _rhat_plain(x: np.ndarray) -> float:
    """Gelman-Rubin potential scale reduction of already split chains."""
    w, var_plus = _variances(x)
    if w == 0.0:
        return 1.0 if var_plus == 0.0 else math.inf
    return float(math.sqrt(var_plus / w))


def _rank_normalise(x: np.ndarray) -> np.ndarray:
    from scipy.special import ndtri
    from scipy.stats import rankdata
    ranks = rankdata(x, method="average").reshape(x.shape)
    return ndtri((ranks - 0.375) / (x.size + 0.25))


def split_rhat(traces, rank_normalised: bool = True) -> float:
    """Split R-hat: ~1 when chains agree; > 1.01 says they have not mixed.
    Rank-normalised (default): max of the bulk and folded-tail values."""
    x = _split(_as_traces(traces))
    if not rank_normalised:
        return _rhat_plain(x)
    bulk = _rhat_plain(_rank_normalise(x))
    folded = np.abs(x - np.median(x))
    return float(max(bulk, _rhat_plain(_rank_normalise(folded))))


def _autocov(x: np.ndarray) -> np.ndarray:
    """Per-chain autocovariance at every lag (biased estimator, by FFT)."""
    n = x.shape[1]
    centred = x - x.mean(axis=1, keepdims=True)
    size = 1 << (2 * n - 1).bit_length()
    f = np.fft.rfft(centred, n=size, axis=1)
    return np.fft.irfft(f * np.conj(f), n=size, axis=1)[:, :n] / n


def ess(traces, rank_normalised: bool = True) -> float:
    """Effective sample size of the pooled draws (bulk ESS when rank-normalised),
    with Geyer's initial monotone sequence truncation."""
    x = _split(_as_traces(traces))
    if rank_normalised:
        x = _rank_normalise(x)
    m, n = x.shape
    acov = _autocov(x)
    w, var_plus = _variances(x)
    if w == 0.0:
        return float(m * n)
    rho = 1.0 - (w - acov.mean(axis=0)) / var_plus
    rho[0] = 1.0
    # Sums of adjacent pairs are positive and decreasing for a reversible
    # chain; stop at the first non-positive pair and enforce monotonicity.
    pairs = []
    for k in range(0, n - 1, 2):
        p = rho[k] + rho[k + 1]
        if p <= 0:
            break
        pairs.append(min(p, pairs[-1]) if pairs else p)
    tau = -1.0 + 2.0 * sum(pairs) if pairs else 1.0
    tau = max(tau, 1.0 / math.log10(m * n))  # Stan's cap for antithetic chains
    return float(m * n / tau)


TREND_T = 3.0  # |t| of the last-quarter minus first-quarter mean across chains


def trend_t(trace) -> float:
    """t statistic, across chains, of each chain's last-quarter mean minus its
    first-quarter mean: chains are independent replicates, so their spread
    is an honest standard error even for autocorrelated draws. NaN with
    fewer than 3 chains."""
    trace = np.asarray(trace, dtype=np.float64)
    q = max(trace.shape[1] // 4, 1)
    diff = trace[:, -q:].mean(axis=1) - trace[:, :q].mean(axis=1)
    if diff.size < 3:
        return math.nan
    sd = diff.std(ddof=1)
    if sd == 0:
        return 0.0 if diff.mean() == 0 else math.inf
    return float(diff.mean() / (sd / math.sqrt(diff.size)))
