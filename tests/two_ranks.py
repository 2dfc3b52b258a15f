"""The same computation in one process and split over two gloo ranks on
this machine, for the tests that hold the two together."""
import os
import pickle

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llc_models import free_port


def single_threaded(compute):
    """compute() on one thread, as each rank runs: the same CPU kernels and
    summation order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return compute()
    finally:
        torch.set_num_threads(threads)


def _rank(rank, world, port, out_dir, compute):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(compute(), f)
        # both ranks done before either tears gloo down, as llcfast sweep does: a rank that destroyed
        # its group while the other was still finishing aborted once ("terminate called without an
        # active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def on_two_ranks(compute, out_dir) -> list:
    """compute() (a module-level function returning something picklable) on
    each of two gloo ranks; their results, rank 0's first."""
    mp.spawn(_rank, args=(2, free_port(), str(out_dir), compute), nprocs=2, join=True)
    results = []
    for rank in (0, 1):
        with open(os.path.join(str(out_dir), f"rank{rank}.pkl"), "rb") as f:
            results.append(pickle.load(f))
    return results
