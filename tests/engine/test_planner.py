"""The memory planner's arithmetic, chain groups run one after another, and
out-of-memory reported as a MemoryError that says what to lower (the GPU
figures are in README; these run anywhere)."""
import numpy as np
import pytest
import torch

import llcfast
import llcfast.estimate.llc as llc_module
from llcfast.engine.planner import GiB, HEADROOM, items_per_pass, plan_memory, state_bytes
from llc_models import mlp, mse, regression_loader


def test_everything_fits_in_one_group_and_one_pass():
    plan = plan_memory(8, state_per_chain=GiB, activation_per_chain=GiB, free_bytes=40 * GiB)
    assert (plan.chains_per_group, plan.chain_chunk) == (8, None)


def test_activations_are_chunked_before_chains_are_grouped():
    # 8 chains of state (8 GiB) fit in HEADROOM x 20 GiB; what is left holds only some chains' activations
    plan = plan_memory(8, state_per_chain=GiB, activation_per_chain=3 * GiB, free_bytes=20 * GiB)
    budget = int(20 * GiB * HEADROOM)
    assert plan.chains_per_group == 8
    assert plan.chain_chunk == (budget - 8 * GiB) // (3 * GiB) and 8 * GiB + plan.chain_chunk * 3 * GiB <= budget


