"""What a user who types `pip install <sdist>` gets, with pip's build
isolation on: the build compiles against the torch pip puts in its own
temporary environment, skips the CUDA kernels on a machine without a GPU
saying so in one line, and the installed package estimates an LLC from
outside the source tree. Minutes of work (pip installs torch into the build's
environment), so it is marked slow: `pytest -m slow` runs it."""
import glob
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

RUN = """
import torch, llcfast
info = llcfast.build_info()
assert info["extension_loaded"] and info["cpu_kernels"], info
assert llcfast.__file__.startswith({site!r}), llcfast.__file__
torch.manual_seed(0)
x = torch.randn(256, 4)
model = torch.nn.Linear(4, 1, bias=False)
r = llcfast.estimate_llc(model, [(x, x.sum(-1))], lambda m, b: ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean(),
                         num_chains=2, num_draws=20, nbeta=10.0, progress=False)
print("LLC", r.llc_mean)
"""


def run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on a GPU machine the build includes CUDA")
def test_an_sdist_installs_with_build_isolation_and_estimates_from_elsewhere(tmp_path):
    # The sdist itself is made in this environment (it compiles nothing); the install below is isolated.
    run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path / "dist"), ROOT])
    sdist, = glob.glob(str(tmp_path / "dist" / "llcfast-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    for source in glob.glob(os.path.join(ROOT, "csrc", "*.*")):
        if not source.endswith("build_config.h"):
            assert any(n.endswith("csrc/" + os.path.basename(source)) for n in names), source
    # A fresh environment that sees this machine's torch, so the install below does not copy it again.
    env_dir = tmp_path / "env"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(env_dir)])
    python = str(env_dir / "bin" / "python")
    clean = {k: v for k, v in os.environ.items() if k not in ("LLCFAST_CUDA", "TORCH_CUDA_ARCH_LIST")}
    built = run([python, "-m", "pip", "install", "-v", "--no-deps", sdist], env=clean, cwd=str(tmp_path))
    lines = [ln for ln in (built.stdout + built.stderr).splitlines() if "llcfast: building CPU kernels only" in ln]
    assert len(lines) == 1 and "LLCFAST_CUDA=1" in lines[0], (lines, built.stdout[-3000:], built.stderr[-3000:])
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    out = run([python, "-c", RUN.format(site=site)], cwd=str(tmp_path)).stdout
    assert out.startswith("LLC ")
