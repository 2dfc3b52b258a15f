"""Hessian statistics against the exact Hessian of small models; batched
HVPs against one-at-a-time; probe and dot kernels against their twins."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn
from torch.func import functional_call

import llcfast
from llcfast import ops, reference
from llcfast.engine.hvp import HVP
from conftest import requires_extension
from llc_models import TinyTransformer, gpt2_batches, mlp, mse, tiny_gpt2, token_loss


def exact_hessian(model, loss_fn, batches):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in named]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named]).double()

    def loss(flat):
        ps, off = {}, 0
        for (n, _), s in zip(named, shapes):
            k = math.prod(s)
            ps[n] = flat[off:off + k].view(s).float()
            off += k
        wrapped = lambda *a, **kw: functional_call(model, ps, a, kw)  # noqa: E731
        return sum(loss_fn(_Call(wrapped), b) for b in batches).double() / len(batches)

    return torch.autograd.functional.hessian(loss, flat0)


class _Call:
    """Stands in for the model inside loss_fn with substituted parameters."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *a, **kw):
        return self.fn(*a, **kw)


class Quadratic(nn.Module):
    """L(w) = 1/2 w^T diag(spectrum) w in a random rotation: known spectrum."""

    def __init__(self, spectrum, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(len(spectrum), len(spectrum), generator=g, dtype=torch.float64))
        self.register_buffer("h", (q * torch.tensor(spectrum, dtype=torch.float64)) @ q.T)
        self.w = nn.Parameter(0.1 * torch.randn(len(spectrum), generator=g))

    def forward(self, _):
        w = self.w.double()
        return (0.5 * w @ self.h @ w).float()


def quad_loss(model, batch):
    return model(batch)


def small_cases():
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = torch.sin(x.sum(-1))
    tokens = torch.randint(0, 11, (8, 12), generator=torch.Generator().manual_seed(1))
    return {
        "mlp": (mlp(), mse, [(x[:32], y[:32]), (x[32:], y[32:])]),
        "transformer": (TinyTransformer(d=8, layers=1), token_loss, [(tokens,)]),
    }


@pytest.mark.parametrize("case", ["mlp", "transformer"])
def test_trace_within_its_standard_error_and_eigs_exact(case):
    model, loss_fn, batches = small_cases()[case]
    h = exact_hessian(model, loss_fn, batches)
    exact = torch.linalg.eigvalsh(h)
    t = llcfast.hessian_trace(model, loss_fn, batches, num_probes=400, probes_per_pass=150, seed=1)
    assert abs(t.trace[0] - float(h.trace())) < 4 * t.std_error[0], (t.trace, float(h.trace()), t.std_error)
    assert t.per_probe.shape == (1, 400) and t.num_hvps == 400
    e = llcfast.hessian_eigs(model, loss_fn, batches, k=3, tol=1e-7, max_iter=200)
    np.testing.assert_allclose(e.values[0], exact.flip(0)[:3].numpy(), rtol=1e-4, atol=1e-4 * float(exact.abs().max()))
    s = llcfast.hessian_eigs(model, loss_fn, batches, k=2, which="smallest", tol=1e-7, max_iter=200)
    np.testing.assert_allclose(s.values[0], exact[:2].numpy(), rtol=1e-4, atol=1e-4 * float(exact.abs().max()))


def test_hutchinson_is_exact_in_expectation():
    """For Rademacher probes E[v^T H v] = tr H and Var = 2 sum_{i != j} H_ij^2:
    the mean over many seeds converges at exactly that rate."""
    model, loss_fn, batches = small_cases()["mlp"]
    h = exact_hessian(model, loss_fn, batches)
    off = h - torch.diag(torch.diag(h))
    sd_per_probe = math.sqrt(2 * float((off ** 2).sum()))
    runs = [llcfast.hessian_trace(model, loss_fn, batches, num_probes=50, seed=s).trace[0] for s in range(20)]
    se = sd_per_probe / math.sqrt(50 * 20)
    assert abs(np.mean(runs) - float(h.trace())) < 4 * se
    # The reported standard error estimates the true one.
    single = llcfast.hessian_trace(model, loss_fn, batches, num_probes=1000, seed=99)
    assert single.std_error[0] == pytest.approx(sd_per_probe / math.sqrt(1000), rel=0.15)


