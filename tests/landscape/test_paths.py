"""The loss along paths between weight sets, and permutation alignment.

Known answers: along a straight line a quadratic loss is a parabola, whose
barrier over the chord is -d'Ad/4 (d = b - a) where d'Ad < 0; a network and
a copy with its hidden units permuted compute the same function, the
alignment recovers the permutation exactly, and the barrier between them is
then 0."""
import numpy as np
import pytest
import torch

import llcfast
from llcfast.landscape.paths import barrier


class Quadratic(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.as_tensor(w, dtype=torch.float32))


A = torch.tensor([[2.0, 0.5, 0.0], [0.5, -3.0, 0.2], [0.0, 0.2, 1.0]])


def quadratic(model, batch):
    return model.w @ A @ model.w


def test_a_quadratic_along_a_line_is_the_parabola_with_its_closed_form_barrier():
    a, b = Quadratic([1.0, 0.5, -1.0]), Quadratic([0.5, -1.5, 0.5])
    r = llcfast.loss_along_path(a, b, [torch.zeros(1)], quadratic, points=41, progress=False)
    wa, wb = a.w.detach().double(), b.w.detach().double()
    t = torch.as_tensor(r.t)
    want = torch.stack([((1 - s) * wa + s * wb) @ A.double() @ ((1 - s) * wa + s * wb) for s in t]).numpy()
    np.testing.assert_allclose(r.loss, want, rtol=1e-5, atol=1e-5)
    d = wb - wa
    curvature = float(d @ A.double() @ d)
    assert curvature < 0  # the line crosses the negative direction: a barrier
    assert r.barrier == pytest.approx(-curvature / 4, rel=1e-4) and r.barrier_t == pytest.approx(0.5)


def test_barrier_is_the_largest_excess_over_the_chord():
    t = np.linspace(0, 1, 5)
    assert barrier(t, np.array([1.0, 1.5, 2.5, 2.0, 1.0])) == (1.5, 0.5)
    assert barrier(t, np.array([0.0, -1.0, -1.0, -1.0, 0.0]))[0] == 0.0  # below the chord: no barrier


def mlp(seed, width=16, activation=torch.nn.Tanh):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(2, width), activation(), torch.nn.Linear(width, width),
                               activation(), torch.nn.Linear(width, 1))


def task():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=gen)
    return x, torch.sin(2 * x[:, :1]) * torch.cos(x[:, 1:])