def test_passes_are_evened_out_unless_chain_chunk_is_given():
    # room for 3 chains' activations a pass: 4 chains run as 2 + 2 (the same two passes, a lower peak)
    plan = plan_memory(4, state_per_chain=GiB // 4, activation_per_chain=4 * GiB, free_bytes=16 * GiB)
    assert (int(16 * GiB * HEADROOM) - GiB) // (4 * GiB) == 3 and plan.chain_chunk == 2
    assert plan_memory(4, GiB // 4, 4 * GiB, 16 * GiB, chain_chunk=3).chain_chunk == 3


def test_chains_are_grouped_when_their_state_does_not_fit():
    plan = plan_memory(64, state_per_chain=GiB, activation_per_chain=2 * GiB, free_bytes=20 * GiB)
    budget = int(20 * GiB * HEADROOM)
    assert plan.chains_per_group == (budget - 2 * GiB) // GiB < 64
    chunk = plan.chain_chunk or plan.chains_per_group
    assert plan.chains_per_group * GiB + chunk * 2 * GiB <= budget


def test_not_even_one_chain_fits_says_how_much_and_what_to_lower():
    with pytest.raises(MemoryError, match=r"one chain needs about 6.00 GiB on cuda:0 \(2.00 GiB of parameters.*"
                                          r"4.00 GiB of activations.*1.00 GiB is free; lower the batch size"):
        plan_memory(4, 2 * GiB, 4 * GiB, GiB, what="cuda:0")


def test_the_advice_leaves_out_settings_already_in_use():
    with pytest.raises(MemoryError) as fp32:
        plan_memory(4, 2 * GiB, 4 * GiB, GiB)
    assert "precision='bf16'" in str(fp32.value) and "activation_checkpointing=True" in str(fp32.value)
    with pytest.raises(MemoryError) as both:
        plan_memory(4, 2 * GiB, 4 * GiB, GiB, precision="bf16", checkpointing=True)
    message = str(both.value)
    assert "precision=" not in message and "activation_checkpointing" not in message
    assert message.endswith("restrict= the parameters that move, or use a device with more memory")


def test_state_counts_the_samplers_extra_tensor():
    assert state_bytes(1000, "sgld") == 8000 and state_bytes(1000, "sgnht") == state_bytes(1000, "rmsprop_sgld") == 12000
    assert state_bytes(1000, "sgld", mala=True) == 16000  # MALA keeps the previous position and drift


@pytest.mark.filterwarnings("ignore:the LLC estimate is negative")
@pytest.mark.parametrize("sampler", ["sgld", "sgnht"])
def test_chain_groups_give_the_numbers_of_one_stacked_run(sampler):
    kw = dict(num_burnin=0, num_chains=5, num_draws=10, epsilon=1e-3, nbeta=20.0, gamma=50.0, seed=4, progress=False,
              backend="fast", sampler=sampler)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = llcfast.estimate_llc(mlp(), regression_loader(), mse, **kw)
        grouped = llcfast.estimate_llc(mlp(), regression_loader(), mse, chain_group=2, **kw)
    finally:
        torch.set_num_threads(threads)
    assert grouped.config["chain_group"] == 2 and whole.config["chain_group"] == 5
    np.testing.assert_array_equal(grouped.loss_trace, whole.loss_trace)
    np.testing.assert_array_equal(grouped.diagnostics["distance_sq_mean"], whole.diagnostics["distance_sq_mean"])


def test_out_of_memory_becomes_a_memory_error_naming_the_settings(monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB.")

    monkeypatch.setattr(llc_module, "run_chains", no_memory)
    with pytest.raises(MemoryError, match=r"ran out of device memory \(CUDA out of memory. Tried to allocate 3.00 GiB.\); "
                                          r"set chain_group .* or chain_chunk .* lower"):
        llcfast.estimate_llc(mlp(), regression_loader(), mse, num_draws=2, progress=False, num_burnin=0, epsilon=1e-4, num_chains=4)
    with pytest.raises(ValueError, match=r"chain_group must be in \[1, "):
        llcfast.estimate_llc(mlp(), regression_loader(), mse, chain_group=0, progress=False)


def test_items_per_pass_fills_the_budget_and_caps_at_what_is_wanted():
    budget = int(10 * GiB * HEADROOM)
    n = items_per_pass(1000, GiB, GiB // 4, 10 * GiB, item="probe")
    assert n == (budget - GiB) // (GiB // 4) and GiB + n * (GiB // 4) <= budget
    assert items_per_pass(3, GiB, GiB // 4, 10 * GiB, item="probe") == 3


def test_items_per_pass_says_what_one_needs_when_none_fits():
    with pytest.raises(MemoryError, match=r"one probe needs about 5.00 GiB on cuda:0 \(2.00 GiB shared by the "
                                          r"pass, 3.00 GiB its own\) but 4.00 GiB is free; use fewer batches"):
        items_per_pass(10, 2 * GiB, 3 * GiB, 4 * GiB, item="probe", what="cuda:0", lower="use fewer batches")


def test_cpu_passes_keep_the_largest_activation_under_the_limit_in_even_passes():
    from llcfast.engine.planner import CPU_TENSOR_BYTES, MiB, cpu_chain_chunk
    assert cpu_chain_chunk(4, MiB) is None  # 4 chains of 1 MiB: one pass
    assert cpu_chain_chunk(32, 4 * MiB) == CPU_TENSOR_BYTES // (4 * MiB) == 4
    assert cpu_chain_chunk(8, CPU_TENSOR_BYTES // 7) == 4  # room for 7 a pass: two passes of 4, not 7 + 1
    assert cpu_chain_chunk(10, CPU_TENSOR_BYTES // 4) == 4  # three passes are needed either way
    assert cpu_chain_chunk(3, 10 * CPU_TENSOR_BYTES) == 1  # one chain is over the limit alone
    for chains in range(1, 40):
        for largest in (MiB // 2, 3 * MiB, 5 * MiB, 17 * MiB):
            chunk = cpu_chain_chunk(chains, largest) or chains
            assert chunk == 1 or chunk * largest <= CPU_TENSOR_BYTES
            passes = -(-chains // chunk)
            assert passes == max(1, -(-chains // max(1, CPU_TENSOR_BYTES // largest)))  # the fewest passes


def test_saved_activations_are_measured_once_per_storage():
    from llcfast.engine.planner import measure_saved_tensors
    x = torch.randn(1000, requires_grad=True)
    w = torch.randn(1000, 50, requires_grad=True)

    def forward():
        y = x * x  # saves x (twice, one storage)
        return torch.tanh(y @ w)  # saves y and w, and tanh its output

    total, largest = measure_saved_tensors(forward)
    assert largest == 1000 * 50 * 4
    assert total == 4 * (1000 + 1000 + 1000 * 50 + 50)


def test_cpu_passes_are_planned_from_one_chains_activations(monkeypatch):
    import llcfast.engine.planner as planner
    from torch.utils.data import DataLoader

    def run(**extra):
        # A loader shuffled from the global generator: a pass more over it (to plan) would move every batch.
        torch.manual_seed(0)
        loader = DataLoader(regression_loader().dataset, batch_size=16, shuffle=True)
        return llcfast.estimate_llc(mlp(), loader, mse, num_chains=5, num_draws=10, epsilon=1e-3, nbeta=10.0, num_burnin=0,
                                    seed=4, progress=False, **extra)

    whole = run()
    assert whole.config["chain_chunk"] is None and whole.config["pass_plan"]["chain_chunk"] is None
    assert whole.config["backend"] == "fast" and not whole.config["pass_plan"]["sequential"]
    largest = whole.config["pass_plan"]["largest_activation_bytes"]
    assert 0 < largest <= whole.config["pass_plan"]["activation_bytes_per_chain"]
    # Room for two chains' largest activation a pass: passes of 2, 2 and 1, the same as the user's chunk
    # of 2 (no batch spent on planning), and the whole pass's trajectory to rounding.
    monkeypatch.setattr(planner, "CPU_TENSOR_BYTES", 2 * largest)
    planned, chosen = run(), run(chain_chunk=2)
    assert planned.config["chain_chunk"] == 2 and planned.config["pass_plan"]["chain_chunk"] == 2
    assert "pass_plan" not in chosen.config
    np.testing.assert_array_equal(planned.loss_trace, chosen.loss_trace)
    np.testing.assert_allclose(planned.loss_trace, whole.loss_trace, rtol=1e-5)


def test_cpu_runs_chains_one_by_one_where_one_chain_fills_the_cores(monkeypatch):
    import llcfast.engine.planner as planner
    from llcfast.engine.planner import MiB, cpu_pass_plan
    assert cpu_pass_plan(8, 40 * MiB, 4 * MiB) == dict(sequential=True, chain_chunk=1, activation_bytes_per_chain=40 * MiB,
                                                       largest_activation_bytes=4 * MiB)
    assert cpu_pass_plan(8, 40 * MiB, 4 * MiB, stack=True)["chain_chunk"] == 4  # compiled passes stay stacked
    assert cpu_pass_plan(8, MiB, MiB // 8) == dict(sequential=False, chain_chunk=None, activation_bytes_per_chain=MiB,
                                                  largest_activation_bytes=MiB // 8)
    kw = dict(num_burnin=0, num_chains=3, num_draws=8, epsilon=1e-3, nbeta=10.0, seed=2, progress=False)
    stacked = llcfast.estimate_llc(mlp(), regression_loader(), mse, **kw)
    monkeypatch.setattr(planner, "CPU_SEQUENTIAL_BYTES", 1)
    one_by_one = llcfast.estimate_llc(mlp(), regression_loader(), mse, **kw)
    assert one_by_one.config["backend"] == "fast-sequential" and one_by_one.config["chain_chunk"] == 1
    assert one_by_one.config["pass_plan"]["sequential"] and stacked.config["backend"] == "fast"
    np.testing.assert_allclose(one_by_one.loss_trace, stacked.loss_trace, rtol=1e-5)
    # A chunk the user sets is kept, and so is a compiled pass's batching (checked on the plan above).
    chosen = llcfast.estimate_llc(mlp(), regression_loader(), mse, chain_chunk=2, **kw)
    assert chosen.config["backend"] == "fast" and chosen.config["chain_chunk"] == 2
