"""Warnings shown during long work with progress bars on screen."""
import sys
import warnings

import pytest

from llcfast.engine.progress import progress_bar, warnings_above_bars


def _printing_showwarning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@pytest.mark.parametrize("above", [True, False])
def test_a_warning_under_a_bar_starts_on_a_cleared_line(above, capsys, monkeypatch):
    monkeypatch.setattr(warnings, "showwarning", _printing_showwarning)  # as Python prints outside pytest
    bar = progress_bar(True, 3, "checkpoints", leave=True)
    with warnings_above_bars(above):
        warnings.warn("step 7: negative LLC", RuntimeWarning)
    bar.close()
    err = capsys.readouterr().err
    before = err[:err.index(__file__)]
    if above:  # the bar was wiped (carriage return) before the warning, and drawn again after it
        assert before.endswith("\r") and err.rstrip().endswith("]")
    else:  # what it guards against: the warning glued to the bar's line
        assert before.endswith("]")


def test_a_callers_recorder_still_gets_the_warnings_and_gets_its_hook_back():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hook = warnings.showwarning
        with warnings_above_bars(True):
            assert warnings.showwarning is not hook
            warnings.warn("kept", RuntimeWarning)
        assert warnings.showwarning is hook
    assert [str(w.message) for w in caught] == ["kept"]
