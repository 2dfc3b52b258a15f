"""torch.library.opcheck on every registered op: schema (mutation
annotations), fake kernels, autograd registration and AOT dispatch, so the
ops work under torch.compile and CUDA-graph capture."""
import pytest
import torch

from conftest import HAS_CUDA, requires_extension
from sample_inputs import make_case

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
# AOT dispatch functionalizes an op. torch 2.4 refuses to functionalize one
# that mutates a Tensor[] argument, as the sampler updates do (torch 2.5 can),
# so there their check stops at fake tensors: the engine runs its update
# outside torch.compile, and CUDA-graph capture needs no functionalization.
LIST_MUTATION = ("test_schema", "test_autograd_registration", "test_faketensor") + \
    (("test_aot_dispatch_dynamic",) if torch.torch_version.TorchVersion(torch.__version__) >= "2.5" else ())


def opcheck_list_mutation(op, args):
    torch.library.opcheck(op, args, test_utils=LIST_MUTATION)


def sgld_samples(device):
    for kw in (dict(), dict(masked=True), dict(explicit_noise=True, stats=True), dict(masked=True, stats=True)):
        c = make_case([(4, 3), (97,), (1,)], 3, device=device, **kw)
        h = c.hyper
        yield (c.params, c.grads, c.centers, c.masks, c.noise, c.stats, None, h["seed"], h["step"],
               h["chain_offset"], h["eps"], h["nbeta"], h["gamma"], h["weight_decay"], h["noise_scale"])


@requires_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_sgld_step(device):
    for args in sgld_samples(device):
        opcheck_list_mutation(torch.ops.llcfast.sgld_step_.default, args)


@requires_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_sgld_step_with_bf16_grads_and_copies(device):
    c = make_case([(4, 3), (97,), (1,)], 3, device=device, masked=True)
    h = c.hyper
    copies = [torch.zeros_like(c.params[0], dtype=torch.bfloat16), torch.zeros(0, dtype=torch.bfloat16, device=device),
              torch.zeros_like(c.params[2], dtype=torch.bfloat16)]
    args = (c.params, [g.bfloat16() for g in c.grads], c.centers, c.masks, None, None, None, h["seed"], h["step"],
            h["chain_offset"], h["eps"], h["nbeta"], h["gamma"], h["weight_decay"], h["noise_scale"], 0.0, copies)
    opcheck_list_mutation(torch.ops.llcfast.sgld_step_.default, args)


@requires_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_sgld_step_with_step_tensor(device):
    c = make_case([(5,)], 2, device=device)
    h = c.hyper
    args = (c.params, c.grads, c.centers, None, None, None, torch.tensor([3], device=device), h["seed"], h["step"],
            h["chain_offset"], h["eps"], h["nbeta"], h["gamma"], h["weight_decay"], h["noise_scale"])
    opcheck_list_mutation(torch.ops.llcfast.sgld_step_.default, args)


@requires_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_samplers_with_state(device):
    for kw in (dict(), dict(masked=True, stats=True), dict(explicit_noise=True)):
        c = make_case([(4, 3), (97,), (1,)], 3, device=device, **kw)
        h = c.hyper
        head = (c.masks, c.noise, c.stats, None, h["seed"], h["step"], h["chain_offset"], h["eps"], h["nbeta"],
                h["gamma"], h["weight_decay"])
        square_avg = [torch.rand_like(p) for p in c.params]
        opcheck_list_mutation(torch.ops.llcfast.rmsprop_sgld_step_.default,
                              (c.params, square_avg, c.grads, c.centers) + head + (h["noise_scale"], 0.99, 0.1, 0.5))
        momentum = [0.01 * torch.randn_like(p) for p in c.params]
        thermostat = torch.full((3,), 0.01, device=device)
        opcheck_list_mutation(torch.ops.llcfast.sgnht_step_.default,
                              (c.params, momentum, thermostat, c.grads, c.centers) + head + (0.01, 0.5))


@requires_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_philox_normal(device):
    for shape in [(1, 1), (3, 97), (2, 1025)]:
        out = torch.empty(shape, device=device)
        torch.library.opcheck(torch.ops.llcfast.philox_normal_.default, (out, 7, 3, 1, 5))