def test_known_spectrum_quadratic_and_its_density():
    spectrum = [10.0] * 3 + [4.0] * 5 + [1.0] * 12 + [0.0] * 20
    model = Quadratic(spectrum)
    batches = [None]
    e = llcfast.hessian_eigs(model, quad_loss, batches, k=4, tol=1e-8, max_iter=60, return_vectors=True)
    np.testing.assert_allclose(e.values[0], [10, 10, 10, 4], rtol=1e-4)
    v = e.vectors[0]["w"][0].double()
    assert float(v @ model.h @ v / (v @ v)) == pytest.approx(10.0, rel=1e-4)
    s = llcfast.hessian_spectrum(model, quad_loss, batches, num_runs=64, num_steps=40, seed=3)
    assert np.allclose(s.weights.sum(-1), 1.0)
    grid = np.linspace(-2, 12, 4001)
    dens = s.density(grid, sigma=0.05)
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only the old name
    assert trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-3)
    for value, count in ((10.0, 3), (4.0, 5), (1.0, 12), (0.0, 20)):
        near = np.abs(s.nodes - value) < 0.05
        assert (s.weights * near).sum(-1).mean() == pytest.approx(count / 40, abs=0.06), value


def test_points_give_each_point_its_own_hessian():
    """At C stacked points (e.g. SGLD chain positions) the statistics match
    computing at each point on its own."""
    model, loss_fn, batches = small_cases()["mlp"]
    g = torch.Generator().manual_seed(4)
    points = {n: p.detach() + 0.3 * torch.randn((3,) + tuple(p.shape), generator=g)
              for n, p in model.named_parameters()}
    e = llcfast.hessian_eigs(model, loss_fn, batches, k=2, tol=1e-8, max_iter=200, points=points)
    t = llcfast.hessian_trace(model, loss_fn, batches, num_probes=30, points=points)
    for c in range(3):
        at_c = mlp()
        with torch.no_grad():
            for n, p in at_c.named_parameters():
                p.copy_(points[n][c])
        exact = torch.linalg.eigvalsh(exact_hessian(at_c, loss_fn, batches)).flip(0)[:2]
        np.testing.assert_allclose(e.values[c], exact.numpy(), rtol=1e-4, atol=1e-5)
        single = llcfast.hessian_trace(at_c, loss_fn, batches, num_probes=30).trace[0]
        if c == 0:
            assert single == pytest.approx(t.trace[0], rel=1e-5)  # point 0 draws probe stream 0, as a single model
    assert len(set(np.round(t.trace, 6))) == 3



@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_the_readme_recipe_for_the_hessian_where_the_chains_ended(backend):
    model, loss_fn, batches = small_cases()["mlp"]
    steps, last = 5, {}

    def keep_last(step, chains, loss, params):
        if step == steps - 1:
            for name, p in params.items():
                last.setdefault(name, {}).update({c: p[i].clone() for i, c in enumerate(chains)})

    kw = dict(chain_group=2) if backend == "fast" else {}
    llcfast.estimate_llc(model, batches, loss_fn, num_chains=4, num_draws=steps, epsilon=1e-3, nbeta=10.0, num_burnin=0,
                         callbacks=[keep_last], backend=backend, progress=False, **kw)
    points = {name: torch.stack([rows[c] for c in sorted(rows)]) for name, rows in last.items()}
    assert all(len(rows) == 4 for rows in last.values())
    t = llcfast.hessian_trace(model, loss_fn, batches, points=points, num_probes=4)
    assert t.trace.shape == (4,)
    assert not torch.equal(points["0.weight"][0], points["0.weight"][3])  # the chains moved apart
    at_0 = mlp()
    with torch.no_grad():
        for n, p in at_0.named_parameters():
            p.copy_(points[n][0])
    # point 0 draws probe stream 0, as a single model does: the same estimate at chain 0's weights
    assert llcfast.hessian_trace(at_0, loss_fn, batches, num_probes=4).trace[0] == pytest.approx(t.trace[0], rel=1e-5)

def test_restricted_hessian_is_the_sub_block():
    model, loss_fn, batches = small_cases()["mlp"]
    h = exact_hessian(model, loss_fn, batches)
    sizes = [p.numel() for p in model.parameters()]
    start = sum(sizes[:2])  # parameters "2.weight", "2.bias" come after "0.weight", "0.bias"
    block = h[start:, start:]
    e = llcfast.hessian_eigs(model, loss_fn, batches, k=1, tol=1e-8, restrict=["2.*"])
    assert e.values[0, 0] == pytest.approx(float(torch.linalg.eigvalsh(block)[-1]), rel=1e-4)
    t = llcfast.hessian_trace(model, loss_fn, batches, num_probes=300, restrict=["2.*"])
    assert abs(t.trace[0] - float(block.trace())) < 4 * t.std_error[0] + 1e-6


