"""Inputs for the SGLD-step tests, shared by correctness, opcheck and CUDA
tests (one generator, as in pytorch/extension-cpp), and the logits the
next-token loss kernels' CUDA tests read both 16 bytes and one element an
access."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

# Deliberately awkward sizes: empty, 1, odd, just past powers of two.
AWKWARD_SHAPES = [(), (0,), (1,), (3,), (97,), (1025,), (5, 7), (2, 0, 3), (4, 4), (33, 3)]


@dataclass
class StepCase:
    params: List[torch.Tensor]
    grads: List[torch.Tensor]
    centers: List[torch.Tensor]
    masks: Optional[List[torch.Tensor]]
    noise: Optional[List[torch.Tensor]]
    stats: Optional[torch.Tensor]
    hyper: dict = field(default_factory=dict)

    def clone(self) -> "StepCase":
        cl = lambda xs: None if xs is None else [x.clone() for x in xs]
        return StepCase(cl(self.params), cl(self.grads), cl(self.centers), cl(self.masks), cl(self.noise),
                        None if self.stats is None else self.stats.clone(), dict(self.hyper))

    def to(self, device) -> "StepCase":
        mv = lambda xs: None if xs is None else [x.to(device) for x in xs]
        return StepCase(mv(self.params), mv(self.grads), mv(self.centers), mv(self.masks), mv(self.noise),
                        None if self.stats is None else self.stats.to(device), dict(self.hyper))

    def run(self, fn) -> None:
        fn(self.params, self.grads, self.centers, masks=self.masks, noise=self.noise, stats=self.stats, **self.hyper)


def make_case(shapes: Sequence[Tuple[int, ...]], chains: int, *, seed: int = 0, masked: bool = False,
              explicit_noise: bool = False, stats: bool = False, device="cpu", eps: float = 1e-3,
              nbeta: float = 25.0, gamma: float = 100.0, weight_decay: float = 0.01, noise_scale: float = 1.0,
              step: int = 3, chain_offset: int = 0) -> StepCase:
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda shape: torch.randn(shape, generator=gen)
    params = [rnd((chains,) + tuple(s)).to(device) for s in shapes]
    grads = [(10 * rnd((chains,) + tuple(s))).to(device) for s in shapes]
    centers = [rnd(tuple(s)).to(device) for s in shapes]
    masks = [(torch.rand(tuple(s), generator=gen) > 0.4).to(device) for s in shapes] if masked else None
    noise = [rnd((chains,) + tuple(s)).to(device) for s in shapes] if explicit_noise else None
    st = torch.zeros(chains, 3, dtype=torch.float64, device=device) if stats else None
    hyper = dict(eps=eps, nbeta=nbeta, gamma=gamma, weight_decay=weight_decay, noise_scale=noise_scale,
                 seed=1234 + seed, step=step, chain_offset=chain_offset)
    return StepCase(params, grads, centers, masks, noise, st, hyper)


def update_bound(case: StepCase, xi: List[torch.Tensor]) -> List[torch.Tensor]:
    """Per-element bound on the fp32 rounding error of the update: a few ulps
    of the largest term summed (each rounded op adds at most half an ulp of
    its result, and there are six)."""
    h = case.hyper
    a, b, e = h["eps"] / 2 * h["nbeta"], h["eps"] / 2 * h["gamma"], h["eps"] / 2 * h["weight_decay"]
    s = math.sqrt(h["eps"]) * h["noise_scale"]
    out = []
    for p, g, c, z in zip(case.params, case.grads, case.centers, xi):
        p, g, c, z = p.double(), g.double(), c.double(), z.double()
        mag = p.abs() + (a * g).abs() + (b * (p - c)).abs() + (e * p).abs() + (s * z).abs()
        out.append(4 * torch.finfo(torch.float32).eps * mag + 1e-30)
    return out


def exact_update(case: StepCase, xi: List[torch.Tensor]) -> List[torch.Tensor]:
    """The update in float64 from first principles (not the twin's code)."""
    h = case.hyper
    out = []
    for i, (p, g, c, z) in enumerate(zip(case.params, case.grads, case.centers, xi)):
        p64 = p.double()
        new = p64 - h["eps"] / 2 * (h["nbeta"] * g.double() + h["gamma"] * (p64 - c.double())
                                    + h["weight_decay"] * p64) + math.sqrt(h["eps"]) * h["noise_scale"] * z.double()
        if case.masks is not None:
            new = torch.where(case.masks[i], new, p64)
        out.append(new)
    return out


def aligned_and_shifted_logits(dtype: torch.dtype):
    """(logits, targets) on the CPU, and the same logits on the GPU twice:
    starting on a 16-byte boundary (the kernels read them 16 bytes an
    access) and one element past one (one element an access). Rows with a
    masked vocabulary, nothing left, +inf and NaN."""
    torch.manual_seed(0)
    rows, vocab = 7, 64
    logits = 4 * torch.randn(rows, vocab, dtype=torch.float64)
    logits[0, :40] = float("-inf")  # a masked vocabulary
    logits[1] = float("-inf")  # a row with nothing left
    logits[2, 50] = float("inf")
    logits[3, 17] = float("nan")
    logits[4, 3] = logits[4, 60] = float("inf")
    logits = logits.to(dtype)
    targets = torch.tensor([45, 0, 50, 2, 3, 63, 8])
    flat = torch.empty(rows * vocab + 1, dtype=dtype, device="cuda")
    shifted = flat[1:].view(rows, vocab)  # contiguous, one element past a 16-byte boundary
    shifted.copy_(logits.cuda())
    aligned = logits.cuda()
    assert aligned.data_ptr() % 16 == 0 and shifted.data_ptr() % 16 != 0 and shifted.is_contiguous()
    return logits, targets, aligned, shifted
