"""layer_ablation: a block whose residual branch is zero costs nothing to
drop; dropping or swapping is what the plain forward computes with that
list; a head whose output columns are zero costs nothing to silence; the
batched variants equal the twin that edits the model one variant at a time;
the model comes back unchanged."""
import pytest
import torch
from torch import nn

import llcfast


class Residual(nn.Module):
    def __init__(self, width, scale):
        super().__init__()
        self.f = nn.Linear(width, width)
        with torch.no_grad():
            self.f.weight.mul_(scale)
            self.f.bias.mul_(scale)

    def forward(self, h):
        return h + torch.tanh(self.f(h))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Residual(4, 1.0), Residual(4, 0.0), Residual(4, 1.0)])
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def mse(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def test_drops_and_swaps_against_the_plain_forward():
    model = Net()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 4, generator=gen), torch.randn(32, 1, generator=gen)
    before = [p.clone() for p in model.parameters()]
    r = llcfast.layer_ablation(model, [(x, y)], mse, progress=False)
    assert list(r.loss) == ["none", "drop 0", "drop 1", "drop 2", "swap 0-1", "swap 1-2"]
    with torch.no_grad():
        assert r.loss["none"] == pytest.approx(float(mse(model, (x, y))))
    assert r.increase["drop 1"] == pytest.approx(0.0, abs=1e-7)  # its residual branch is zero
    assert abs(r.increase["drop 0"]) > 1e-3
    blocks = list(model.blocks)
    with torch.no_grad():
        h = blocks[1](blocks[2](blocks[0](x)))  # swap 1-2: the order 0, 2, 1
        assert r.loss["swap 1-2"] == pytest.approx(float(((model.out(h) - y) ** 2).mean()), rel=1e-6)
    assert list(model.blocks) == blocks and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert len(r.to_frame()) == 6


def test_the_projects_transformer_and_bad_names():
    from llcfast.pipeline import models
    model = models.InContextRegression(task_dim=3, max_pairs=4, d_model=16, heads=2, layers=2, mlp_width=16)
    batch = models.sample_regression(8, pairs=4, task_dim=3, generator=torch.Generator().manual_seed(0))
    r = llcfast.layer_ablation(model, [batch], models.regression_loss, progress=False)
    assert set(r.loss) == {"none", "drop 0", "drop 1", "swap 0-1"}
    with pytest.raises(ValueError, match="no nn.ModuleList named blocks"):
        llcfast.layer_ablation(nn.Linear(2, 1), [(torch.zeros(1, 2), torch.zeros(1, 1))], mse)
    with pytest.raises(ValueError, match="block 0 \\(Residual\\) has none"):
        llcfast.layer_ablation(Net(), [(torch.zeros(1, 4), torch.zeros(1, 1))], mse, heads=True)
    with pytest.raises(TypeError, match="variants_per_pass must be an int"):
        llcfast.layer_ablation(model, [batch], models.regression_loss, variants_per_pass=0.5)


def test_blocks_that_differ_cannot_be_swapped_but_can_be_dropped():
    model = Net()
    model.blocks[2] = nn.Sequential(Residual(4, 1.0), Residual(4, 1.0))
    batch = (torch.randn(8, 4), torch.randn(8, 1))
    with pytest.raises(ValueError, match="blocks 1 and 2 of blocks hold different parameters"):
        llcfast.layer_ablation(model, [batch], mse, progress=False)
    r = llcfast.layer_ablation(model, [batch], mse, swaps=False, progress=False)
    assert list(r.loss) == ["none", "drop 0", "drop 1", "drop 2"]


def transformer_and_batches(layers=3):
    from llcfast.pipeline import models
    torch.manual_seed(3)
    model = models.InContextRegression(task_dim=3, max_pairs=4, d_model=16, heads=4, layers=layers, mlp_width=16)
    gen = torch.Generator().manual_seed(0)
    return model, [models.sample_regression(8, pairs=4, task_dim=3, generator=gen) for _ in range(3)]


@pytest.mark.parametrize("per_pass", [1, 5, 64])
def test_batched_variants_equal_the_twin_that_edits_the_model(per_pass):
    from llcfast.pipeline import models
    model, batches = transformer_and_batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = llcfast.layer_ablation(model, batches, models.regression_loss, heads=True, batched=False, progress=False)
    r = llcfast.layer_ablation(model, batches, models.regression_loss, heads=True, variants_per_pass=per_pass,
                               progress=False)
    assert list(r.loss) == list(twin.loss) and len(r.loss) == 1 + 3 + 2 + 3 * 4
    assert list(r.loss)[-4:] == ["head 2.0", "head 2.1", "head 2.2", "head 2.3"]
    for k in r.loss:
        assert r.loss[k] == pytest.approx(twin.loss[k], rel=1e-5, abs=1e-7), k
    assert len({round(v, 6) for v in r.loss.values()}) == len(r.loss)  # every variant changed the loss
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert len(model.blocks[0]._forward_hooks) == 0


def test_a_head_that_writes_nothing_costs_nothing_to_silence(tmp_path):
    from llcfast.pipeline import models
    from llcfast.landscape.ablation import head_columns
    model, batches = transformer_and_batches(layers=2)
    with torch.no_grad():
        model.blocks[1].attn.out.weight[:, head_columns(model.blocks[1].attn, 2)] = 0
    r = llcfast.layer_ablation(model, batches, models.regression_loss, heads=True, swaps=False, progress=False)
    assert r.increase["head 1.2"] == 0.0
    assert min(abs(v) for k, v in r.increase.items() if k != "head 1.2") > 1e-6
    r.plot(str(tmp_path / "ablation.png"))
    assert (tmp_path / "ablation.png").stat().st_size > 0
