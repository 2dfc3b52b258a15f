"""Builds llcfast._C: C++ CPU kernels always, CUDA kernels when wanted.

LLCFAST_CUDA=0 builds CPU kernels only; LLCFAST_CUDA=1 requires CUDA and fails
if it cannot build it. Unset, CUDA is built where torch is a CUDA build, a
CUDA toolkit (nvcc) is found, a GPU is visible or TORCH_CUDA_ARCH_LIST names
archs, and a one-file probe that includes torch's CUDA headers compiles in
the environment the build runs in (under pip's build isolation those headers'
own dependencies may be missing); otherwise it says in one line why it built
the CPU kernels only. MAX_JOBS and TORCH_CUDA_ARCH_LIST are honoured (torch's
extension tooling reads them). Objects are kept in build/ between builds, so
an unchanged tree is not compiled again.
"""
import glob
import os
import shutil
import site
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

import torch


def _is_toolkit(root):
    lib = any(os.path.exists(os.path.join(root, d, "libcudart.so")) for d in ("lib64", "lib"))
    return os.path.exists(os.path.join(root, "bin", "nvcc")) and lib


def _resolve_cuda_home():
    # torch derives CUDA_HOME from `which nvcc`; a wrapper or link such as
    # /usr/local/bin/nvcc then gives /usr/local, which has no libcudart, and
    # the link fails. Pick a directory that is a whole toolkit instead.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if _is_toolkit(root):
            os.environ["CUDA_HOME"] = root
            return


_resolve_cuda_home()
from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_ARCHS_WITHOUT_GPU = "8.0;9.0"


def want_cuda():
    """(build the CUDA kernels?, why): build_ext prints the reason when they
    are skipped, and `llcfast info` shows it either way."""
    flag = os.environ.get("LLCFAST_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        sys.exit(f"LLCFAST_CUDA={flag!r} is not allowed; use 0 (CPU only), 1 (require CUDA) or leave it unset (auto)")
    torch_cuda = torch.version.cuda is not None
    toolkit = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    if flag == "0":
        return False, "skipped: LLCFAST_CUDA=0"
    if flag == "1":
        if not torch_cuda:
            sys.exit(f"LLCFAST_CUDA=1 but torch {torch.__version__} is not a CUDA build")
        if not toolkit:
            sys.exit("LLCFAST_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to a directory with bin/nvcc")
        return True, "built: LLCFAST_CUDA=1"
    if not (torch_cuda and toolkit):
        return skipped(f"torch CUDA build: {torch_cuda}, nvcc found: {toolkit}")
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return skipped("no GPU is visible and TORCH_CUDA_ARCH_LIST is not set; LLCFAST_CUDA=1 or "
                       "TORCH_CUDA_ARCH_LIST=9.0 builds the CUDA kernels without a GPU")
    failure = cuda_probe_failure()
    if failure:
        return skipped(f"a CUDA file that includes torch's CUDA headers does not compile here ({failure}); install "
                       "with --no-build-isolation into the environment that has torch's CUDA packages, or set "
                       "LLCFAST_CUDA=1 to see the whole error")
    return True, ("built: a GPU is visible" if torch.cuda.is_available() else
                  f"built: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")


def skipped(why):
    return False, f"skipped: {why}"


PROBE = "#include <ATen/cuda/CUDAContext.h>\n__global__ void llcfast_probe(float* x) { x[0] = 1.0f; }\n"


def cuda_probe_failure():
    """None if one .cu file including torch's CUDA headers compiles, else
    the compiler's first error line."""
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    try:
        dirs = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch before 2.6
        dirs = cpp_extension.include_paths(cuda=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        with open(src, "w") as f:
            f.write(PROBE)
        first = None
        for std in ("c++17", "c++20"):  # newer torch needs C++20, as its own extension builds ask for
            cmd = [nvcc, "-c", src, "-o", os.path.join(tmp, "probe.o"), f"-std={std}"]
            cmd += [f"-I{d}" for d in dirs + cuda_wheel_includes()]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"{type(exc).__name__}: {exc}"
            if res.returncode == 0:
                return None
            lines = [ln for ln in (res.stderr + res.stdout).splitlines() if "error" in ln.lower()]
            first = first or (lines[0] if lines else f"nvcc exited with {res.returncode}").strip()
    return first


def cuda_arch_list():
    # Without a visible GPU torch would target every arch of its own build,
    # which multiplies compile time; default to the datacentre archs instead.
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS_WITHOUT_GPU
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def cuda_wheel_includes():
    # torch's CUDA headers include cuBLAS/cuSPARSE headers; a toolkit without
    # them (a compiler-only install) finds them in torch's nvidia-* wheels.
    dirs = []
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def write_build_config(with_cuda, archs):
    text = (
        "// Generated by setup.py; describes this build.\n#pragma once\n"
        f"#define LLCFAST_WITH_CUDA {int(with_cuda)}\n"
        f'#define LLCFAST_CUDA_ARCHS "{archs}"\n'
        f'#define LLCFAST_BUILD_TORCH "{torch.__version__}"\n'
        f'#define LLCFAST_BUILD_CUDA "{torch.version.cuda or ""}"\n'
    )
    path = os.path.join(CSRC, "build_config.h")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def write_build_choice(why):
    """llcfast/_build_choice.py: why the CUDA kernels were built or skipped, for `llcfast info`."""
    text = f'"""Written by setup.py: why this build has, or lacks, CUDA kernels."""\nCUDA = {why!r}\n'
    path = os.path.join(ROOT, "llcfast", "_build_choice.py")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


CUDA_CHOICE = []  # why, as extension() decided it: setup.py runs once per build hook, build_ext once


def extension():
    with_cuda, why = want_cuda()
    CUDA_CHOICE.append(why)
    archs = cuda_arch_list() if with_cuda else ""
    write_build_config(with_cuda, archs)
    write_build_choice(why)
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx = ["-O3", "-ffp-contract=off"]
    if not with_cuda:
        return cpp_extension.CppExtension("llcfast._C", sources, include_dirs=[CSRC],
                                          extra_compile_args={"cxx": cxx})
    sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    return cpp_extension.CUDAExtension("llcfast._C", sources, include_dirs=[CSRC] + cuda_wheel_includes(),
                                       extra_compile_args={"cxx": cxx, "nvcc": nvcc})


class BuildExtension(cpp_extension.BuildExtension):
    """Says once why the CUDA kernels were left out, and keeps the objects in
    build/ of the checkout, whatever temporary folder pip gives the build (an
    editable install gets a new one each time), so ninja finds them up to
    date and compiles only what changed."""

    def run(self):
        if CUDA_CHOICE and CUDA_CHOICE[-1].startswith("skipped: "):
            print("llcfast: building CPU kernels only: " + CUDA_CHOICE[-1][len("skipped: "):])
        super().run()

    def finalize_options(self):
        super().finalize_options()
        tag = f"{sys.implementation.cache_tag}-torch{torch.__version__}"
        self.build_temp = os.path.join(ROOT, "build", f"objects-{tag}")


setup(
    packages=find_packages(include=["llcfast", "llcfast.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
