"""CUDA kernels: noise identical to the CPU's bit for bit, the step equal to
the CPU kernel and the twin to fp32 rounding, the multi-launch and unaligned
paths, stats, and CUDA-graph capture. Skipped, with the reason shown, where
no GPU or no CUDA build exists."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from llcfast import ops, reference
from conftest import requires_cuda
from sample_inputs import AWKWARD_SHAPES, make_case, update_bound
from test_sgld_step import assert_within, drawn_noise

pytestmark = [pytest.mark.cuda, requires_cuda]


@pytest.mark.parametrize("chains,numel,seed,step,chain_offset,group_offset", [
    (1, 1, 0, 0, 0, 0), (3, 97, 7, 5, 0, 0), (4, 1_000_003, 2**63 - 1, 2**40 + 3, 2**32 - 5, 12345),
])
def test_cuda_noise_equals_cpu_noise(chains, numel, seed, step, chain_offset, group_offset):
    kw = dict(seed=seed, step=step, chain_offset=chain_offset, group_offset=group_offset)
    cpu = ops.philox_normal(chains, numel, **kw)
    gpu = ops.philox_normal(chains, numel, device="cuda", **kw)
    assert torch.equal(cpu, gpu.cpu())
    assert torch.equal(reference.philox_normal(chains, numel, device="cuda", **kw).cpu(), cpu)


shape_st = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple) | st.sampled_from(AWKWARD_SHAPES)


@given(shapes=st.lists(shape_st, min_size=1, max_size=5), chains=st.integers(1, 6), masked=st.booleans(),
       explicit_noise=st.booleans(), stats=st.booleans(), seed=st.integers(0, 10**6))
@settings(max_examples=60)
def test_cuda_step_matches_cpu_kernel_and_twin(shapes, chains, masked, explicit_noise, stats, seed):
    cpu = make_case(shapes, chains, seed=seed, masked=masked, explicit_noise=explicit_noise, stats=stats,
                    step=seed % 5, chain_offset=seed % 4)
    gpu = cpu.to("cuda")
    twin = cpu.to("cuda")
    bound = update_bound(cpu, drawn_noise(cpu))
    cpu.run(ops.sgld_step_)
    gpu.run(ops.sgld_step_)
    twin.run(reference.sgld_step_)
    assert_within([p.cpu() for p in gpu.params], cpu.params, bound)
    assert_within([p.cpu() for p in twin.params], cpu.params, bound)
    if stats:
        # Per-warp float partial sums: relative error a few float32 ulps.
        torch.testing.assert_close(gpu.stats.cpu(), cpu.stats, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("count", [1, 16, 17, 64, 65, 400, 401, 900])
def test_cuda_table_sizes_and_multi_launch(count):
    shapes = [((i * 7) % 13 + 1,) for i in range(count)]
    cpu = make_case(shapes, 3, masked=True, stats=True)
    gpu = cpu.to("cuda")
    bound = update_bound(cpu, drawn_noise(cpu))
    cpu.run(ops.sgld_step_)
    gpu.run(ops.sgld_step_)
    assert_within([p.cpu() for p in gpu.params], cpu.params, bound)
    torch.testing.assert_close(gpu.stats.cpu(), cpu.stats, rtol=1e-5, atol=1e-9)


def test_cuda_unaligned_rows_take_the_scalar_path():
    """Contiguous views that start 4 bytes into their storage, and rows whose
    length is not a multiple of 4, must give the same numbers as aligned ones."""
    cpu = make_case([(1031,), (64,), (4, 4)], 3)
    gpu = cpu.to("cuda")
    shift = lambda t: torch.cat([torch.zeros(1, device=t.device), t.reshape(-1)])[1:].view_as(t)
    gpu.params = [shift(p) for p in gpu.params]
    gpu.grads = [shift(g) for g in gpu.grads]
    gpu.centers = [shift(c) for c in gpu.centers]
    assert gpu.params[1].data_ptr() % 16 != 0
    bound = update_bound(cpu, drawn_noise(cpu))
    cpu.run(ops.sgld_step_)
    gpu.run(ops.sgld_step_)
    assert_within([p.cpu() for p in gpu.params], cpu.params, bound)


@pytest.mark.parametrize("shifted", [False, True], ids=["aligned", "shifted"])
@pytest.mark.parametrize("count", [3, 70, 400])
def test_cuda_bf16_grads_and_copies(shifted, count):
    """bf16 gradients and bf16 copies of the new parameters, through the
    8-byte and the element-wise accesses (views one element into their
    storage) and across table sizes: the CPU kernel's parameters to fp32
    rounding, and each copy the parameters as .to(torch.bfloat16) rounds them."""
    shapes = [(1031,), (64,), (4, 4)] + [((i * 7) % 13 + 1,) for i in range(count - 3)]
    cpu = make_case(shapes, 3, masked=True, stats=True)
    cpu.grads = [g.bfloat16() for g in cpu.grads]
    gpu = cpu.to("cuda")
    copies = [torch.zeros(p.shape, dtype=torch.bfloat16, device="cuda") for p in gpu.params]
    if shifted:
        shift = lambda t: torch.cat([t.new_zeros(1), t.reshape(-1)])[1:].view_as(t)  # noqa: E731
        gpu.params, gpu.grads, copies = ([shift(t) for t in ts] for ts in (gpu.params, gpu.grads, copies))
        assert gpu.grads[1].data_ptr() % 8 != 0 and copies[1].data_ptr() % 8 != 0
    bound = update_bound(cpu, drawn_noise(cpu))
    cpu_copies = [torch.zeros(p.shape, dtype=torch.bfloat16) for p in cpu.params]
    cpu.run(lambda *a, **kw: ops.sgld_step_(*a, bf16_copies=cpu_copies, **kw))
    gpu.run(lambda *a, **kw: ops.sgld_step_(*a, bf16_copies=copies, **kw))
    assert_within([p.cpu() for p in gpu.params], cpu.params, bound)
    torch.testing.assert_close(gpu.stats.cpu(), cpu.stats, rtol=1e-5, atol=1e-9)
    assert all(torch.equal(c, p.bfloat16()) for c, p in zip(copies, gpu.params))


def test_cuda_large_step_matches_twin():
    cpu = make_case([(3_000_001,), (1024, 1024)], 4)
    gpu = cpu.to("cuda")
    twin = cpu.to("cuda")
    gpu.run(ops.sgld_step_)
    twin.run(reference.sgld_step_)
    bound = update_bound(twin, drawn_noise(twin))
    assert_within(gpu.params, twin.params, bound)


def test_cuda_graph_capture_advances_the_step():
    eager = make_case([(513,), (7, 9)], 4, device="cuda", step=0)
    graphed = make_case([(513,), (7, 9)], 4, device="cuda", step=0)
    for t in range(3):
        eager.hyper["step"] = 10 + t
        eager.run(ops.sgld_step_)
    counter = torch.zeros(1, dtype=torch.int64, device="cuda")
    graphed.hyper["step"] = 10
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture, as torch requires
        scratch = make_case([(513,), (7, 9)], 4, device="cuda")
        ops.sgld_step_(scratch.params, scratch.grads, scratch.centers, step_tensor=counter, **scratch.hyper)
    torch.cuda.current_stream().wait_stream(stream)
    counter.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.sgld_step_(graphed.params, graphed.grads, graphed.centers, step_tensor=counter, **graphed.hyper)
        counter.add_(1)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert int(counter.item()) == 3
    for a, b in zip(eager.params, graphed.params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rows,numel,seed,stream,row_offset,group_offset", [
    (1, 1, 0, 0, 0, 0), (3, 97, 7, 5, 11, 0), (4, 1_000_003, 2**63 - 1, 2**62 + 3, 2**32 - 5, 12345),
])
def test_cuda_probes_equal_cpu_probes(rows, numel, seed, stream, row_offset, group_offset):
    kw = dict(seed=seed, stream=stream, row_offset=row_offset, group_offset=group_offset)
    assert torch.equal(ops.rademacher(rows, numel, device="cuda", **kw).cpu(), ops.rademacher(rows, numel, **kw))


@pytest.mark.parametrize("rows", [1, 5, 70_000])
def test_cuda_multi_dot_equals_twin(rows):
    g = torch.Generator().manual_seed(rows)
    shapes = [(3, 5), (1,), (), (1000,)] if rows > 5 else [(3, 5), (1,), (), (100_003,)] + [(7,)] * 70
    a = [torch.randn((rows,) + s, generator=g).cuda() for s in shapes]
    b = [torch.randn((rows,) + s, generator=g).cuda() for s in shapes]
    got = torch.full((rows,), 0.25, dtype=torch.float64, device="cuda")
    want = got.clone()
    ops.multi_dot_(got, a, b)
    reference.multi_dot_(want, a, b)
    terms = 0.25 + sum(float((x.double() * y.double()).abs().sum()) for x, y in zip(a, b))
    assert float((got - want).abs().max()) <= 1e-12 * terms
