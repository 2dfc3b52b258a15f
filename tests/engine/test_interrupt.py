"""Ctrl-C during estimate_llc keeps the draws finished: a KeyboardInterrupt
(here raised by a callback after a given step, as a Ctrl-C between steps
would be) becomes llcfast.LLCInterrupted, still a KeyboardInterrupt, whose
result is the estimate from the whole steps before it, equal to the same
draws of an uninterrupted run."""
import numpy as np
import pytest

import llcfast
from llcfast import LLCInterrupted, reference
from llc_models import mlp, mse, regression_loader

pytestmark = pytest.mark.filterwarnings("ignore:the loader holds")

KW = dict(num_chains=4, num_draws=12, num_burnin=3, steps_between_draws=2, epsilon=1e-3, gamma=10.0, seed=3,
          progress=False)
STEPS = KW["num_burnin"] + KW["num_draws"] * KW["steps_between_draws"]  # 27


def interrupt_at(chain, at):
    """Raises KeyboardInterrupt in the callback of ``chain``'s step ``at``:
    the steps before it are whole, and it is not counted."""
    def cb(step: int, chains, loss, params):
        if chain in chains and step == at:
            raise KeyboardInterrupt
    return cb


def draws_in(steps):  # draws are the losses of steps 4, 6, 8, ... (the last of each interval, as devinterp)
    return max(0, (steps - KW["num_burnin"]) // KW["steps_between_draws"])


BACKENDS = {
    "fast": lambda model, **kw: llcfast.estimate_llc(model, regression_loader(), mse, backend="fast", **kw),
    "reference": lambda model, **kw: reference.estimate_llc(model, regression_loader(), mse, **kw),
}


@pytest.fixture(scope="module")
def whole():
    return {name: run(mlp(), **KW) for name, run in BACKENDS.items()}


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_partial_estimate_is_the_first_draws_of_the_whole_run(backend, whole):
    # The fast engine runs all chains together: cut at step 14, every chain
    # keeps its 5 draws among steps 0..13. The reference runs them one by one:
    # cut in chain 2 at step 22, 3 chains x 9 draws hold more than the 2
    # finished chains' 2 x 12, so all three are kept, cut to 9 draws.
    chain, step = (0, 14) if backend == "fast" else (2, 22)
    with pytest.raises(LLCInterrupted) as info:
        BACKENDS[backend](mlp(), callbacks=[interrupt_at(chain, step)], **KW)
    assert isinstance(info.value, KeyboardInterrupt)
    part, full = info.value.result, whole[backend]
    draws = draws_in(step)
    chains = KW["num_chains"] if backend == "fast" else chain + 1
    assert part.loss_trace.shape == (chains, draws)
    np.testing.assert_array_equal(part.loss_trace, full.loss_trace[:chains, :draws])
    assert part.init_loss == full.init_loss
    np.testing.assert_allclose(part.llc_per_chain, part.config["nbeta"]
                               * (full.loss_trace[:chains, :draws].mean(1) - full.init_loss), rtol=1e-12)
    stop = part.config["interrupted"]
    assert stop == {"chains": chains, "draws": draws, "steps_done": step, "steps": STEPS,
                    "kept": "draws every started chain reached"}
    assert ("interrupted", False) in [c[:2] for c in part.checks()]
    assert f"{chains} chains x {draws} draws" in str(info.value)
    assert part.diagnostics["diverged_chains"] == []


def test_reference_keeps_the_finished_chains_when_they_hold_more_draws(whole):
    # Cut in chain 3 at step 6 (1 draw reached): 3 finished chains x 12 draws
    # hold more than 4 chains x 1 draw.
    with pytest.raises(LLCInterrupted) as info:
        reference.estimate_llc(mlp(), regression_loader(), mse, callbacks=[interrupt_at(3, 6)], **KW)
    part, full = info.value.result, whole["reference"]
    np.testing.assert_array_equal(part.loss_trace, full.loss_trace[:3])
    np.testing.assert_array_equal(part.llc_per_chain, full.llc_per_chain[:3])
    for stat in ("grad_norm_sq_mean", "distance_sq_mean", "noise_norm_sq_mean"):
        np.testing.assert_array_equal(part.diagnostics[stat], full.diagnostics[stat][:3])
    assert part.config["interrupted"]["kept"] == "chains that finished"


def test_chain_groups_keep_the_finished_group(whole):
    # Groups of 2: Ctrl-C in the second group after 6 steps (1 draw) keeps the
    # first group's 2 chains x 12 draws, the same as in the whole run.
    with pytest.raises(LLCInterrupted) as info:
        llcfast.estimate_llc(mlp(), regression_loader(), mse, backend="fast", chain_group=2,
                             callbacks=[interrupt_at(2, 6)], **KW)
    part, full = info.value.result, whole["fast"]
    np.testing.assert_allclose(part.loss_trace, full.loss_trace[:2], rtol=1e-6)
    assert part.config["interrupted"]["chains"] == 2


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_interrupt_during_burn_in_has_no_result(backend):
    with pytest.raises(LLCInterrupted, match="during burn-in") as info:
        BACKENDS[backend](mlp(), callbacks=[interrupt_at(0, 1)], **KW)
    assert info.value.result is None


def test_mala_trace_is_cut_with_the_draws():
    kw = dict(KW, num_chains=2)
    with pytest.raises(LLCInterrupted) as info:
        llcfast.estimate_llc(mlp(), regression_loader(), mse, backend="fast", mala=True,
                             callbacks=[interrupt_at(0, 9)], **kw)
    part = info.value.result
    assert part.loss_trace.shape == (2, draws_in(9))
    assert part.diagnostics["mala_acceptance_trace"].shape == (2, 8)  # the moves into steps 1..8 of 0..8
    assert np.isfinite(part.diagnostics["mala_acceptance_trace"]).all()


def test_a_run_that_is_not_interrupted_has_no_interrupted_check(whole):
    assert "interrupted" not in whole["fast"].config
    assert "interrupted" not in [c[0] for c in whole["fast"].checks()]
