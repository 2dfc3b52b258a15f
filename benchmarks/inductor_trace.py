"""What torch.compile's code for a pass asks of a GPU, counted without one:
Inductor lowers and fuses the traced pass for a CUDA device, and its
scheduler's kernels (fused Triton kernels and the cuBLAS calls they sit
between) are counted with the scheduler's own byte and FLOP estimates, just
before code generation, which is then abandoned.

With no GPU in the machine, Inductor is shown an H100's properties and told
that Triton works; nothing is compiled or run, so neither is needed. The
graph is traced on the CPU with fake tensors and moved to "cuda" by
rewriting its device arguments; torch.compiler.is_compiling() is True while
it is traced, as under torch.compile. Default mode only: max-autotune's Triton
matmul templates would fuse more.

This leans on Inductor's internals (torch 2.14); where they differ the trace
raises :class:`Unavailable` with the reason.
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Tuple
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

Row = Tuple[str, int, int]  # (kernel, matmul FLOPs, bytes read + written)

H100 = dict(multi_processor_count=132, cc=90, major=9, regs_per_multiprocessor=65536,
            max_threads_per_multi_processor=2048, max_threads_per_block=1024, warp_size=32)


class Unavailable(RuntimeError):
    """This torch's Inductor cannot be driven this way."""


class _Scheduled(Exception):
    pass


def inductor_rows(fn: Callable, args: tuple, autocast=contextlib.nullcontext) -> List[Row]:
    """The kernels Inductor schedules for ``fn(*args)`` on a CUDA device.
    ``args`` are CPU tensors (fake or real), flat or nested in tuples;
    ``autocast()`` is entered while tracing."""
    try:
        from torch._inductor import config, scheduler
        from torch._inductor.compile_fx import compile_fx
        from torch._inductor.runtime import hints
    except ImportError as exc:
        raise Unavailable(f"torch {torch.__version__}: {exc}") from None
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = torch.utils._pytree.tree_map(
            lambda t: torch.empty(t.shape, dtype=t.dtype) if isinstance(t, torch.Tensor) else t, args)
    # Code that takes another path under torch.compile (fused_loss.token_nll)
    # takes it here too.
    with autocast(), mock.patch.object(torch.compiler, "is_compiling", lambda: True):
        gm = make_fx(fn, tracing_mode="fake")(*fake)
    cuda = torch.device("cuda", 0)

    def to_cuda(arg):
        return cuda if isinstance(arg, torch.device) else arg

    for node in gm.graph.nodes:
        node.args = torch.fx.node.map_aggregate(node.args, to_cuda)
        node.kwargs = torch.fx.node.map_aggregate(node.kwargs, to_cuda)
    gm.recompile()
    with mode:
        inputs = [torch.empty(t.shape, dtype=t.dtype, device=cuda) for t in torch.utils._pytree.tree_leaves(fake)
                  if isinstance(t, torch.Tensor)]
    rows: List[Row] = []

    def record(self):
        for node in self.nodes:
            if isinstance(node, scheduler.NopKernelSchedulerNode):
                continue
            if isinstance(node, scheduler.ExternKernelSchedulerNode):
                name = str(getattr(node.node, "python_kernel_name", None) or type(node.node).__name__)
            else:
                name = "fused" if isinstance(node, scheduler.FusedSchedulerNode) else "kernel"
            rows.append((name, int(node.estimate_flops() or 0), int(node.get_read_write_buffers_sizes())))
        raise _Scheduled()

    # Each torch version's DeviceProperties holds some of these fields.
    props = hints.DeviceProperties(type="cuda", index=0,
                                   **{k: v for k, v in H100.items() if k in hints.DeviceProperties._fields})
    patches = [config.patch(fx_graph_cache=False, joint_graph_constant_folding=False),  # folding runs ops
               mock.patch.object(hints.DeviceProperties, "create", classmethod(lambda cls, device: props)),
               mock.patch.object(scheduler, "has_triton", lambda: True),
               mock.patch.object(scheduler.Scheduler, "codegen", record)]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        try:
            compile_fx(gm, inputs)
        except Exception as exc:  # Inductor wraps what its passes raise
            if not rows:
                raise Unavailable(f"torch {torch.__version__}: Inductor stopped before scheduling: "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    return rows