def mse(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def trained(seed, steps=400, **shape):
    model = mlp(seed, **shape)
    x, y = task()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = mse(model, (x, y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def permuted(model, seed):
    """A copy with each hidden layer's units in a random order."""
    out = mlp(0)
    out.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    layers = [m for m in out if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for first, second in zip(layers, layers[1:]):
            perm = torch.randperm(first.out_features, generator=gen)
            first.weight.copy_(first.weight[perm])
            first.bias.copy_(first.bias[perm])
            second.weight.copy_(second.weight[:, perm])
    return out


@pytest.mark.parametrize("matching", ["weights", "activations"])
def test_alignment_recovers_a_random_permutation_and_the_barrier_vanishes(matching):
    model = trained(1)
    x, y = task()
    shuffled = permuted(model, seed=7)
    torch.testing.assert_close(shuffled(x), model(x), rtol=1e-5, atol=1e-6)  # the same function
    aligned = llcfast.align_permutation(model, shuffled, [(x, y)] if matching == "activations" else None)
    torch.testing.assert_close(aligned(x), shuffled(x), rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), aligned.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    before = llcfast.loss_along_path(model, shuffled, [(x, y)], mse, points=11, progress=False)
    after = llcfast.loss_along_path(model, aligned, [(x, y)], mse, points=11, progress=False)
    assert before.barrier > 10 * abs(after.barrier) and abs(after.barrier) < 1e-6


def test_two_seeds_the_barrier_falls_after_alignment_and_a_bent_path_lowers_it():
    """ReLU units, 64 wide: permutations are their only symmetry (tanh units
    can also flip sign, which weight matching does not search)."""
    shape = dict(width=64, activation=torch.nn.ReLU)
    a, b = trained(1, **shape), trained(2, **shape)
    x, y = task()
    before = llcfast.loss_along_path(a, b, [(x, y)], mse, points=21, progress=False)
    after = llcfast.loss_along_path(a, llcfast.align_permutation(a, b), [(x, y)], mse, points=21, progress=False)
    bent = llcfast.loss_along_path(a, b, [(x, y)], mse, points=21, path="bezier", bend_steps=300, progress=False)
    assert after.barrier < before.barrier
    assert bent.barrier < before.barrier
    np.testing.assert_allclose(bent.loss[[0, -1]], before.loss[[0, -1]], rtol=1e-6)  # the same ends


def test_test_loss_and_plot(tmp_path):
    a, b = trained(1, steps=50), trained(2, steps=50)
    x, y = task()
    r = llcfast.loss_along_path(a, b, [(x[:128], y[:128])], mse, points=5, test_loader=[(x[128:], y[128:])],
                                progress=False)
    assert r.test_loss.shape == (5,) and r.test_barrier is not None
    r.plot(str(tmp_path / "path.png"))
    assert (tmp_path / "path.png").stat().st_size > 1000


@pytest.mark.parametrize("call, message", [
    (lambda x, y: llcfast.loss_along_path(mlp(0), mlp(0, width=8), [(x, y)], mse), "shape"),
    (lambda x, y: llcfast.loss_along_path(mlp(0), mlp(1), [(x, y)], mse, path="arc"), "path must be one of"),
    (lambda x, y: llcfast.loss_along_path(mlp(0), mlp(1), [(x, y)], mse, points=1), "points"),
    (lambda x, y: llcfast.align_permutation(torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)), "nn.Sequential"),
    (lambda x, y: llcfast.align_permutation(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3),
                                                                torch.nn.Linear(3, 1)),
                                            torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3),
                                                                torch.nn.Linear(3, 1))), "LayerNorm"),
    (lambda x, y: llcfast.align_permutation(mlp(0), mlp(0, width=8)), "different sizes"),
])
def test_bad_input_is_named(call, message):
    x, y = task()
    with pytest.raises((ValueError, TypeError), match=message):
        call(x, y)


@pytest.mark.parametrize("per_pass", [None, 1, 3, 7])
def test_the_batched_points_equal_one_model_at_a_time(per_pass):
    """The twin of the stacked pass: each point's weights loaded into a copy
    of the model, its loss computed alone."""
    a, b = trained(1, steps=30), trained(2, steps=30)
    x, y = task()
    loader = [(x[:100], y[:100]), (x[100:], y[100:])]
    r = llcfast.loss_along_path(a, b, loader, mse, points=7, points_per_pass=per_pass, progress=False)
    assert r.config["points_per_pass"] == (7 if per_pass is None else per_pass)  # small activations: all at once
    one = mlp(0)
    want = []
    for t in r.t:
        with torch.no_grad():
            for p, pa, pb in zip(one.parameters(), a.parameters(), b.parameters()):
                p.copy_((1 - t) * pa + t * pb)
            want.append(np.mean([float(mse(one, batch)) for batch in loader]))
    np.testing.assert_allclose(r.loss, want, rtol=1e-5, atol=1e-7)


def test_on_a_cpu_points_with_large_activations_go_one_at_a_time():
    """As the sampler's CPU planner runs chains: one point whose largest
    activation passes planner.CPU_SEQUENTIAL_BYTES runs alone."""
    from llcfast.engine.planner import CPU_SEQUENTIAL_BYTES
    wide = torch.nn.Sequential(torch.nn.Linear(2, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1))
    rows = CPU_SEQUENTIAL_BYTES // (4 * 256) + 1
    x = torch.randn(rows, 2)
    small = llcfast.loss_along_path(wide, wide, [(x[:8], x[:8, :1])], mse, points=5, progress=False)
    large = llcfast.loss_along_path(wide, wide, [(x, x[:, :1])], mse, points=5, progress=False)
    assert small.config["points_per_pass"] == 5 and large.config["points_per_pass"] == 1


