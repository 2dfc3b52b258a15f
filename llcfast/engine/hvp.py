"""Batched Hessian-vector products: many vectors (probes) at one or many
points (e.g. SGLD chain positions) per pass, reverse-over-reverse
(torch.func.vjp of grad) or forward-over-reverse (jvp of grad), vmapped
over the vectors, and over the points.

Vectors and points are lists of tensors in the model's parameter order:
vectors [R, *shape] with R = points x vectors-per-point (rows grouped by
point), points [C, *shape] or None for the model's own weights.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.func import grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .common import first_line, map_tensors, precision_context, to_device
from .compiled import GuardedCompile
from .functional import chain_loss

# Under vmap over vectors, the primal forward and backward run once per pass
# in either mode, and per vector either a backward through the gradient's
# graph (reverse-over-reverse) or a tangent forward-and-backward (forward-
# over-reverse). On the paper's LM the first moves 6.7 GB a vector against
# 8.9 GB and holds 0.47 against 0.72 GB (bench_traffic; CPU peak memory);
# on 2 CPU cores, 4 vectors took 0.41 against 0.61 s (LR transformer) and
# 8.8 against 9.9 s (LM).
HVP_MODES = ("reverse-over-reverse", "forward-over-reverse")
OTHER_MODE = {HVP_MODES[0]: HVP_MODES[1], HVP_MODES[1]: HVP_MODES[0]}


def check_hvp_mode(mode: str) -> str:
    if mode not in HVP_MODES:
        raise ValueError(f"hvp_mode must be one of {HVP_MODES}, got {mode!r}")
    return mode


def _lacks_a_derivative(exc: BaseException) -> bool:
    """Whether ``exc`` says an op has no forward-mode or second derivative
    (rather than the loss failing for some other reason)."""
    text = str(exc)
    return any(k in text for k in ("forward AD", "jvp", "not implemented", "derivative for"))


class HVP:
    """hvp(vectors, points=None) -> H(point) @ vector for every row, the
    Hessian of the mean loss over ``batches``. ``precision`` as in
    estimate_llc: the passes run with full fp32 matmuls, TF32 matmuls, or
    under bf16 autocast; parameters, vectors and products stay fp32.
    ``compile``: a torch.compile mode for the passes (Inductor fuses the
    elementwise tangent work around the matmuls), or None. ``mode``: one
    of HVP_MODES, the other taken where an op lacks the first's derivative."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, batches: Sequence, names: Sequence[str],
                 centers: Sequence[torch.Tensor], *, rows_per_pass: Optional[int] = None, precision: str = "fp32",
                 compile: Optional[str] = None, mode: str = "reverse-over-reverse",
                 retain_graph: Optional[bool] = None):
        self._loss = chain_loss(model, loss_fn, names)
        self._batches = [to_device(b, centers[0].device) for b in batches]
        self._centers = tuple(centers)
        self.rows_per_pass = rows_per_pass
        self.precision = precision
        self.mode = check_hvp_mode(mode)
        self._switched = False  # to the other mode, once, where an op lacks this one's derivative
        self.count = 0  # HVPs computed (rows x batches count once per row)
        self._compile = GuardedCompile(compile, "the Hessian-vector products of this loss")
        self._fns = {}
        # On a CPU, reverse-over-reverse products run one at a time through the
        # retained graph of the gradient (RetainedGraph) unless compiled;
        # ``retain_graph`` says otherwise (the tests hold the two ways together).
        self._retain = (self._centers[0].device.type == "cpu" and compile is None) if retain_graph is None \
            else retain_graph
        self._graph: Optional[Tuple[str, "RetainedGraph"]] = None  # (precision, graph) kept at the weights

    @property
    def compiled(self) -> bool:
        """Whether the passes run compiled (True until torch.compile gave up)."""
        return self._compile.active

    def __call__(self, vectors: List[torch.Tensor], points: Optional[List[torch.Tensor]] = None, *,
                 eager: bool = False) -> List[torch.Tensor]:
        """``eager``: skip torch.compile for this call, and leave it out of
        ``count`` (checks and memory measurements: not the caller's work, and
        their shapes would each cost a compilation)."""
        rows = vectors[0].shape[0]
        per_point = rows if points is None else rows // points[0].shape[0]
        total = None
        # The fused attention kernels (flash, memory-efficient) have neither
        # forward-mode nor second derivatives; the math backend computes the
        # same attention from differentiable ops.
        with precision_context(self.precision, self._centers[0].device), sdpa_kernel(SDPBackend.MATH):
            for batch in self._batches:
                out = self._adaptive(vectors, points, per_point, batch, eager)
                total = out if total is None else [t + o for t, o in zip(total, out)]
        if not eager:
            self.count += rows
        scale = 1.0 / len(self._batches)
        return [t * scale for t in total] if len(self._batches) > 1 else total

    def _adaptive(self, vectors, points, per_point, batch, eager):
        """Halves the rows per pass on out-of-memory until a pass fits."""
        while True:
            try:
                return self._one_batch(vectors, points, per_point, batch, eager)
            except torch.OutOfMemoryError as exc:
                current = self.rows_per_pass or per_point
                if current <= 1:
                    # At C stacked points a pass holds at least one product per point.
                    what, fewer = (("one Hessian-vector product at a time", "") if points is None else
                                   (f"one Hessian-vector product per point at a time ({points[0].shape[0]} "
                                    "points)", "fewer points, "))
                    raise MemoryError(
                        f"{what} does not fit in device memory ({first_line(exc, 'out of memory')}); use "
                        f"{fewer}fewer or smaller batches, restrict= to fewer parameters, or a larger device") from exc
                self.rows_per_pass = max(1, current // 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def _one_batch(self, vectors, points, per_point, batch, eager):
        try:
            return self._run(vectors, points, per_point, batch, self.mode, eager)
        except torch.OutOfMemoryError:
            raise  # OutOfMemoryError is a RuntimeError; _adaptive shrinks the pass instead
        except (NotImplementedError, RuntimeError) as exc:
            if "randomness" in str(exc):
                raise ValueError("the loss draws random numbers (dropout in a model left in train mode, for "
                                 "instance), so it has no Hessian to measure; call model.eval() first, or make "
                                 "the loss deterministic") from exc
            if self._switched or not _lacks_a_derivative(exc):
                raise _not_twice_differentiable(exc) from exc
            other = OTHER_MODE[self.mode]
            warnings.warn(f"llcfast: {self.mode} Hessian-vector products fail on an op of this loss "
                          f"({first_line(exc)}); using {other} ones", RuntimeWarning, stacklevel=4)
            self.mode, self._switched = other, True
            try:
                return self._run(vectors, points, per_point, batch, self.mode, eager)
            except torch.OutOfMemoryError:
                raise
            except (NotImplementedError, RuntimeError) as exc2:
                raise _not_twice_differentiable(exc2) from exc2

    def _run(self, vectors, points, per_point, batch, mode, eager=False):
        if mode == "reverse-over-reverse" and self._retain:
            return self._retained(vectors, points, batch)
        key = (mode, self.rows_per_pass, points is None)
        if key not in self._fns:
            fn = _pass(self._loss, mode, self.rows_per_pass, points is None)
            self._fns[key] = (fn, self._compile.wrap(fn))
        fn = self._fns[key][0 if eager else 1]
        return fn(self._centers if points is None else tuple(points), tuple(vectors), batch)

    def _retained(self, vectors, points, batch) -> List[torch.Tensor]:
        """H v row by row through the retained graph of the gradient at each
        point; at the model's weights with one batch the graph is kept from
        call to call (Lanczos and power iteration ask for one product a step),
        for the precision it was built under (the derivative check runs in
        fp32 whatever the statistic's precision)."""
        keep = points is None and len(self._batches) == 1
        at = [self._centers] if points is None else [tuple(p[c] for p in points) for c in range(points[0].shape[0])]
        per_point = vectors[0].shape[0] // len(at)
        out = [torch.empty_like(v) for v in vectors]
        for c, params in enumerate(at):
            if keep and self._graph is not None and self._graph[0] == self.precision:
                graph = self._graph[1]
            else:
                graph = RetainedGraph(self._loss, params, batch)
                if keep:
                    self._graph = (self.precision, graph)
            for r in range(c * per_point, (c + 1) * per_point):
                for o, h in zip(out, graph.hvp([v[r] for v in vectors])):
                    o[r].copy_(h)
        return out


class RetainedGraph:
    """The gradient at ``params`` computed once with create_graph=True; each
    product H v is then one backward through it (PyHessian's way). Under
    vmap the primal forward and backward run again in every pass, which on
    a CPU costs more than batching probes saves: on 2 cores a PyHessian-style
    loop took 1.32-1.74 s for a 16-probe trace of the LR transformer against
    2.27-3.45 s in vmapped passes (LM, 8 probes: 9.2-11.7 against 17.4-24.8 s).
    Through this class, with llcfast's derivative check, 2.13-2.35 s."""

    def __init__(self, loss: Callable, params, batch):
        self.leaves = tuple(p.detach().clone().requires_grad_() for p in params)
        value = loss(self.leaves, batch)
        if not torch.isfinite(value.detach()).all():  # NaN would also fail the equality check below
            raise ValueError(f"the loss is {float(value.detach())} at these weights; its Hessian is not defined "
                             "there (check the model and the batch for non-finite values)")
        # Where vmap's randomness="error" would say it, a second evaluation must
        # match the first; with grad on, as the first, so that modules with a
        # no-grad fast path (nn.MultiheadAttention) take the same one.
        if not torch.equal(loss(self.leaves, batch).detach(), value.detach()):
            raise RuntimeError("the loss uses randomness: two evaluations at the same weights differ")
        grads = torch.autograd.grad(value, self.leaves, create_graph=True, allow_unused=True)
        # Gradients that do not depend on the parameters (a loss linear in them) have zero products.
        self.live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self.grads = [grads[i] for i in self.live]

    def hvp(self, vector: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        zeros = [torch.zeros_like(p) for p in self.leaves]
        if not self.live:
            return zeros
        hv = torch.autograd.grad(self.grads, self.leaves, grad_outputs=[vector[i] for i in self.live],
                                 retain_graph=True, allow_unused=True)
        return [h if h is not None else z for h, z in zip(hv, zeros)]


def _pass(loss: Callable, mode: str, chunk: Optional[int], at_centers: bool) -> Callable:
    """(params, vectors, batch) -> [H(params) v for each row v]: at one set
    of params ([*shape] each), or at C stacked points ([C, *shape]) with the
    rows grouped by point. Everything it reads comes in as an argument, so
    torch.compile can reuse its code from batch to batch."""

    def one(params, vec, batch):
        def grad_at(p):
            return grad(lambda q: loss(q, batch))(p)

        if mode == "forward-over-reverse":
            return jvp(grad_at, (params,), (vec,))[1]
        return vjp(grad_at, params)[1](vec)[0]

    inner = vmap(one, in_dims=(None, 0, None), chunk_size=chunk)
    if at_centers:
        return lambda params, vecs, batch: list(inner(params, vecs, batch))

    def at_points(points, vecs, batch):
        c = points[0].shape[0]
        grouped = tuple(v.view((c, v.shape[0] // c) + tuple(v.shape[1:])) for v in vecs)
        out = vmap(inner, in_dims=(0, 0, None))(points, grouped, batch)
        return [o.reshape(v.shape) for o, v in zip(out, vecs)]

    return at_points


# Step sizes relative to |w|/|v| by precision: float64 gradients allow steps
# small enough that few ReLU-like kinks lie within them; float32 ones need
# larger steps to stay above rounding.
_FD_STEPS = {torch.float64: (1e-6, 1e-7, 1e-8), torch.float32: (1e-2, 2.5e-3, 6e-4)}


def finite_difference_gap(hvp: "HVP", vector: List[torch.Tensor], enough: float = 0.0) -> float:
    """Relative gap between H v and central differences of gradients
    (g(w + h v) - g(w - h v)) / 2h at the model's weights, ``vector`` a list
    of [1, *shape], the smallest over three shrinking steps h. torch.func
    silently ignores once_differentiable, so a loss whose second derivative
    is wrong shows up only here; such a gap stays as h shrinks, while the gap
    from piecewise-linear activations (a difference whose step crosses a
    ReLU kink) shrinks with h. Gradients are taken in float64 where the model
    runs in it, else in float32; H v in full fp32 whatever hvp's precision,
    since the check is of the derivative, not of rounding. A gap at or below
    ``enough`` ends the check early (a smooth loss: one step, two gradients
    rather than six)."""
    precision, hvp.precision = hvp.precision, "fp32"
    try:
        exact = [o[0].double() for o in hvp(vector, eager=True)]
    finally:
        hvp.precision = precision
    scale_exact = math.sqrt(sum(float((b ** 2).sum()) for b in exact))
    norm_w = math.sqrt(sum(float((c.double() ** 2).sum()) for c in hvp._centers))
    norm_v = math.sqrt(sum(float((v.double() ** 2).sum()) for v in vector))
    unit = (1.0 + norm_w) / max(norm_v, 1e-30)

    def gaps(dtype):
        centers = [c.to(dtype) for c in hvp._centers]
        direction = [v[0].to(dtype) for v in vector]
        batches = hvp._batches if dtype == torch.float32 else [
            map_tensors(b, lambda t: t.double() if t.is_floating_point() else t) for b in hvp._batches]

        def mean_grad(shift: float):
            params = tuple(c + shift * v for c, v in zip(centers, direction))
            total = None
            for batch in batches:
                g = grad(lambda p: hvp._loss(p, batch))(params)
                total = g if total is None else tuple(a + b for a, b in zip(total, g))
            return [t.double() / len(batches) for t in total]

        for rel in _FD_STEPS[dtype]:
            h = rel * unit
            fd = [(a - b) / (2 * h) for a, b in zip(mean_grad(h), mean_grad(-h))]
            diff = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(fd, exact)))
            scale = scale_exact + math.sqrt(sum(float((a ** 2).sum()) for a in fd))
            yield diff / max(scale, 1e-30)

    def smallest(dtype):
        best = math.inf
        for gap in gaps(dtype):
            best = min(best, gap)
            if best <= enough:
                break
        return best

    try:
        return smallest(torch.float64)
    except (RuntimeError, TypeError):  # a model that cannot run in float64 (fixed-dtype buffers, kernels)
        return smallest(torch.float32)


def _not_twice_differentiable(exc: Exception) -> ValueError:
    return ValueError(f"the loss is not twice differentiable here, so Hessian-vector products fail "
                      f"({type(exc).__name__}: {first_line(exc)}). "
                      "Common causes: in-place ops on tensors autograd needs (use out-of-place ops), .detach() or "
                      "non-differentiable ops (argmax, integer casts) on the path from parameters to loss.")
