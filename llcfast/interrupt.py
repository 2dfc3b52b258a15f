"""Ctrl-C during estimate_llc keeps the draws finished: both backends raise
LLCInterrupted, still a KeyboardInterrupt (a script stops as before), whose
``result`` is the estimate from those draws."""
from __future__ import annotations

import math
from typing import Optional


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


def draws_within(steps_done: int, num_burnin: int, steps_between_draws: int, num_draws: int) -> int:
    """Draws among the first ``steps_done`` steps (a draw is taken at steps
    num_burnin, num_burnin + steps_between_draws, ...)."""
    return max(0, min(num_draws, math.ceil((steps_done - num_burnin) / steps_between_draws)))


def partial_choice(finished: int, started: int, draws_done: int, num_draws: int) -> Optional[str]:
    """Which draws the partial estimate uses: "finished" (the chains that ran
    every step, all their draws) or "started" (every chain that started,
    truncated to the draws the last one reached), whichever holds more
    chain-draws; None when neither holds any."""
    whole, cut = finished * num_draws, started * draws_done
    if max(whole, cut) == 0:
        return None
    return "finished" if whole >= cut else "started"


def interrupted_config(choice: str, chains: int, draws: int, steps_done: int, steps: int) -> dict:
    return {"chains": chains, "draws": draws, "steps_done": steps_done, "steps": steps,
            "kept": "chains that finished" if choice == "finished" else "draws every started chain reached"}


def raise_interrupted(result, where: str):
    if result is None:
        raise LLCInterrupted(f"{where} interrupted during burn-in; no draws to estimate from") from None
    info = result.config["interrupted"]
    raise LLCInterrupted(f"{where} interrupted after {info['steps_done']} of {info['steps']} steps; "
                         f"the exception's .result holds the estimate from {info['chains']} chains x "
                         f"{info['draws']} draws (LLC {result.llc_mean:.4g})", result) from None
