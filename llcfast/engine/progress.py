"""Progress bars, and warnings printed above them."""
from __future__ import annotations

import contextlib
import warnings


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


@contextlib.contextmanager
def warnings_above_bars(enabled: bool = True):
    """While active, each warning shown clears the tqdm bars on screen, prints,
    and redraws them, so a long job's warnings are not spliced into a bar's
    line. The showwarning in force (a caller's catch_warnings recorder, say)
    still receives every warning."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        yield
        return
    shown = warnings.showwarning

    def show(*args, **kwargs):
        with tqdm.external_write_mode():
            shown(*args, **kwargs)

    warnings.showwarning = show
    try:
        yield
    finally:
        if warnings.showwarning is show:
            warnings.showwarning = shown


def progress_bar(enabled: bool, total: int, desc: str, *, unit: str = "step", initial: int = 0,
                 leave: bool = False):
    """A tqdm bar, or (disabled, or tqdm missing) one whose update, set_postfix
    and close do nothing, so callers need no guards."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, disable=not enabled)
