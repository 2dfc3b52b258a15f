"""Bad input gives a TypeError/ValueError naming the argument and what is
allowed, from the wrapper and the twin alike; direct calls of the registered
op are caught by the C++ checks (RuntimeError), never a crash."""
import pytest
import torch

from llcfast import ops, reference
from conftest import requires_extension
from sample_inputs import make_case

FNS = [pytest.param(ops.sgld_step_, id="ops"), pytest.param(reference.sgld_step_, id="reference")]


def base():
    return make_case([(4, 3), (5,)], 2)


def call(fn, case, **over):
    kw = dict(masks=case.masks, noise=case.noise, stats=case.stats, **case.hyper)
    args = [case.params, case.grads, case.centers]
    for k in ("params", "grads", "centers"):
        if k in over:
            args[["params", "grads", "centers"].index(k)] = over.pop(k)
    kw.update(over)
    fn(*args, **kw)


def mutate(name):
    c = base()
    p, g, w = c.params, c.grads, c.centers
    cases = {
        "grads dtype": (dict(grads=[g[0].double(), g[1]]), TypeError, r"grads\[0\] has dtype torch.float64; allowed: torch.float32"),
        "params dtype": (dict(params=[p[0].half(), p[1]]), TypeError, r"params\[0\] has dtype"),
        "list lengths": (dict(grads=[g[0]]), ValueError, "grads has 1 tensors but params has 2"),
        "center shape": (dict(centers=[w[0], torch.zeros(6)]), ValueError, r"centers\[1\] has shape \(6,\); expected \(5,\)"),
        "grad shape": (dict(grads=[g[0], torch.zeros(2, 6)]), ValueError, r"grads\[1\] has shape"),
        "chain count": (dict(params=[p[0], torch.zeros(3, 5)]), ValueError, "leading chain dimension of 2"),
        "no chain dim": (dict(params=[torch.zeros(()), p[1]]), ValueError, "no chain dimension"),
        "non-contiguous": (dict(params=[torch.zeros(3, 2).t(), p[1]], grads=[torch.zeros(2, 3), g[1]],
                                centers=[torch.zeros(3), w[1]]), ValueError, r"params\[0\] is not contiguous"),
        "device": (dict(centers=[w[0].to("meta"), w[1]]), ValueError, r"centers\[0\] is on meta"),
        "mask dtype": (dict(masks=[torch.ones(4, 3), torch.ones(5)]), TypeError, r"masks\[0\] has dtype torch.float32; allowed: torch.bool"),
        "noise shape": (dict(noise=[torch.zeros(2, 4, 3), torch.zeros(2, 4)]), ValueError, r"noise\[1\] has shape"),
        "stats dtype": (dict(stats=torch.zeros(2, 3)), TypeError, "stats has dtype torch.float32; allowed: torch.float64"),
        "stats shape": (dict(stats=torch.zeros(3, 3, dtype=torch.float64)), ValueError, r"stats must be a contiguous \(2, 3\)"),
        "negative eps": (dict(eps=-1e-3), ValueError, "eps must be >= 0"),
        "nan nbeta": (dict(nbeta=float("nan")), ValueError, "nbeta must be finite"),
        "inf gamma": (dict(gamma=float("inf")), ValueError, "gamma must be finite"),
        "negative gamma": (dict(gamma=-1.0), ValueError, "gamma must be >= 0"),
        "negative noise": (dict(noise_scale=-0.5), ValueError, "noise_scale must be >= 0"),
        "string eps": (dict(eps="1e-3"), TypeError, "eps must be a real number"),
        "negative seed": (dict(seed=-3), ValueError, "seed must be in"),
        "float step": (dict(step=1.0), TypeError, "step must be an int"),
        "tensor not list": (dict(params=p[0]), TypeError, "params must be a list or tuple of tensors"),
        "list of arrays": (dict(grads=[1.0, 2.0]), TypeError, r"grads\[0\] must be a torch.Tensor"),
        "step_tensor dtype": (dict(step_tensor=torch.tensor([1.0])), ValueError, "step_tensor must be a one-element torch.int64"),
        "copy dtype": (dict(bf16_copies=[None, torch.zeros(2, 5, dtype=torch.float16)]), TypeError,
                       r"bf16_copies\[1\] has dtype torch.float16; allowed: torch.bfloat16"),
        "copy shape": (dict(bf16_copies=[torch.zeros(2, 3, 4, dtype=torch.bfloat16), None]), ValueError,
                       r"bf16_copies\[0\] has shape \(2, 3, 4\); expected \(2, 4, 3\)"),
        "copy count": (dict(bf16_copies=[None]), ValueError, "bf16_copies has 1 entries but params has 2"),
        "copy not tensor": (dict(bf16_copies=[None, 1.0]), TypeError, r"bf16_copies\[1\] must be a torch.Tensor or None"),
    }
    return cases[name]