def shuffled_transformer(model, seed, residual=True):
    """A copy with each block's heads and MLP units, and (``residual``) the
    residual stream's coordinates, in a random order."""
    import copy
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in out.blocks:
            attn = block.attn
            h, d = attn.heads, attn.out.in_features
            e = d // h
            order = torch.randperm(h, generator=gen)
            rows = torch.cat([s * d + (order.view(-1, 1) * e + torch.arange(e)).reshape(-1) for s in range(3)])
            attn.qkv.weight.copy_(attn.qkv.weight[rows])
            attn.qkv.bias.copy_(attn.qkv.bias[rows])
            attn.out.weight.copy_(attn.out.weight[:, (order.view(-1, 1) * e + torch.arange(e)).reshape(-1)])
            if block.mlp is not None:
                first, last = block.mlp[0], block.mlp[2]
                units = torch.randperm(first.out_features, generator=gen)
                first.weight.copy_(first.weight[units])
                first.bias.copy_(first.bias[units])
                last.weight.copy_(last.weight[:, units])
        if residual:  # every read of the stream permuted on its columns, every write on its rows
            order = torch.randperm(out.ln_out.weight.shape[0], generator=gen)
            rows = [out.embed.weight, out.embed.bias, out.ln_out.weight, out.ln_out.bias]
            cols = [out.pos.weight, out.unembed.weight]
            for block in out.blocks:
                rows += [block.ln_attn.weight, block.ln_attn.bias, block.attn.out.weight, block.attn.out.bias,
                         block.ln_mlp.weight, block.ln_mlp.bias, block.mlp[2].weight, block.mlp[2].bias]
                cols += [block.attn.qkv.weight, block.mlp[0].weight]
            for t in rows:
                t.copy_(t[order])
            for t in cols:
                t.copy_(t[:, order])
    return out


@pytest.mark.filterwarnings("ignore:the LLC estimate is negative")
@pytest.mark.parametrize("matching", ["weights", "activations"])
def test_a_transformers_residual_stream_heads_and_mlp_units_are_aligned_exactly(matching):
    from llcfast.pipeline import models
    torch.manual_seed(0)
    model = models.InContextRegression(task_dim=3, max_pairs=4, d_model=16, heads=4, layers=2, mlp_width=12)
    gen = torch.Generator().manual_seed(1)
    batch = models.sample_regression(32, pairs=4, task_dim=3, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):  # away from the initialisation's symmetric start
        loss = models.regression_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    shuffled = shuffled_transformer(model, seed=3)
    loader = None if matching == "weights" else [batch, models.sample_regression(32, 4, 3, generator=gen)]
    with torch.no_grad():
        torch.testing.assert_close(shuffled(*batch), model(*batch), rtol=1e-5, atol=1e-5)
        aligned = llcfast.align_permutation(model, shuffled, loader)
        torch.testing.assert_close(aligned(*batch), model(*batch), rtol=1e-5, atol=1e-5)
    for p, q in zip(model.parameters(), aligned.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    found = aligned.aligned_permutations
    assert len(found["blocks"]) == 2 and set(found["blocks"][0]) == {"heads", "mlp_units"} and len(found["residual"]) == 16
    before = llcfast.loss_along_path(model, shuffled, [batch], models.regression_loss, points=9, progress=False)
    after = llcfast.loss_along_path(model, aligned, [batch], models.regression_loss, points=9, progress=False)
    assert before.barrier > 1e-4 and abs(after.barrier) < 1e-6
    if loader is not None:  # the loss drives the forward as well as the batch's parts do
        by_loss = llcfast.align_permutation(model, shuffled, loader, models.regression_loss)
        assert by_loss.aligned_permutations == aligned.aligned_permutations
    # the blocks alone recover a copy whose stream was left in place, and residual=False leaves it so
    blocks_only = shuffled_transformer(model, seed=4, residual=False)
    kept = llcfast.align_permutation(model, blocks_only, loader, residual=False)
    assert kept.aligned_permutations["residual"] is None
    for p, q in zip(model.parameters(), kept.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    blocks_alone = type("BlocksOnly", (torch.nn.Module,), {})()
    blocks_alone.blocks = model.blocks
    with pytest.raises(ValueError, match="BlocksOnly lacks them: pass residual=False"):
        llcfast.align_permutation(blocks_alone, blocks_alone)
