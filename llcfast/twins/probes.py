"""Pure-torch twins of the Hessian kernels: ``llcfast::philox_rademacher_``
(probe signs) and ``llcfast::multi_dot_`` (per-row dot products over a list
of tensors). Same signatures as llcfast.ops.rademacher and llcfast.ops.multi_dot."""
from __future__ import annotations

from typing import Sequence

import torch

from .._checks import check_multi_dot_args, check_rademacher_args
from .philox import _MASK32, philox4x32_10

_PROBE_BIT = 0x80000000  # set in the counter's last word: probes never meet SGLD noise


def rademacher(num_rows: int, numel: int, *, seed: int, stream: int = 0, row_offset: int = 0,
               group_offset: int = 0, device="cpu") -> torch.Tensor:
    """Mirrors ``llcfast::philox_rademacher_``: [num_rows, numel] float32 signs;
    element e of row r is +1 or -1 by the top bit of word e % 4 of
    Philox4x32-10(counter = (group_offset + e // 4, row_offset + r,
    stream mod 2^32, (stream div 2^32) | 2^31), key = seed)."""
    check_rademacher_args(num_rows, numel, seed, stream, row_offset, group_offset)
    device = torch.device(device)
    groups = -(-numel // 4)
    rows = torch.arange(row_offset, row_offset + num_rows, dtype=torch.int64, device=device)[:, None]
    group_idx = torch.arange(group_offset, group_offset + groups, dtype=torch.int64, device=device)
    words = philox4x32_10((group_idx, rows, stream & _MASK32, ((stream >> 32) & _MASK32) | _PROBE_BIT),
                          (seed & _MASK32, (seed >> 32) & _MASK32))
    shape = torch.broadcast_shapes(rows.shape, group_idx.shape)
    bits = torch.stack([torch.broadcast_to(w, shape) >> 31 for w in words], dim=-1)  # [R, G, 4]
    signs = (1 - 2 * bits).to(torch.float32)
    return signs.reshape(num_rows, groups * 4)[:, :numel].contiguous()


def multi_dot_(out: torch.Tensor,  # [R] float64, added to
               a: Sequence[torch.Tensor],  # each [R, ...] float32
               b: Sequence[torch.Tensor],  # each like a[i]
               ) -> None:
    """Mirrors ``llcfast::multi_dot_``: out[r] += sum_i <a[i][r], b[i][r]>,
    accumulated in float64."""
    check_multi_dot_args(out, a, b)
    for x, y in zip(a, b):
        if x.numel():
            out += (x.double() * y.double()).reshape(x.shape[0], -1).sum(1)
