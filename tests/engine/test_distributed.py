"""estimate_llc under torch.distributed: 2 CPU processes on gloo split the
chains (3 + 2 of 5) and must give exactly the numbers of one process with the
same seed, every sampler and a shuffling loader too, since noise and each
chain's batch stream are keyed by the global chain index."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import llcfast
from llc_models import free_port, mlp, mse, regression_loader
from two_ranks import on_two_ranks, single_threaded

KW = dict(num_chains=5, num_draws=12, num_burnin=4, epsilon=1e-3, nbeta=20.0, gamma=50.0, seed=11, progress=False,
          backend="fast")
SAMPLERS = [("sgld", {}, False), ("rmsprop_sgld", {"alpha": 0.9}, False), ("sgnht", {}, False),
            ("sgld", {}, True)]  # (sampler, its kwargs, shuffling loader)


def _estimates():
    return [llcfast.estimate_llc(mlp(), regression_loader(shuffle=shuffle), mse, sampler=s, sampler_kwargs=k,
                                 **KW).to_dict() for s, k, shuffle in SAMPLERS]


@pytest.mark.filterwarnings("ignore:the LLC estimate is negative")
def test_two_gloo_ranks_give_the_one_process_numbers(tmp_path):
    single = single_threaded(_estimates)
    for rank, ranked in enumerate(on_two_ranks(_estimates, tmp_path)):
        for one, two, (sampler, _, shuffle) in zip(single, ranked, SAMPLERS):
            sampler += " shuffled" if shuffle else ""
            assert two["config"]["world_size"] == 2
            for key in ("llc_per_chain", "loss_trace", "llc_trace"):
                np.testing.assert_array_equal(np.array(two[key], dtype=float), np.array(one[key], dtype=float),
                                              err_msg=f"{sampler} {key} rank {rank}")
            assert two["llc_mean"] == one["llc_mean"] and two["init_loss"] == one["init_loss"]
            for stat in ("grad_norm_sq_mean", "distance_sq_mean", "noise_norm_sq_mean", "rhat", "ess"):
                np.testing.assert_array_equal(np.array(two["diagnostics"][stat]),
                                              np.array(one["diagnostics"][stat]), err_msg=f"{sampler} {stat}")


def _too_few_chains(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for backend, kw in (("fast", dict(num_chains=1)), ("reference", dict(num_chains=4))):
            try:
                llcfast.estimate_llc(mlp(), regression_loader(), mse, num_draws=2, epsilon=1e-3, num_burnin=0, progress=False,
                                     backend=backend,
                                     **kw)
            except ValueError as exc:
                with open(os.path.join(out_dir, f"{backend}{rank}.txt"), "w") as f:
                    f.write(str(exc))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_bad_distributed_use_is_explained(tmp_path):
    mp.spawn(_too_few_chains, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert "num_chains=1 is fewer than the 2 ranks" in (tmp_path / "fast0.txt").read_text()
    assert "backend='reference' runs its chains in one process" in (tmp_path / "reference1.txt").read_text()


def _sweep_worker(rank, world, port, run_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from llcfast.pipeline.sweep import sweep
        sweep(run_dir, device="cpu", progress=False)
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_two_gloo_ranks_sweep_into_one_results_file(tmp_path):
    import shutil
    from llcfast.pipeline import train
    from llcfast.pipeline.sweep import read_results, sweep
    from pipeline_configs import tiny
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train(tiny(), one, progress=False)
    shutil.copytree(one, two)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = sweep(one, device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_sweep_worker, args=(2, free_port(), two), nprocs=2, join=True)
    assert not [f for f in os.listdir(two) if ".rank" in f]  # parts merged and removed
    merged = read_results(os.path.join(two, "results.jsonl"))
    assert [r["step"] for r in merged] == [r["step"] for r in single]  # each checkpoint once, in step order
    for a, b in zip(single, merged):
        assert b["llc_per_chain"] == a["llc_per_chain"] and b["test_loss"] == a["test_loss"], a["step"]
    # A rerun in one process finds everything done.
    before = open(os.path.join(two, "results.jsonl")).read()
    sweep(two, device="cpu", progress=False)
    assert open(os.path.join(two, "results.jsonl")).read() == before


def test_gathered_tensors_outlive_the_collective(tmp_path, monkeypatch):
    """The tensors handed to all_gather are still held by Python when
    gather_rows returns, so gloo's worker thread never frees the last
    reference; on older torch (2.4.1 here) that free waits for the GIL
    while destroy_process_group holds it, and the rank hangs."""
    import gc
    import weakref
    from llcfast.engine.distributed import ChainSplit, gather_rows
    seen = []
    real = dist.all_gather

    def recording(parts, tensor, *args, **kwargs):
        seen.extend(weakref.ref(t) for t in [tensor, *parts])
        return real(parts, tensor, *args, **kwargs)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "all_gather", recording)
        rows = gather_rows(ChainSplit(0, 1, [3]), np.arange(6.0).reshape(3, 2))
        gc.collect()
        np.testing.assert_array_equal(rows, np.arange(6.0).reshape(3, 2))
        assert seen and all(ref() is not None for ref in seen)
    finally:
        dist.destroy_process_group()
