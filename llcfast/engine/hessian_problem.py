"""One Hessian problem: a model's parameters as flat rows, the batched
HVP at its weights (or at stacked points), the check of its second
derivative, and on a GPU the number of probes a trace pass can hold."""
from __future__ import annotations

import copy
import itertools
import warnings
from typing import List, Optional

import torch

from .. import ops
from .._checks import group_offsets_for_sizes
from .common import check_precision, checked_loss, default_loss, resolve_device, restriction_masks, to_device, trainable
from .compiled import check_compile
from .hvp import HVP, check_hvp_mode, finite_difference_gap
from .loaders import check_loader
from .planner import free_device_bytes, items_per_pass, measure_activation_bytes

# A central difference in float32 agrees with H v to ~1e-3 on smooth losses;
# a wrong second derivative is off by order one.
FD_GAP_WARN = 0.05


def refuse_train_mode_batch_norm(model: torch.nn.Module) -> None:
    """Batch norm in train mode normalises by each batch's own statistics and
    updates its running ones on every pass: the batched products cannot
    run it, and the Hessian of such a loss changes with the batch split."""
    found = [n or type(model).__name__ for n, m in model.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
    if found:
        raise ValueError(f"batch norm in train mode ({', '.join(found[:3])}): the Hessian statistics need the "
                         "model's loss as one function of its weights; call model.eval() first (it uses the "
                         "running statistics)")


class Problem:
    """The model's parameters as flat [R, N] rows and back, with the HVP."""

    def __init__(self, model, loss_fn, batches, points, restrict, device, precision, compile=False,
                 hvp_mode="reverse-over-reverse"):
        check_precision(precision)
        check_hvp_mode(hvp_mode)
        self.compile_mode = check_compile(compile)
        check_loader(batches, "batches", one_shot=True)  # read once, here
        batches = list(batches)
        if not batches:
            raise ValueError("batches is empty; pass at least one batch")
        loss_fn = loss_fn or default_loss
        device = resolve_device(device, model)
        refuse_train_mode_batch_norm(model)
        # The passes must leave the caller's model as it was. With train-mode batch norm refused, torch's
        # modules write no buffer in a forward, so only a move to another device needs a copy; a model already
        # there is used as is, which spares large models (and estimate_llc's own copy) a second copy.
        if any(t.device != device for t in itertools.chain(model.parameters(), model.buffers())):
            model = copy.deepcopy(model).to(device)
        named = trainable(model)
        if not named:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.numel = sum(self.sizes)
        self.device = device
        centers = [p.detach().float().contiguous() for _, p in named]
        masks = restriction_masks(named, restrict)
        self.mask_flat = None if masks is None else torch.cat([m.reshape(-1) for m in masks]).float()
        self.free = self.numel if masks is None else int(self.mask_flat.sum())
        with torch.no_grad():
            checked_loss(loss_fn(model, to_device(batches[0], device)), "at the given weights")
        self.points = None
        if points is not None:
            self.points = [torch.as_tensor(points[n]).to(device, torch.float32).contiguous() for n in self.names]
            c = self.points[0].shape[0]
            for n, p, s in zip(self.names, self.points, self.shapes):
                if tuple(p.shape) != (c,) + s:
                    raise ValueError(f"points[{n!r}] has shape {tuple(p.shape)}; expected {(c,) + s}")
        self.num_points = 1 if self.points is None else self.points[0].shape[0]
        self.hvp = HVP(model, loss_fn, batches, self.names, centers, precision=precision, compile=self.compile_mode,
                       mode=hvp_mode)
        gap = finite_difference_gap(self.hvp, self.probes(1, 0, stream=2**62), enough=FD_GAP_WARN / 10)
        if gap > FD_GAP_WARN:
            warnings.warn(f"llcfast: Hessian-vector products disagree with a finite difference of gradients "
                          f"(relative gap {gap:.2g}); the loss may not be twice differentiable (a custom "
                          "autograd.Function marked once_differentiable, or ops whose second derivative is "
                          "not defined), so these statistics may be wrong", RuntimeWarning, stacklevel=3)

    def unflatten(self, flat: torch.Tensor) -> List[torch.Tensor]:  # [R, N] -> [R, *shape] views
        out, off = [], 0
        for s, n in zip(self.shapes, self.sizes):
            out.append(flat[:, off:off + n].view((flat.shape[0],) + s))
            off += n
        return out

    def matvec(self, flat: torch.Tensor) -> torch.Tensor:  # [R, N] -> [R, N], rows grouped by point
        if self.mask_flat is not None:
            flat = flat * self.mask_flat
        out = self.hvp(self.unflatten(flat), self.points)
        result = torch.cat([o.reshape(flat.shape[0], -1) for o in out], dim=1)
        return result * self.mask_flat if self.mask_flat is not None else result

    def probes(self, rows: int, seed: int, stream: int, row_offset: int = 0) -> List[torch.Tensor]:
        """Rademacher probes row_offset.. of ``stream``, as [R, *shape] tensors (masked)."""
        offsets = group_offsets_for_sizes(self.sizes)
        out = []
        for i, (s, n) in enumerate(zip(self.shapes, self.sizes)):
            v = ops.rademacher(rows, n, seed=seed, stream=stream, row_offset=row_offset, group_offset=offsets[i],
                               device=self.device)
            out.append(v.view((rows,) + s))
        if self.mask_flat is not None:
            masks = self.unflatten(self.mask_flat[None])
            out = [v * m for v, m in zip(out, masks)]
        return out


CPU_PROBES_PER_PASS = 4
PLAN_STREAM = 2**62 + 1  # the measuring passes' probes: a stream no statistic draws from


def pass_peak_bytes(prob: Problem, probes: int) -> Optional[int]:
    """Device memory one trace pass of ``probes`` probes per point takes
    above what is allocated before it (CUDA); None where it is not measured."""
    if prob.device.type != "cuda":
        return None
    vecs = prob.probes(probes * prob.num_points, 0, stream=PLAN_STREAM)
    return measure_activation_bytes(lambda: prob.hvp(vecs, prob.points, eager=True), prob.device)


def plan_probes(prob: Problem, num_probes: int):
    """(probes per pass, the plan or None). On a GPU, two measured passes
    (1 and 2 probes per point) split a pass's memory into what every probe
    adds and what the pass shares (the primal forward and backward), and
    the pass takes as many probes as fit: trying all of them and halving on
    out-of-memory would repeat the work each failed pass had done. Elsewhere
    CPU_PROBES_PER_PASS."""
    one = pass_peak_bytes(prob, 1) if num_probes > 1 else None
    if one is None:
        return min(num_probes, CPU_PROBES_PER_PASS) if prob.device.type == "cpu" else num_probes, None
    two = pass_peak_bytes(prob, 2)
    added = max(two - one, 0)
    # The trace loop also holds each probe, and its copy stacked by point.
    per_probe = added + 2 * 4 * prob.numel * prob.num_points
    shared = max(one - added, 0)
    free = free_device_bytes(prob.device)
    n = items_per_pass(num_probes, shared, per_probe, free, item="Hutchinson probe", what=str(prob.device),
                       lower="use fewer or smaller batches, precision='bf16', restrict= to fewer parameters, or "
                             "fewer points")
    return n, dict(probes_per_pass=n, bytes_per_probe=per_probe, shared_bytes=shared, free_bytes=free)


def compiled_config(prob: Problem) -> dict:
    """config["compile"]: whether the passes ran compiled to the end, where asked for."""
    return {} if prob.compile_mode is None else {"compile": prob.hvp.compiled}
