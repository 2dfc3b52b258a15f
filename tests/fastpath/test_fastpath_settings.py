"""The one switch for the fast paths: its argument forms and errors, what
estimate_llc records, and that a path asked for by argument runs (and one
left off does not) with the same numbers."""
import subprocess
import sys

import pytest
import torch

import llcfast
from conftest import requires_extension
from llcfast.fastpath import settings
from llcfast.fastpath.settings import PATHS, FastPath
from llcfast.pipeline import fused_losses, models


def test_nothing_unmeasured_is_on_by_default():
    default = FastPath.default()
    assert all(getattr(default, path) == (("cuda",) if path in settings.MEASURED else ()) for path in PATHS)
    assert settings.current() == default


def test_argument_forms():
    assert settings.resolve("off") == FastPath()
    assert settings.resolve("all") == FastPath.every(("cuda",))
    assert settings.resolve({"attention": True, "head": ("cpu", "cuda")}).attention == ("cuda",)
    assert settings.resolve({"attention": True, "head": ("cpu", "cuda")}).head == ("cpu", "cuda")
    chosen = FastPath(linear=("cuda",))
    assert settings.resolve(chosen) is chosen
    with settings.using(chosen):
        assert settings.resolve(None) == chosen  # None: the settings in force
        assert settings.resolve({"token_loss": True}) == chosen.replace(token_loss=("cuda",))
    assert settings.current() == FastPath.default()


@pytest.mark.parametrize("bad, message", [("fast", "expected None, 'off', 'all'"),
                                          ({"atention": True}, r"unknown paths \['atention'\]"),
                                          ({"head": ("tpu",)}, r"device types \['tpu'\]")])
def test_bad_settings_name_the_value(bad, message):
    with pytest.raises(ValueError, match=message):
        settings.resolve(bad)


def test_a_bad_fastpath_fails_before_any_work():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="fastpath"):
        llcfast.estimate_llc(model, [(torch.zeros(4, 2), torch.zeros(4, 1))], lambda m, b: m(b[0]).pow(2).mean(),
                             fastpath="everything", epsilon=1e-3, num_burnin=0, progress=False)


def test_the_models_losses_have_fast_forms_and_others_none():
    assert settings.substitute(models.next_token_loss) is fused_losses.next_token_loss_fast
    assert settings.substitute(models.hf_next_token_loss) is fused_losses.hf_next_token_loss_fast
    assert settings.substitute(models.regression_loss) is models.regression_loss
    unhashable = type("Unhashable", (), {"__eq__": lambda s, o: False, "__hash__": None, "__call__": lambda s: 0})()
    assert settings.substitute(unhashable) is unhashable


def _lm_run(**kwargs):
    torch.manual_seed(0)
    model = models.AttentionOnlyLM(vocab=40, d_model=16, heads=4, context=32).to(torch.float32)
    g = torch.Generator().manual_seed(1)
    loader = [torch.randint(0, 40, (3, 17), generator=g) for _ in range(4)]
    return llcfast.estimate_llc(model, loader, models.next_token_loss, num_burnin=0, num_chains=3, num_draws=4,
                                nbeta=5.0, epsilon=1e-3, progress=False, backend="fast", seed=3, chain_chunk=3,
                                **kwargs)


@requires_extension
@pytest.mark.filterwarnings("ignore:the LLC estimate is negative")
def test_a_path_asked_for_runs_and_gives_the_plain_numbers():
    plain = _lm_run()
    fused = _lm_run(fastpath={"head": ("cpu",)})
    assert plain.config["fastpath"] == {path: [] for path in PATHS}
    assert fused.config["fastpath"]["head"] == ["cpu"]
    assert fused.config.get("head_fusion") is True and "head_fusion" not in plain.config
    torch.testing.assert_close(fused.loss_trace, plain.loss_trace, rtol=1e-5, atol=1e-6)
    assert settings.current() == FastPath.default()  # the run's settings end with it


def test_the_command_line_answers_help_and_argument_errors_without_torch():
    code = ("import sys\n"
            "from llcfast.cli import main\n"
            "for argv in (['--help'], ['sweep', '--help'], ['estimate', 'runs/x', '--bogus']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('llcfast.'))\n"
            "print('LOADED', loaded)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: llcfast" in done.stdout and "unrecognized arguments: --bogus" in done.stderr
    loaded = done.stdout.rsplit("LOADED", 1)[1]
    assert "'torch'" not in loaded, loaded


def test_the_hessian_functions_take_and_record_the_settings():
    model = torch.nn.Linear(3, 1)
    batches = [(torch.randn(8, 3), torch.randn(8, 1))]

    def mse(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean()

    trace = llcfast.hessian_trace(model, mse, batches, num_probes=4, progress=False, fastpath={"linear": True})
    assert trace.config["fastpath"]["linear"] == ["cuda"] and trace.config["fastpath"]["head"] == []
    eigs = llcfast.hessian_eigs(model, mse, batches, k=1, progress=False)
    assert eigs.config["fastpath"] == {path: [] for path in PATHS}
    with pytest.raises(ValueError, match="unknown paths"):
        llcfast.hessian_spectrum(model, mse, batches, progress=False, fastpath={"fold": True})
