"""What was built is reported, and a missing extension degrades to the
reference with one clear warning."""
import json
import os
import subprocess
import sys

import torch

import llcfast
from llcfast import cli
from conftest import requires_extension


@requires_extension
def test_build_info_reports_kernels_and_versions():
    info = llcfast.build_info()
    assert info["cpu_kernels"] is True
    assert info["built_with_torch"] == torch.__version__
    assert info["torch"] == torch.__version__
    if info["cuda_kernels"]:
        assert info["cuda_archs"], "a CUDA build must name its archs"
    # Why the build has, or lacks, its CUDA kernels (setup.py records it; llcfast info prints it).
    assert info["cuda_build_choice"].startswith("built: " if info["cuda_kernels"] else "skipped: ")
    assert hasattr(torch.ops.llcfast, "sgld_step_")


def test_info_command_prints_build(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "CPU kernels" in out and "CUDA kernels" in out and torch.__version__ in out
    assert llcfast.build_info()["cuda_build_choice"] in out
    assert cli.main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["torch"] == torch.__version__


def test_missing_extension_falls_back_with_one_warning():
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "import llcfast\n"
        "from llcfast import ops, reference\n"
        "assert not llcfast.extension_available()\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = ops.philox_normal(2, 9, seed=1, step=2)\n"
        "    p = [torch.zeros(2, 3)]; ops.sgld_step_(p, [torch.ones(2, 3)], [torch.zeros(3)], eps=1e-2, nbeta=1.0,\n"
        "                                          gamma=1.0, seed=1, step=2)\n"
        "msgs = [str(x.message) for x in w if 'compiled kernels unavailable' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'pip install --no-build-isolation -e .' in msgs[0]\n"
        "assert torch.equal(a, reference.philox_normal(2, 9, seed=1, step=2))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, LLCFAST_DISABLE_EXTENSION="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_cli_entry_point_runs_as_module():
    res = subprocess.run([sys.executable, "-m", "llcfast.cli", "info"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "CUDA kernels" in res.stdout


def test_ci_build_compiles_cuda_kernels():
    """CI has no GPU but has a toolkit: the CUDA kernels must still be built,
    so a broken .cu never lands."""
    from torch.utils import cpp_extension
    if os.environ.get("CI") != "true" or torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        import pytest
        pytest.skip("only on CI with a CUDA build of torch and a CUDA toolkit")
    assert llcfast.build_info()["cuda_kernels"], "CI built llcfast without its CUDA kernels"
