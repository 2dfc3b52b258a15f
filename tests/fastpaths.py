"""Turning fast paths on for one test, as estimate_llc(fastpath=...) does."""
import contextvars

from llcfast.fastpath import settings


def set_fastpath(monkeypatch, **paths):
    """For the rest of the test, the settings in force have each named path
    (attention, layer_norm, linear, head, token_loss, bf16_copies) on the
    device types given; the others as they were."""
    chosen = settings.current().replace(**{path: tuple(devices) for path, devices in paths.items()})
    monkeypatch.setattr(settings, "_current", contextvars.ContextVar("llcfast_fastpath_test", default=chosen))
