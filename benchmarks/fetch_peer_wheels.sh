#!/usr/bin/env bash
# The peers the benchmarks compare against, as wheels in .whl/ for a GPU
# machine that cannot reach PyPI (gpu_session.sh installs them from there).
# Pure-Python wheels; their needs that the GPU image lacks are named too
# (devinterp: none; curvlinops: backpack-for-pytorch, einconv, unfoldNd).
#
#   bash benchmarks/fetch_peer_wheels.sh      # then carry .whl in the device call
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  devinterp==1.3.2 curvlinops-for-pytorch==3.0.1 hessian-eigenthings==1.0.0a5 \
  backpack-for-pytorch==1.7.1 einconv==0.1.0 unfoldNd
ls -l .whl
