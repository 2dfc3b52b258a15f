"""How many chains fit on the device at once.

Stacked chains cost their parameters, gradients and sampler state for the
whole run (S bytes each), and activations only while their batched pass runs
(A bytes each, measured on one chain's pass). With G chains stacked and
passes of K of them, G*S + K*A must fit in the free memory, with headroom;
chain groups of G run one after another when all chains do not fit."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Tuple

import torch

from .common import first_line

GiB = 2**30
MiB = 2**20
HEADROOM = 0.85  # of the free memory: allocator fragmentation, library workspaces

# On CPUs the size of a batched pass matters for speed, not memory: glibc
# serves blocks over 32 MiB from fresh pages, so a pass whose tensors grow
# past that faults every activation in again at every step (docs/estimating.md
# gives the measurements). Passes keep their largest saved activation at half
# that size, since the passing tensors (stacked gradients of a fused
# projection) run larger.
CPU_TENSOR_BYTES = 16 * MiB
# A chain whose activations reach 1 MiB (256k floats, eight of torch's 32k-element
# grains) spreads over the cores alone, and stacking chains adds only vmap's
# costs (batched matmuls for plain ones, bias adds, gradient copies). Smaller
# models stay stacked, for CPUs with more cores than one chain's ops can use.
CPU_SEQUENTIAL_BYTES = MiB


@dataclass
class MemoryPlan:
    chains_per_group: int
    chain_chunk: Optional[int]  # chains per batched pass; None: the whole group
    state_bytes_per_chain: int
    activation_bytes_per_chain: int
    free_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def state_bytes(numel: int, sampler: str, mala: bool = False) -> int:
    """fp32 parameters and gradients per chain, plus RMSprop's V or SGNHT's
    momentum, plus the previous position and drift the MALA diagnostic keeps."""
    return 4 * numel * ((2 if sampler == "sgld" else 3) + (2 if mala else 0))


def plan_memory(num_chains: int, state_per_chain: int, activation_per_chain: int, free_bytes: int,
                chain_chunk: Optional[int] = None, *, what: str = "the device", precision: str = "fp32",
                checkpointing: bool = False) -> MemoryPlan:
    """The largest chain group, then the largest pass, that fit in
    HEADROOM x free_bytes; a MemoryError naming the need and the settings to
    lower when not even one chain fits (leaving out those already in use)."""
    budget = int(free_bytes * HEADROOM)
    S, A = max(state_per_chain, 1), max(activation_per_chain, 0)
    group = min(num_chains, (budget - A) // S) if budget > A else 0
    if group < 1:
        cures = ["lower the batch size (grad_accum_steps keeps the effective batch)"]
        cures += [] if precision == "bf16" else ["use precision='bf16' (activations)"]
        cures += [] if checkpointing else ["activation_checkpointing=True (activations)"]
        cures += ["restrict= the parameters that move", "use a device with more memory"]
        raise MemoryError(
            f"one chain needs about {(S + A) / GiB:.2f} GiB on {what} ({S / GiB:.2f} GiB of parameters, gradients "
            f"and sampler state, {A / GiB:.2f} GiB of activations for one batch) but {free_bytes / GiB:.2f} GiB is "
            f"free; {', '.join(cures[:-1])}, or {cures[-1]}")
    chunk = group if A == 0 else min(group, (budget - group * S) // A)
    if chain_chunk is not None:
        chunk = min(chunk, chain_chunk)
    elif chunk < group:  # as few passes as fit, evened out: 4 chains with room for 3 a pass run as 2 and 2
        chunk = -(-group // -(-group // chunk))
    return MemoryPlan(group, None if chunk >= group else chunk, S, A, free_bytes)


def cpu_chain_chunk(num_chains: int, largest_per_chain: int) -> Optional[int]:
    """Chains per batched pass on a CPU (None: all in one): as many as keep
    the largest saved activation within CPU_TENSOR_BYTES, at least one,
    spread evenly over the fewest passes (8 chains with room for 7 a pass:
    two passes of 4, not 7 and 1)."""
    most = max(1, CPU_TENSOR_BYTES // max(largest_per_chain, 1))
    if most >= num_chains:
        return None
    passes = -(-num_chains // most)
    return -(-num_chains // passes)


def cpu_pass_plan(num_chains: int, total: int, largest: int, stack: bool = False) -> dict:
    """How a CPU runs the chains' loss-and-gradient passes, from one chain's
    saved activations (``total`` and ``largest`` bytes): chain by chain with
    plain autograd where one chain fills the cores (unless ``stack``), else
    stacked in passes of cpu_chain_chunk."""
    sequential = largest >= CPU_SEQUENTIAL_BYTES and not stack
    return dict(sequential=sequential, chain_chunk=1 if sequential else cpu_chain_chunk(num_chains, largest),
                activation_bytes_per_chain=total, largest_activation_bytes=largest)


def measure_saved_tensors(forward: Callable[[], object]) -> Tuple[int, int]:
    """(total, largest) bytes of the distinct tensors autograd saves for the
    backward pass while ``forward`` runs: one chain's activations."""
    sizes = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        sizes[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(sizes.values()), max(sizes.values(), default=0)


def items_per_pass(wanted: int, shared_bytes: int, bytes_per_item: int, free_bytes: int, *, item: str,
                   what: str = "the device", lower: str = "") -> int:
    """How many of ``wanted`` items (probes, rows) one pass can hold when it
    needs shared_bytes + n x bytes_per_item within HEADROOM x free_bytes; a
    MemoryError naming the need and what to lower when not even one fits."""
    budget = int(free_bytes * HEADROOM)
    fits = (budget - shared_bytes) // max(bytes_per_item, 1)
    if fits < 1:
        raise MemoryError(
            f"one {item} needs about {(shared_bytes + bytes_per_item) / GiB:.2f} GiB on {what} "
            f"({shared_bytes / GiB:.2f} GiB shared by the pass, {bytes_per_item / GiB:.2f} GiB its own) but "
            f"{free_bytes / GiB:.2f} GiB is free" + (f"; {lower}" if lower else ""))
    return int(min(wanted, fits))


def free_device_bytes(device: torch.device) -> int:
    """Free memory on a CUDA device, counting what torch's caching allocator
    holds but does not use (a measuring pass leaves its peak reserved)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def measure_activation_bytes(one_chain_grad: Callable[[], object], device: torch.device) -> int:
    """Peak memory above the current allocation while one chain's loss and
    gradient are computed (CUDA); 0 elsewhere."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = one_chain_grad()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return max(0, peak - base)


def cpu_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the CPU allocator's refusal (a RuntimeError there,
    not torch.OutOfMemoryError as on CUDA)."""
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)


def out_of_memory_message(exc: BaseException, plan: Optional[MemoryPlan], num_chains: int) -> str:
    first = first_line(exc, "out of memory")
    if plan is None:
        need = "set chain_group (chains stacked at once) or chain_chunk (chains per batched pass) lower"
    else:
        need = (f"the plan stacked {plan.chains_per_group} of {num_chains} chains with passes of "
                f"{plan.chain_chunk or plan.chains_per_group} (measured {plan.state_bytes_per_chain / GiB:.2f} GiB of "
                f"state and {plan.activation_bytes_per_chain / GiB:.2f} GiB of activations per chain); set "
                "chain_group or chain_chunk lower")
    return (f"estimate_llc ran out of device memory ({first}); {need}, or lower the batch size "
            "(grad_accum_steps keeps the effective batch), use precision='bf16', or activation_checkpointing=True")
