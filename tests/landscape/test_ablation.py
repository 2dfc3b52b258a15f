"""layer_ablation: a block whose residual branch is zero costs nothing to
drop; dropping or swapping is what the plain forward computes with that
list; the model comes back unchanged."""
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
    r = llcfast.layer_ablation(model, [(x, y)], mse)
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
    r = llcfast.layer_ablation(model, [batch], models.regression_loss)
    assert set(r.loss) == {"none", "drop 0", "drop 1", "swap 0-1"}
    with pytest.raises(ValueError, match="no nn.ModuleList named blocks"):
        llcfast.layer_ablation(nn.Linear(2, 1), [(torch.zeros(1, 2), torch.zeros(1, 1))], mse)