def transformer_hvp_case(rows):
    """(model, loss_fn, batches, names, centers, vectors) for HVP on the tiny
    transformer, with ``rows`` random vectors."""
    model, loss_fn, batches = small_cases()["transformer"]
    names = [n for n, _ in model.named_parameters()]
    centers = [p.detach() for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    vecs = [torch.randn((rows,) + tuple(p.shape), generator=g) for p in centers]
    return model, loss_fn, batches, names, centers, vecs


def test_batched_hvp_equals_one_at_a_time():
    model, loss_fn, batches, names, centers, vecs = transformer_hvp_case(6)
    vmapped = dict(retain_graph=False)  # the vmapped passes GPUs run
    batched = HVP(model, loss_fn, batches, names, centers, **vmapped)(vecs)
    chunked = HVP(model, loss_fn, batches, names, centers, rows_per_pass=4, **vmapped)(vecs)
    for r in range(6):
        one = HVP(model, loss_fn, batches, names, centers, **vmapped)([v[r:r + 1] for v in vecs])
        for b, c1, o in zip(batched, chunked, one):
            scale = float(o.abs().max()) + 1e-12
            assert float((b[r] - o[0]).abs().max()) <= 64 * torch.finfo(torch.float32).eps * scale
            assert float((c1[r] - o[0]).abs().max()) <= 64 * torch.finfo(torch.float32).eps * scale


@pytest.mark.parametrize("n_batches", [1, 2])
def test_the_retained_graph_gives_the_vmapped_products(n_batches):
    """CPUs take H v one vector at a time through the gradient's retained
    graph; it equals the vmapped passes, at the weights (the graph kept from
    call to call with one batch) and at stacked points."""
    model, loss_fn, batches, names, centers, vecs = transformer_hvp_case(4)
    if n_batches > 1:  # a second batch: the same sequences reversed
        batches = [batches[0], tuple(t.flip(-1) for t in batches[0])]
    retained = HVP(model, loss_fn, batches, names, centers)
    vmapped = HVP(model, loss_fn, batches, names, centers, retain_graph=False)
    g = torch.Generator().manual_seed(1)
    points = [c + 0.05 * torch.randn((2,) + tuple(c.shape), generator=g) for c in centers]
    for call in range(2):  # the second call at the weights reuses the graph where one batch is kept
        rows = [v[2 * call:2 * call + 2] for v in vecs]
        for a, b in zip(retained(rows), vmapped(rows)):
            assert float((a - b).abs().max()) <= 64 * torch.finfo(torch.float32).eps * (float(b.abs().max()) + 1e-12)
    assert (retained._graph is not None) == (n_batches == 1)
    for a, b in zip(retained(vecs, points), vmapped(vecs, points)):
        assert float((a - b).abs().max()) <= 64 * torch.finfo(torch.float32).eps * (float(b.abs().max()) + 1e-12)


def test_a_kept_graph_serves_only_its_own_precision():
    """The derivative check asks for an fp32 product first; a bf16 statistic
    must then get bf16 products, not the fp32 graph kept from that call."""
    model, loss_fn, batches, names, centers, vecs = transformer_hvp_case(2)
    fresh = HVP(model, loss_fn, batches, names, centers, precision="bf16")(vecs)
    hvp = HVP(model, loss_fn, batches, names, centers, precision="fp32")
    fp32 = hvp(vecs)
    hvp.precision = "bf16"
    again = hvp(vecs)
    for a, b in zip(again, fresh):
        assert torch.equal(a, b)
    assert any(not torch.equal(f, b) for f, b in zip(fp32, fresh))


def test_out_of_memory_shrinks_the_pass_and_is_never_called_a_differentiability_problem(monkeypatch):
    """A pass that does not fit is retried with half the rows (the result is
    unchanged); at one row the error is about memory, not about the loss."""
    model, loss_fn, batches, names, centers, vecs = transformer_hvp_case(8)
    expected = HVP(model, loss_fn, batches, names, centers)(vecs)
    real_run = HVP._run
    seen = []

    def run_fitting_two_rows(self, vectors, points, per_point, batch, mode, eager=False):
        seen.append(self.rows_per_pass)
        if self.rows_per_pass is None or self.rows_per_pass > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.60 GiB.")
        return real_run(self, vectors, points, per_point, batch, mode, eager)

    monkeypatch.setattr(HVP, "_run", run_fitting_two_rows)
    hvp = HVP(model, loss_fn, batches, names, centers)
    got = hvp(vecs)
    assert seen[:3] == [None, 4, 2] and hvp.rows_per_pass == 2
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)

    def never_fits(self, *args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.60 GiB.")

    monkeypatch.setattr(HVP, "_run", never_fits)
    with pytest.raises(MemoryError, match="one Hessian-vector product at a time does not fit in device memory"
                                          ".*12.60 GiB"):
        HVP(model, loss_fn, batches, names, centers)(vecs)
    points = [c.unsqueeze(0).repeat((2,) + (1,) * c.dim()) for c in centers]  # 2 points x 4 rows each
    with pytest.raises(MemoryError, match=r"one Hessian-vector product per point at a time \(2 points\) does not "
                                          r"fit .*; use fewer points, fewer or smaller batches"):
        HVP(model, loss_fn, batches, names, centers)(vecs, points)


def test_trace_passes_are_planned_from_measured_memory(monkeypatch):
    """Where device memory is measured, a pass holds as many probes as fit:
    the measured pass of 1 and 2 probes split into what each probe adds and
    what the pass shares; the per-probe values are those of unplanned passes,
    and a probe that cannot fit is a MemoryError saying what to lower."""
    import llcfast.engine.hessian_problem as hessian_module
    model, loss_fn, batches = small_cases()["transformer"]
    numel = sum(p.numel() for p in model.parameters())
    measured = []

    def pass_bytes(prob, probes):  # stands in for the CUDA measurement; runs the pass it measures
        measured.append(probes)
        vecs = prob.probes(probes, 0, stream=hessian_module.PLAN_STREAM)
        prob.hvp(vecs, eager=True)
        return GiB_ + probes * (GiB_ // 8)

    GiB_ = 2**30
    monkeypatch.setattr(hessian_module, "pass_peak_bytes", pass_bytes)
    monkeypatch.setattr(hessian_module, "free_device_bytes", lambda device: 2 * GiB_)
    planned = llcfast.hessian_trace(model, loss_fn, batches, num_probes=40, seed=3)
    per_probe = GiB_ // 8 + 2 * 4 * numel
    expected = (int(2 * GiB_ * 0.85) - GiB_) // per_probe
    assert measured == [1, 2] and 1 < expected < 40
    assert planned.config["probes_per_pass"] == expected
    assert planned.config["memory_plan"] == dict(probes_per_pass=expected, bytes_per_probe=per_probe,
                                                 shared_bytes=GiB_, free_bytes=2 * GiB_)
    assert planned.num_hvps == 40  # the measuring passes are not counted
    whole = llcfast.hessian_trace(model, loss_fn, batches, num_probes=40, seed=3, probes_per_pass=40)
    np.testing.assert_allclose(planned.per_probe, whole.per_probe, rtol=1e-5, atol=1e-6)

    monkeypatch.setattr(hessian_module, "free_device_bytes", lambda device: GiB_)
    with pytest.raises(MemoryError, match=r"one Hutchinson probe needs about 1.1\d GiB .* but 1.00 GiB is free; "
                                          r"use fewer or smaller batches"):
        llcfast.hessian_trace(model, loss_fn, batches, num_probes=40)


class _SquareNoForwardMode(torch.autograd.Function):
    """x^2, twice differentiable in reverse mode, with no jvp."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x ** 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        return 2 * ctx.saved_tensors[0] * g


class _OnceDifferentiable(_SquareNoForwardMode):
    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _CubeNoDoubleBackward(torch.autograd.Function):
    """x^3 whose gradient op has a forward-mode derivative but no backward."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        return _CubeGrad.apply(ctx.saved_tensors[0], g)

    @staticmethod
    def jvp(ctx, x_dot):
        return 3 * ctx.saved_tensors[0] ** 2 * x_dot


class _CubeGrad(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, g):
        return 3 * x ** 2 * g

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("the derivative for _CubeGrad is not implemented")

    @staticmethod
    def jvp(ctx, x_dot, g_dot):
        x, g = ctx.saved_tensors
        out = 6 * x * x_dot * g
        return out if g_dot is None else out + 3 * x ** 2 * g_dot


@pytest.mark.parametrize("fn, power, lacking", [(_CubeNoDoubleBackward, 3, "reverse-over-reverse"),
                                                (_SquareNoForwardMode, 2, "forward-over-reverse")])
def test_an_op_lacking_one_modes_derivative_gets_the_other_mode(fn, power, lacking):
    """Each mode falls back to the other, with a warning naming the op's
    failure, and the statistics are the exact ones."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    batches = [(torch.randn(16, 3), torch.randn(16))]
    loss = lambda m, b: fn.apply(m(b[0]).squeeze(-1) - b[1]).mean()  # noqa: E731
    with pytest.warns(RuntimeWarning, match=f"{lacking} Hessian-vector products fail on an op of this loss"):
        e = llcfast.hessian_eigs(model, loss, batches, k=2, tol=1e-8, hvp_mode=lacking)
    assert e.config["hvp_mode"] != lacking
    plain = lambda m, b: ((m(b[0]).squeeze(-1) - b[1]) ** power).mean()  # noqa: E731
    exact = torch.linalg.eigvalsh(exact_hessian(model, plain, batches))
    np.testing.assert_allclose(e.values[0], exact.flip(0)[:2].numpy(), rtol=1e-4)


def test_hvp_modes_give_the_same_products():
    model, loss_fn, batches, names, centers, vecs = transformer_hvp_case(4)
    rr = HVP(model, loss_fn, batches, names, centers, mode="reverse-over-reverse")(vecs)
    fr = HVP(model, loss_fn, batches, names, centers, mode="forward-over-reverse")(vecs)
    for a, b in zip(rr, fr):
        assert float((a - b).abs().max()) <= 64 * torch.finfo(torch.float32).eps * (float(b.abs().max()) + 1e-12)
    with pytest.raises(ValueError, match="hvp_mode must be one of .*got 'double-backward'"):
        llcfast.hessian_trace(model, loss_fn, batches, hvp_mode="double-backward")


def test_a_loss_without_second_derivatives_is_explained():
    """torch.func ignores once_differentiable and returns a wrong second
    derivative; the finite-difference check catches it."""
    model = mlp()
    batches = [(torch.randn(8, 5), torch.randn(8))]
    loss = lambda m, b: _OnceDifferentiable.apply(m(b[0]).squeeze(-1) - b[1]).mean()  # noqa: E731
    with pytest.warns(RuntimeWarning, match="disagree with a finite difference of gradients"):
        llcfast.hessian_trace(model, loss, batches, num_probes=2)


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("case", ["mlp", "transformer"])
def test_smooth_losses_pass_the_finite_difference_check(case):
    model, loss_fn, batches = small_cases()[case]
    llcfast.hessian_trace(model, loss_fn, batches, num_probes=2)


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_relu_networks_pass_the_finite_difference_check(seed):
    """ReLU kinks inside the difference step once gave false alarms (relative
    gaps 0.11 to 0.5 on these models); the check now takes float64 gradients
    at steps small enough that few kinks lie within them."""
    from llcfast.pipeline.models import InContextRegression, regression_loss, sample_regression
    torch.manual_seed(seed)
    model = InContextRegression(task_dim=3, max_pairs=8, d_model=32, heads=2, mlp_width=32)
    with torch.no_grad():  # larger weights than at init: more units near their kinks
        for p in model.parameters():
            p.mul_(3.0)
    batch = sample_regression(256, pairs=8, task_dim=3, generator=torch.Generator().manual_seed(seed))
    llcfast.hessian_trace(model, regression_loss, [batch], num_probes=2)


def test_bad_input_is_explained():
    model, loss_fn, batches = small_cases()["mlp"]
    with pytest.raises(ValueError, match="k = 1000 exceeds the 85 parameters"):
        llcfast.hessian_eigs(model, loss_fn, batches, k=1000)
    with pytest.raises(ValueError, match="num_probes must be in"):
        llcfast.hessian_trace(model, loss_fn, batches, num_probes=0)
    with pytest.raises(ValueError, match="batches is empty"):
        llcfast.hessian_trace(model, loss_fn, [])
    with pytest.raises(ValueError, match="which must be 'largest' or 'smallest'"):
        llcfast.hessian_eigs(model, loss_fn, batches, which="middle")
    with pytest.raises(ValueError, match="method must be 'lanczos' or 'power'"):
        llcfast.hessian_eigs(model, loss_fn, batches, method="arnoldi")

    with pytest.raises(ValueError, match="precision must be one of .*'fp16'"):
        llcfast.hessian_trace(model, loss_fn, batches, precision="fp16")
    with pytest.raises(TypeError, match=r"batches is a tensor of shape \(4, 3\); pass a list of batches"):
        llcfast.hessian_trace(model, loss_fn, torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"restrict=\[\] selects no parameter element"):
        llcfast.hessian_trace(model, loss_fn, batches, restrict=[])
    one_shot = llcfast.hessian_trace(model, loss_fn, (b for b in batches), num_probes=4, progress=False)
    listed = llcfast.hessian_trace(model, loss_fn, list(batches), num_probes=4, progress=False)
    np.testing.assert_array_equal(one_shot.per_probe, listed.per_probe)  # a generator is read once, whole


@pytest.mark.parametrize("case", ["mlp", "transformer"])
def test_bf16_statistics_agree_with_fp32_within_the_probes_spread(case):
    """bf16 autocast rounds each product (unit roundoff 2^-8); with the same
    probes the trace may move by far less than its own standard error, and
    eigenvalues by a few bf16 roundoffs."""
    model, loss_fn, batches = small_cases()[case]
    full = llcfast.hessian_trace(model, loss_fn, batches, num_probes=64, seed=2)
    low = llcfast.hessian_trace(model, loss_fn, batches, num_probes=64, seed=2, precision="bf16")
    assert low.config["precision"] == "bf16"
    moved = np.abs(low.per_probe - full.per_probe)
    assert moved.max() > 0  # the passes did run in bf16
    assert moved.max() < 8 * 2.0 ** -8 * np.abs(full.per_probe).mean()
    assert abs(low.trace[0] - full.trace[0]) < 0.25 * full.std_error[0]
    e_full = llcfast.hessian_eigs(model, loss_fn, batches, k=2, tol=1e-6)
    e_low = llcfast.hessian_eigs(model, loss_fn, batches, k=2, tol=1e-3, precision="bf16")
    np.testing.assert_allclose(e_low.values, e_full.values, rtol=4 * 2.0 ** -8)
    s = llcfast.hessian_spectrum(model, loss_fn, batches, num_runs=2, num_steps=8, precision="bf16")
    assert s.config["precision"] == "bf16" and np.allclose(s.weights.sum(-1), 1.0)



class SdpaLM(nn.Module):
    """Causal attention through F.scaled_dot_product_attention, whose fused
    kernels have no forward-mode or second derivatives."""

    def __init__(self, vocab=11, d=8, heads=2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.unembed = nn.Linear(d, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        b, t, d = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.unembed(h + a.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("hvp_mode", ["reverse-over-reverse", "forward-over-reverse"])
def test_models_with_fused_attention_get_their_exact_hessian(hvp_mode):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    model = SdpaLM()
    batches = [(torch.randint(0, 11, (4, 10), generator=torch.Generator().manual_seed(3)),)]
    with sdpa_kernel(SDPBackend.MATH):  # the exact Hessian needs double backward too
        h = exact_hessian(model, token_loss, batches)
    exact = torch.linalg.eigvalsh(h)
    e = llcfast.hessian_eigs(model, token_loss, batches, k=2, tol=1e-7, max_iter=200, hvp_mode=hvp_mode)
    assert e.config["hvp_mode"] == hvp_mode  # no fallback to the other mode
    np.testing.assert_allclose(e.values[0], exact.flip(0)[:2].numpy(), rtol=1e-4)
    t = llcfast.hessian_trace(model, token_loss, batches, num_probes=200, seed=1, hvp_mode=hvp_mode)
    assert abs(t.trace[0] - float(h.trace())) < 4 * t.std_error[0]


def test_hugging_face_gpt2_with_its_default_attention():
    """transformers' GPT-2 uses scaled_dot_product_attention by default; its
    Hessian statistics equal those of the same weights with eager attention."""
    sdpa = tiny_gpt2()
    assert sdpa.config._attn_implementation == "sdpa"
    eager = tiny_gpt2()
    eager.config._attn_implementation = "eager"
    batches = gpt2_batches(n_batches=1)
    a = llcfast.hessian_trace(sdpa, None, batches, num_probes=8)
    b = llcfast.hessian_trace(eager, None, batches, num_probes=8, hvp_mode="forward-over-reverse")
    assert a.config["hvp_mode"] == "reverse-over-reverse" and b.config["hvp_mode"] == "forward-over-reverse"
    np.testing.assert_allclose(a.per_probe, b.per_probe, rtol=1e-4, atol=1e-4 * np.abs(b.per_probe).max())
    with pytest.raises(ValueError, match="draws random numbers .* call model.eval"):
        llcfast.hessian_trace(tiny_gpt2().train(), None, batches, num_probes=2)

def test_power_iteration_agrees_with_lanczos_and_needs_more_hvps():
    model, loss_fn, batches = small_cases()["mlp"]
    lz = llcfast.hessian_eigs(model, loss_fn, batches, k=1, tol=1e-6)
    pw = llcfast.hessian_eigs(model, loss_fn, batches, k=1, method="power", tol=1e-6, max_iter=500)
    assert pw.values[0, 0] == pytest.approx(lz.values[0, 0], rel=1e-3)
    assert lz.num_hvps < pw.num_hvps


@requires_extension
@given(rows=st.integers(1, 5), numel=st.integers(0, 1500), seed=st.integers(0, 2**63 - 1),
       stream=st.integers(0, 2**63 - 1), row_offset=st.integers(0, 1000), group_offset=st.integers(0, 10**6))
def test_rademacher_kernel_equals_twin(rows, numel, seed, stream, row_offset, group_offset):
    kw = dict(seed=seed, stream=stream, row_offset=row_offset, group_offset=group_offset)
    got = ops.rademacher(rows, numel, **kw)
    assert torch.equal(got, reference.rademacher(rows, numel, **kw))
    assert set(got.unique().tolist()) <= {-1.0, 1.0}


def test_rademacher_signs_are_balanced_and_apart_from_sgld_noise():
    v = ops.rademacher(4, 100_000, seed=1)
    # Each mean is of 1e5 independent signs: sd 1/sqrt(1e5).
    assert v.mean(1).abs().max() < 4 / math.sqrt(100_000)
    assert (v[0] * v[1]).mean().abs() < 4 / math.sqrt(100_000)
    noise_signs = torch.sign(ops.philox_normal(4, 100_000, seed=1, step=0))
    assert (v * noise_signs).mean().abs() < 4 / math.sqrt(400_000)


@requires_extension
@given(shapes=st.lists(st.lists(st.integers(0, 7), max_size=3).map(tuple), min_size=1, max_size=5),
       rows=st.integers(1, 4))
def test_multi_dot_kernel_equals_twin(shapes, rows):
    g = torch.Generator().manual_seed(len(shapes) * 10 + rows)
    a = [torch.randn((rows,) + s, generator=g) for s in shapes]
    b = [torch.randn((rows,) + s, generator=g) for s in shapes]
    got = torch.full((rows,), 0.5, dtype=torch.float64)
    want = got.clone()
    ops.multi_dot_(got, a, b)
    reference.multi_dot_(want, a, b)
    terms = 0.5 + sum(float((x.double() * y.double()).abs().sum()) for x, y in zip(a, b))
    assert float((got - want).abs().max()) <= 1e-12 * terms


def test_multi_dot_rejects_bad_input():
    with pytest.raises(TypeError, match="out must be a contiguous 1-D torch.float64"):
        ops.multi_dot_(torch.zeros(2), [torch.ones(2, 3)], [torch.ones(2, 3)])
    with pytest.raises(ValueError, match="expected a leading dimension of 2"):
        ops.multi_dot_(torch.zeros(2, dtype=torch.float64), [torch.ones(3, 3)], [torch.ones(3, 3)])
    with pytest.raises(ValueError, match="b\\[0\\] has shape"):
        ops.multi_dot_(torch.zeros(2, dtype=torch.float64), [torch.ones(2, 3)], [torch.ones(2, 4)])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_statistics_match_cpu():
    model, loss_fn, batches = small_cases()["mlp"]
    cpu = llcfast.hessian_eigs(model, loss_fn, batches, k=2, tol=1e-7)
    t_cpu = llcfast.hessian_trace(model, loss_fn, batches, num_probes=64)
    gpu = llcfast.hessian_eigs(model.cuda(), loss_fn, [tuple(t.cuda() for t in b) for b in batches], k=2, tol=1e-7)
    t_gpu = llcfast.hessian_trace(model, loss_fn, [tuple(t.cuda() for t in b) for b in batches], num_probes=64)
    np.testing.assert_allclose(gpu.values, cpu.values, rtol=1e-4)
    np.testing.assert_allclose(t_gpu.per_probe, t_cpu.per_probe, rtol=1e-4, atol=1e-5)  # same probe bits


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_trace_plan_measures_real_memory_and_keeps_the_values(monkeypatch):
    """On a GPU the two measuring passes see real allocations: a probe of the
    tiny transformer adds its activations' tangents, and a free memory that
    holds only a few probes gives passes of that many, with unchanged values."""
    import llcfast.engine.hessian_problem as hessian_module
    model, loss_fn, batches = small_cases()["transformer"]
    model = model.cuda()
    batches = [tuple(t.cuda() for t in b) for b in batches]
    whole = llcfast.hessian_trace(model, loss_fn, batches, num_probes=24, seed=1, probes_per_pass=24)
    free = llcfast.hessian_trace(model, loss_fn, batches, num_probes=24, seed=1)
    plan = free.config["memory_plan"]
    assert plan is not None and plan["bytes_per_probe"] > 2 * 4 * sum(p.numel() for p in model.parameters())
    assert free.config["probes_per_pass"] == 24  # a tiny model: all fit
    tight = (plan["shared_bytes"] + 5 * plan["bytes_per_probe"]) / 0.85 + 1
    monkeypatch.setattr(hessian_module, "free_device_bytes", lambda device: int(tight))
    few = llcfast.hessian_trace(model, loss_fn, batches, num_probes=24, seed=1)
    assert 3 <= few.config["probes_per_pass"] <= 6  # the measurement moves by an allocator block or so
    np.testing.assert_allclose(few.per_probe, whole.per_probe, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_cuda_low_precision_trace_within_the_probes_spread(precision):
    """TF32 keeps 10 mantissa bits, bf16 8: the same probes' trace moves far
    less than its standard error; the global TF32 flag is restored."""
    model, loss_fn, batches = small_cases()["transformer"]
    model = model.cuda()
    batches = [tuple(t.cuda() for t in b) for b in batches]
    flag = torch.backends.cuda.matmul.allow_tf32
    full = llcfast.hessian_trace(model, loss_fn, batches, num_probes=64, seed=2)
    low = llcfast.hessian_trace(model, loss_fn, batches, num_probes=64, seed=2, precision=precision)
    assert torch.backends.cuda.matmul.allow_tf32 == flag
    assert np.abs(low.per_probe - full.per_probe).max() < 8 * 2.0 ** -8 * np.abs(full.per_probe).mean()
    assert abs(low.trace[0] - full.trace[0]) < 0.25 * full.std_error[0]


def _symmetric_matvec(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = ((q * torch.linspace(-1.0, 3.0, n, dtype=torch.float64)) @ q.T).float()
    return (lambda x: x @ a), torch.randn(2, n, generator=g)


def test_lanczos_basis_grows_with_the_steps_and_gives_the_numbers_of_a_full_one():
    from llcfast.engine.lanczos import FIRST_BLOCK, lanczos
    matvec, start = _symmetric_matvec()
    grown = lanczos(matvec, start, 100)
    full = lanczos(matvec, start, 100, reserve_all=True)
    assert grown.steps == full.steps == 100 > 2 * FIRST_BLOCK
    torch.testing.assert_close(grown.alphas, full.alphas, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grown.betas, full.betas, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grown.basis, full.basis, rtol=1e-6, atol=1e-7)


def test_a_lanczos_basis_that_does_not_fit_is_a_memory_error_saying_what_to_lower(monkeypatch):
    from llcfast.engine.lanczos import FIRST_BLOCK, lanczos
    matvec, start = _symmetric_matvec()
    real_empty = torch.empty

    def empty(*shape, **kwargs):  # the device holds FIRST_BLOCK basis vectors per row, no more
        if len(shape) == 3 and shape[1] > FIRST_BLOCK and kwargs.get("dtype") == torch.float32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real_empty(*shape, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    assert lanczos(matvec, start, FIRST_BLOCK).steps == FIRST_BLOCK  # fits: never grows
    with pytest.raises(MemoryError, match=rf"2 run\(s\) x {2 * FIRST_BLOCK} steps x 200 parameters = .* GiB "
                                          r"\(of up to 100 steps\) .*9.00 GiB\); lower max_iter"):
        lanczos(matvec, start, 100, lower="lower max_iter")
    model = Quadratic(np.linspace(0.5, 2.0, 64))
    with pytest.raises(MemoryError, match="lower num_steps, or num_runs"):
        llcfast.hessian_spectrum(model, quad_loss, [None], num_runs=2, num_steps=40)


def test_long_hessian_work_shows_progress_and_can_be_quiet(capsys):
    model, loss_fn, batches = small_cases()["mlp"]
    llcfast.hessian_trace(model, loss_fn, batches, num_probes=8)
    llcfast.hessian_eigs(model, loss_fn, batches, k=1)
    llcfast.hessian_spectrum(model, loss_fn, batches, num_runs=2, num_steps=6)
    err = capsys.readouterr().err
    assert "Hessian trace" in err and "/8 " in err and "Hessian eigenvalues (Lanczos)" in err
    assert "Hessian spectrum" in err and "/6 " in err
    llcfast.hessian_trace(model, loss_fn, batches, num_probes=8, progress=False)
    llcfast.hessian_eigs(model, loss_fn, batches, k=1, method="power", progress=False)
    assert capsys.readouterr().err == ""


def test_the_finite_difference_check_stops_at_the_first_step_that_agrees():
    from llcfast.engine.hvp import finite_difference_gap
    model, loss_fn, batches = small_cases()["mlp"]
    calls = []

    def counted(m, b):
        calls.append(1)
        return loss_fn(m, b)

    names = [n for n, _ in model.named_parameters()]
    centers = [p.detach().clone() for p in model.parameters()]
    vector = [torch.randn((1,) + c.shape, generator=torch.Generator().manual_seed(0)) for c in centers]
    full = finite_difference_gap(HVP(model, counted, batches[:1], names, centers), vector)
    # The HVP's retained graph (its loss, and a second evaluation that checks for randomness), then
    # two gradients at each of three steps.
    assert len(calls) == 2 + 3 * 2
    calls.clear()
    early = finite_difference_gap(HVP(model, counted, batches[:1], names, centers), vector, enough=5e-3)
    assert len(calls) == 2 + 2 and early <= 5e-3 and full <= early


def test_retained_products_of_a_torch_transformer_layer_equal_the_vmapped_ones():
    """A deterministic torch layer (nn.TransformerEncoderLayer in eval mode,
    which has a no-grad fast path) passes the retained graph's randomness
    check, and its products equal the vmapped passes'."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    batches = [(torch.randn(8, 5, 16), torch.randn(8, 5, 16))]
    loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    names = [n for n, _ in layer.named_parameters()]
    centers = [p.detach() for p in layer.parameters()]
    vecs = [torch.randn((3,) + tuple(c.shape), generator=torch.Generator().manual_seed(2)) for c in centers]
    retained = HVP(layer, loss, batches, names, centers)(vecs)
    vmapped = HVP(layer, loss, batches, names, centers, retain_graph=False)(vecs)
    for a, b in zip(retained, vmapped):
        assert float((a - b).abs().max()) <= 64 * torch.finfo(torch.float32).eps * (float(b.abs().max()) + 1e-12)