NAMES = ["grads dtype", "params dtype", "list lengths", "center shape", "grad shape", "chain count", "no chain dim",
         "non-contiguous", "device", "mask dtype", "noise shape", "stats dtype", "stats shape", "negative eps",
         "nan nbeta", "inf gamma", "negative gamma", "negative noise", "string eps", "negative seed", "float step",
         "tensor not list", "list of arrays", "step_tensor dtype", "copy dtype", "copy shape", "copy count",
         "copy not tensor"]


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_named(fn, name):
    over, exc, match = mutate(name)
    case = base()
    before = case.clone()
    with pytest.raises(exc, match=match):
        call(fn, case, **over)
    assert all(torch.equal(a, b) for a, b in zip(case.params, before.params)), "params changed on a rejected call"


@requires_extension
@pytest.mark.parametrize("name", ["grads dtype", "list lengths", "center shape", "chain count", "non-contiguous",
                                  "mask dtype", "noise shape", "stats shape", "negative eps", "nan nbeta",
                                  "negative seed"])
def test_registered_op_checks_without_wrapper(name):
    over, _, _ = mutate(name)
    c = base()
    params = over.pop("params", c.params)
    grads = over.pop("grads", c.grads)
    centers = over.pop("centers", c.centers)
    h = dict(c.hyper, masks=None, noise=None, stats=None)
    h.update(over)
    with pytest.raises(RuntimeError, match="sgld_step_"):
        torch.ops.llcfast.sgld_step_(params, grads, centers, h["masks"], h["noise"], h["stats"], None, h["seed"],
                                     h["step"], h["chain_offset"], h["eps"], h["nbeta"], h["gamma"],
                                     h["weight_decay"], h["noise_scale"])


@requires_extension
def test_registered_op_checks_the_copies():
    c = base()
    h = c.hyper
    args = (c.params, c.grads, c.centers, None, None, None, None, h["seed"], h["step"], 0, 1e-3, 1.0, 1.0, 0.0, 1.0,
            0.0)
    empty = torch.zeros(0, dtype=torch.bfloat16)
    for copies, match in [([empty], r"bf16_copies has 1 tensors but params has 2"),
                          ([empty, torch.zeros(2, 5)], r"bf16_copies\[1\] has dtype Float; allowed: BFloat16"),
                          ([torch.zeros(2, 3, 4, dtype=torch.bfloat16), empty],
                           r"bf16_copies\[0\] has shape \[2, 3, 4\] but params\[0\] has shape \[2, 4, 3\]")]:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.llcfast.sgld_step_(*args, copies)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has dtype Half; allowed: Float or BFloat16"):
        torch.ops.llcfast.sgld_step_(c.params, [c.grads[0].half(), c.grads[1]], *args[2:])


@requires_extension
def test_registered_op_messages_carry_the_values():
    """The C++ checks format numbers and shapes themselves (no iostreams)."""
    c = base()
    h = c.hyper
    with pytest.raises(RuntimeError, match=r"eps must be >= 0, got -0\.25"):
        torch.ops.llcfast.sgld_step_(c.params, c.grads, c.centers, None, None, None, None, h["seed"], h["step"], 0,
                                     -0.25, 1.0, 1.0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match=r"centers\[1\] has shape \[6\]; expected \[5\]"):
        torch.ops.llcfast.sgld_step_(c.params, c.grads, [c.centers[0], torch.zeros(6)], None, None, None, None,
                                     h["seed"], h["step"], 0, 1e-3, 1.0, 1.0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match=r"out must be a contiguous float32 \[C, N\] tensor, got Double \[2, 3\]"):
        torch.ops.llcfast.philox_normal_(torch.zeros(2, 3, dtype=torch.float64), 0, 0, 0, 0)
