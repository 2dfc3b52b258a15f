"""Ctrl-C during estimate_llc keeps the draws finished: both backends raise
LLCInterrupted, still a KeyboardInterrupt (a script stops as before), whose
``result`` is the estimate from those draws."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

from .common import draw_slice


class LLCInterrupted(KeyboardInterrupt):
    """A KeyboardInterrupt during estimate_llc. ``result`` is the LLCResult of
    the draws finished (``config["interrupted"]`` says how many), or None when
    the chains were still burning in."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class ChainsInterrupted(KeyboardInterrupt):
    """From the engine to estimate_llc: ``run`` holds the first
    ``steps_done`` steps of every chain of the interrupted group."""

    def __init__(self, run, steps_done: int):
        super().__init__(f"interrupted after {steps_done} steps")
        self.run, self.steps_done = run, steps_done


@dataclass
class PartialPlan:
    """What an interrupted estimate keeps: the first ``chains`` chains, the
    first ``draws`` draws of each, from their first ``steps`` steps."""
    chains: int
    draws: int
    steps: int
    config: dict  # config["interrupted"]


def partial_plan(finished: int, started: int, steps_done: int, num_burnin: int, steps_between_draws: int,
                 num_draws: int) -> Optional[PartialPlan]:
    """After Ctrl-C with ``finished`` chains done and the others of the
    ``started`` ones at ``steps_done`` steps: the finished chains with all
    their draws, or every started chain cut to the draws it reached,
    whichever holds more chain-draws; None when neither holds any."""
    reached = min(num_draws, len(range(steps_done)[draw_slice(num_burnin, steps_between_draws)]))
    whole, cut = finished * num_draws, started * reached
    if max(whole, cut) == 0:
        return None
    total = num_burnin + num_draws * steps_between_draws
    if whole >= cut:
        chains, draws, steps, kept = finished, num_draws, total, "chains that finished"
    else:
        chains, draws, steps, kept = started, reached, steps_done, "draws every started chain reached"
    return PartialPlan(chains, draws, steps, {"chains": chains, "draws": draws, "steps_done": steps_done,
                                              "steps": total, "kept": kept})


def raise_interrupted(result, where: str):
    if result is None:
        raise LLCInterrupted(f"{where} interrupted during burn-in; no draws to estimate from") from None
    info = result.config["interrupted"]
    raise LLCInterrupted(f"{where} interrupted after {info['steps_done']} of {info['steps']} steps; "
                         f"the exception's .result holds the estimate from {info['chains']} chains x "
                         f"{info['draws']} draws (LLC {result.llc_mean:.4g})", result) from None


@contextmanager
def deferred_interrupts():
    """Ctrl-C inside the block is held until the block ends, then raised:
    a training step (the optimizer's update and the step counter) is then
    applied whole or not at all. Outside the main thread, or where SIGINT
    has a handler of the program's own, it does nothing."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt
