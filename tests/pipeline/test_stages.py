"""detect_stages on synthetic LLC curves with known plateaus, and edge cases."""
import numpy as np
import pytest

from llcfast import detect_stages

STEPS = np.unique(np.round(np.logspace(0, 5, 80)).astype(int))
X = np.log(STEPS + 1.0)


def _sigmoid(x, center, height):
    return height / (1 + np.exp(-4 * (x - center)))


def _truth(x):
    """Plateau, rise of 20 at log-step 3, plateau, rise of 100 at 7, plateau,
    fall of 30 at 10, plateau."""
    return _sigmoid(x, 3, 20) + _sigmoid(x, 7, 100) + _sigmoid(x, 10, -30)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_known_plateaus_are_found(seed):
    noise = 2.0
    values = _truth(X) + np.random.default_rng(seed).normal(0, noise, X.size)
    fit = detect_stages(STEPS, values)
    logb = np.log(np.asarray(fit.boundaries) + 1)
    # one boundary in each plateau between developments
    for lo, hi in [(3.7, 6.3), (7.7, 9.3)]:
        assert np.sum((logb > lo) & (logb < hi)) == 1, (lo, hi, logb)
    # no boundary inside a development (the sigmoids' steep middles)
    for center in (3, 7, 10):
        assert not np.any(np.abs(logb - center) < 0.35), (center, logb)
    big = [s for s in fit.stages if abs(s.delta) > 10]
    assert [s.kind for s in big] == ["A", "A", "B"]
    # each stage's change matches the true curve's between its ends, within
    # four of the fit's own standard deviations at the two ends
    for s in fit.stages:
        a, b = np.log(s.start + 1), np.log(s.end + 1)
        sd = np.hypot(np.interp(a, np.log(fit.grid_steps + 1), fit.std),
                      np.interp(b, np.log(fit.grid_steps + 1), fit.std))
        assert s.delta == pytest.approx(_truth(b) - _truth(a), abs=4 * sd + 1e-9)
    assert fit.noise == pytest.approx(noise, rel=0.35)


def test_stages_tile_the_range_and_band_is_sensible():
    values = _truth(X) + np.random.default_rng(5).normal(0, 2.0, X.size)
    fit = detect_stages(STEPS, values)
    assert fit.stages[0].start == pytest.approx(STEPS.min())
    assert fit.stages[-1].end == pytest.approx(STEPS.max(), rel=1e-9)
    for s, t in zip(fit.stages[:-1], fit.stages[1:]):
        assert s.end == t.start
    assert np.all(fit.std > 0) and np.all(fit.std < 2.0 * 2)  # tighter than twice the noise
    inside = np.abs(np.interp(X, np.log(fit.grid_steps + 1), fit.mean) - _truth(X)) < 3 * np.interp(
        X, np.log(fit.grid_steps + 1), fit.std) + 1e-9
    assert inside.mean() > 0.9


@pytest.mark.parametrize("seed", [0, 1])
def test_flat_and_noise_only_curves_have_one_stage(seed):
    assert detect_stages(STEPS, np.full(X.size, 7.0)).boundaries == []
    fit = detect_stages(STEPS, 50 + np.random.default_rng(seed).normal(0, 3.0, X.size))
    assert fit.boundaries == [] and len(fit.stages) == 1


def test_one_point_and_two_points():
    fit = detect_stages([100], [3.0])
    assert len(fit.stages) == 1 and fit.stages[0].start == fit.stages[0].end == 100
    fit = detect_stages([0, 10], [1.0, 5.0])
    assert len(fit.stages) == 1 and fit.stages[0].kind == "A"


def test_nan_points_are_dropped_with_a_warning():
    values = _truth(X) + np.random.default_rng(0).normal(0, 2.0, X.size)
    holed = values.copy()
    holed[[5, 40]] = np.nan
    keep = np.isfinite(holed)
    with pytest.warns(RuntimeWarning, match=f"2 of {X.size} points are NaN"):
        fit = detect_stages(STEPS, holed)
    ref = detect_stages(STEPS[keep], values[keep])
    assert fit.dropped == 2
    assert fit.boundaries == pytest.approx(ref.boundaries)


def test_unsorted_steps_give_the_same_stages():
    values = _truth(X) + np.random.default_rng(1).normal(0, 2.0, X.size)
    perm = np.random.default_rng(2).permutation(X.size)
    assert detect_stages(STEPS[perm], values[perm]).boundaries == pytest.approx(
        detect_stages(STEPS, values).boundaries)


def test_bad_input_is_explained():
    with pytest.raises(ValueError, match="same length"):
        detect_stages([1, 2, 3], [1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        detect_stages([], [])
    with pytest.raises(ValueError, match="steps must be >= 0"):
        detect_stages([-5, 1, 2], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="plateau must be in"):
        detect_stages(STEPS, _truth(X), plateau=1.5)
    with pytest.raises(ValueError, match="no finite"):
        with pytest.warns(RuntimeWarning):
            detect_stages([1, 2], [np.nan, np.nan])


def test_a_bend_of_the_fit_before_the_second_checkpoint_is_no_plateau():
    # The language demo's LLC sweep (2 CPU cores): the fit's slope crosses zero
    # at step 0.28, between the first two checkpoints, which once made a
    # "plateau" stage holding one checkpoint. Its real plateau at the end holds
    # four and keeps its boundary.
    steps = [0, 1, 2, 3, 6, 10, 18, 32, 58, 104, 185, 330, 500, 590, 1000, 1053, 1500, 1881, 2000, 2500, 3000, 3359,
             3500, 4000, 4500, 5000, 5500, 6000]
    llc = [2.115, 2.23, 2.311, 2.384, 2.667, 2.94, 2.898, 3.582, 4.475, 4.547, 4.947, 5.506, 5.653, 5.847, 6.129, 6.116,
           6.384, 6.784, 6.964, 7.515, 8.288, 8.592, 8.802, 9.072, 8.996, 9.121, 8.88, 8.928]
    se = [0.101, 0.121, 0.141, 0.161, 0.192, 0.092, 0.12, 0.061, 0.069, 0.072, 0.036, 0.066, 0.056, 0.074, 0.047, 0.057,
          0.022, 0.028, 0.046, 0.041, 0.102, 0.091, 0.115, 0.128, 0.111, 0.113, 0.082, 0.105]
    fit = detect_stages(steps, llc, se)
    assert fit.boundaries and fit.boundaries[0] > 1
    assert 3500 < fit.boundaries[-1] < 5000  # the final plateau
    assert all(sum(a <= s <= b for s in steps) >= 2 for a, b in ((st.start, st.end) for st in fit.stages))