@requires_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_philox_rademacher(device):
    for shape in [(1, 1), (3, 97), (2, 1025)]:
        out = torch.empty(shape, device=device)
        torch.library.opcheck(torch.ops.llcfast.philox_rademacher_.default, (out, 7, 2, 1, 5))


@requires_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_multi_dot(device):
    g = torch.Generator().manual_seed(5)
    for rows, shapes in [(1, [(1,)]), (3, [(4, 3), (97,), (1,)]), (2, [(1025,)] * 3)]:
        a = [torch.randn((rows,) + s, generator=g).to(device) for s in shapes]
        b = [torch.randn((rows,) + s, generator=g).to(device) for s in shapes]
        torch.library.opcheck(torch.ops.llcfast.multi_dot_.default,
                              (torch.zeros(rows, dtype=torch.float64, device=device), a, b))


@requires_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_lanczos_step(device):
    g = torch.Generator().manual_seed(3)
    for rows, m, n, j in [(1, 1, 1, 0), (3, 5, 97, 2), (2, 4, 1025, 3)]:
        basis = torch.zeros(rows, m, n)
        basis[:, : j + 1] = torch.randn(rows, j + 1, n, generator=g)
        args = (basis.to(device), torch.randn(rows, n, generator=g).to(device), j,
                torch.zeros(rows, 2, dtype=torch.float64, device=device))
        torch.library.opcheck(torch.ops.llcfast.lanczos_step_.default, args)


@requires_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_token_nll(device):
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(2, 5, 17, device=device).to(dtype)
        targets = torch.randint(0, 17, (2, 5), device=device)
        torch.library.opcheck(torch.ops.llcfast.token_nll.default, (logits, targets))
        nll, lse = torch.ops.llcfast.token_nll(logits, targets)
        torch.library.opcheck(torch.ops.llcfast.token_nll_backward.default,
                              (torch.rand_like(nll), logits, lse, targets))
        torch.library.opcheck(torch.ops.llcfast.token_nll_grad_.default, (logits.clone(), targets, 0.25))


@requires_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_chain_layer_norm(device):
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, 33, device=device).to(dtype)
        w, b = torch.randn(3, 33, device=device).to(dtype), torch.randn(3, 33, device=device).to(dtype)
        for bias in (b, None):
            torch.library.opcheck(torch.ops.llcfast.chain_layer_norm.default, (x, w, bias, 1e-5))
        y, mean, rstd = torch.ops.llcfast.chain_layer_norm(x, w, b, 1e-5)
        torch.library.opcheck(torch.ops.llcfast.chain_layer_norm_backward.default,
                              (torch.randn_like(y), x, mean, rstd, w))


def test_every_registered_op_has_an_opcheck():
    """Each op the TORCH_LIBRARY block defines is named by an opcheck above."""
    import pathlib
    import re
    root = pathlib.Path(__file__).resolve().parents[2]
    declared = set(re.findall(r'm\.def\(\s*"(\w+)\(', (root / "csrc" / "registration.cpp").read_text()))
    assert {"sgld_step_", "philox_rademacher_", "multi_dot_"} <= declared
    checked = set(re.findall(r"torch\.ops\.llcfast\.(\w+)\.default", pathlib.Path(__file__).read_text()))
    assert declared - checked == set()


@requires_extension
def test_the_first_public_name_used_registers_the_fake_kernels():
    """A fresh process that touches only llcfast.extension_available() can
    trace the ops on fake tensors (their fakes live in llcfast.ops)."""
    import subprocess
    import sys
    code = ("import torch, llcfast\n"
            "assert llcfast.extension_available()\n"
            "from torch._subclasses.fake_tensor import FakeTensorMode\n"
            "with FakeTensorMode():\n"
            "    nll, lse = torch.ops.llcfast.token_nll(torch.empty(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))\n"
            "    out = torch.ops.llcfast.chain_layer_norm(torch.empty(2, 3, 4), torch.empty(2, 4), None, 1e-5)\n"
            "assert nll.shape == (2, 3) and out[0].shape == (2, 3, 4)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
