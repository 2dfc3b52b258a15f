#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA kernels, run the CUDA tests, run
# the benchmarks. Steps are named on the command line (default: all), each
# under its own time limit so one hang does not cost the others; the log
# (session.log), JSON and an archive of profiles go to $OUT (or ./gpu-out),
# at most 8 files, as many as come back from a device call.
#
#   bash benchmarks/gpu_session.sh build tests fold fold_large hessian attention large llc compiled demo
#
# A device call runs at most 600 s and a session has 1800 s of device time,
# machine start included, so split the steps over calls, most wanted first:
#   1. build tests   (limits 300 + 300; build 56-62 s and tests 211 s on
#                    the H100, 2026-11-24)
#   1b. fold         (240: the engine's SDPA, layer-norm and linear folds
#                    and the fused unembedding-and-loss against torch's own
#                    vmap of each, and the bf16 copies against casts, on the
#                    LM; never measured yet)
#   1c. fold_large   (7 x 80: the same on GPT-2 124M, each left out in turn,
#                    the weights cast each step instead of the step's bf16
#                    copies, and the model's own .loss in place of the fused one)
#   2. hessian       (540: HVP modes, precisions, compiled trace, planner;
#                    not run since 2026-11-23)
#   3. attention large (120 + 540: which attention kernels GPT-2 runs under
#                    the engine's transforms, then the large models; set
#                    LARGE_ARGS, e.g. "--sizes 774M --batch 2". bench_large
#                    now builds GPT-2 with the one-kernel GELU, which halves
#                    the activations: try 774M at batch 8 again, and
#                    "--sizes 124M --activation gelu_new" to compare with the
#                    2026-11-24 runs, which used GPT-2's own GELU)
#   4. llc compiled  (540 + 480: the speed tables; 232 s and 461 s on the
#                    H100, 2026-11-24)
#   5. landscape     (200 + 200: loss_along_path and layer_ablation stacked
#                    against one point at a time, whose GPU default is all
#                    points a pass; the indexed TensorDataset loader against
#                    the loader's own fetch; never measured on a GPU)
#
# The machine goes back 30 s after a call ends: make the next call at once, or
# its fresh machine builds again (the built .so is over the 16 MiB that comes
# back from $OUT, so it cannot be carried).
#
# Missing Python packages (devinterp, curvlinops, ...) travel as wheels in
# .whl/ (bash benchmarks/fetch_peer_wheels.sh makes it; name .whl in the
# call's carry); a prebuilt llcfast/_C*.so is reused when its build matches
# this torch.
#
# Back on the development machine: copy the JSON into benchmarks/results/
# (names as results_io.save_report gives them), then
# python benchmarks/tables.py --readme README.md.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build tests llc hessian demo)

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi

step() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)" | tee -a "$OUT/session.log"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/session.log" | tail -n 25
  local rc=${PIPESTATUS[0]}
  echo "=== $name rc=$rc in $((SECONDS - t0))s"
  echo "$name rc=$rc $((SECONDS - t0))s" >> "$OUT/summary.txt"
}

merge_rows() {  # into, reports...: one report holding every report's rows (the first one's header)
  local into=$1; shift
  python3 - "$into" "$@" <<'PY'
import json, os, sys
reports = [json.load(open(p)) for p in sys.argv[2:] if os.path.exists(p)]
if reports:
    merged = dict(reports[0], rows=[row for r in reports for row in r["rows"]])
    json.dump(merged, open(sys.argv[1], "w"), indent=1)
    for p in sys.argv[2:]:
        if os.path.exists(p) and os.path.abspath(p) != os.path.abspath(sys.argv[1]):
            os.remove(p)
PY
}

for s in "${steps[@]}"; do
  case $s in
    build)
      step build 300 env LLCFAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
        python3 -m pip install -q --no-build-isolation --no-deps -e .
      python3 -c "import llcfast, json; print(json.dumps(llcfast.build_info()))" | tee "$OUT/build_info.json" ;;
    tests)
      # every test that needs the GPU carries the cuda marker (tests/conftest.py)
      step tests 300 python3 -m pytest -q -p no:cacheprovider --timeout 240 -m cuda tests ;;
    fold)  # the chains folded into one SDPA and one layer-norm call each way, the bias adds into their
           # matmuls and the unembedding and loss fused, against torch's vmap of each
      step fold_llc 240 python3 benchmarks/bench_llc.py --cases lm-8 --skip-devinterp --ref-steps 1 --steps 200 \
        --precisions bf16+sdpa,bf16+sdpa+nonorm,bf16+sdpa+nolinear,bf16+sdpa+nohead,bf16+sdpa+nocopies,bf16+sdpa+nofold,fp32+sdpa,fp32+sdpa+nofold \
        --profile --out "$OUT/llc_fold.json" ;;
    fold_large)  # the same folds on GPT-2 124M, each left out in turn
      step fold_large 80 python3 benchmarks/bench_large.py --sizes 124M --draws 30 --skip-devinterp --out "$OUT/large_fold.json"
      step fold_large_nonorm 80 python3 benchmarks/bench_large.py --sizes 124M --draws 30 --skip-devinterp \
        --no-norm-fold --out "$OUT/large_nonorm.json"
      step fold_large_nolinear 80 python3 benchmarks/bench_large.py --sizes 124M --draws 30 --skip-devinterp \
        --no-linear-fold --out "$OUT/large_nolinear.json"
      step fold_large_nohead 80 python3 benchmarks/bench_large.py --sizes 124M --draws 30 --skip-devinterp \
        --no-head-fusion --out "$OUT/large_nohead.json"
      step fold_large_nocopies 80 python3 benchmarks/bench_large.py --sizes 124M --draws 30 --skip-devinterp \
        --no-bf16-copies --out "$OUT/large_nocopies.json"
      step fold_large_off 80 python3 benchmarks/bench_large.py --sizes 124M --draws 30 --skip-devinterp --no-fold \
        --out "$OUT/large_nofold.json"
      step fold_large_hfloss 80 python3 benchmarks/bench_large.py --sizes 124M --draws 30 --skip-devinterp --hf-loss \
        --out "$OUT/large_hfloss.json"
      merge_rows "$OUT/large_folds.json" "$OUT"/large_fold.json "$OUT"/large_no*.json "$OUT/large_hfloss.json" ;;
    llc)
      step llc 540 python3 benchmarks/bench_llc.py --slow-steps 30 --ref-steps 10 --precisions fp32,tf32,bf16,fp32+sdpa,bf16+sdpa,bf16+sdpa+nofold --profile --out "$OUT/llc.json" ;;
    compiled)  # the fast engine with compile=True, next to plain fp32 and bf16
      step compiled 480 python3 benchmarks/bench_llc.py --skip-devinterp --ref-steps 2 \
        --precisions fp32,bf16,fp32+compile,bf16+compile,bf16+compile+sdpa,fp32+autotune --out "$OUT/llc_compiled.json" ;;
    attention)  # the kernels and memory of one GPT-2 chain under grad and vmap(grad)
      step attention 120 python3 benchmarks/attention_path.py --size ${ATTENTION_SIZE:-774M} --batch 2 ;;
    large)
      step large 540 python3 benchmarks/bench_large.py ${LARGE_ARGS:-} --out "$OUT/large.json" ;;
    hessian)
      step hessian 540 python3 benchmarks/bench_hessian.py ${HESSIAN_ARGS:-} --out "$OUT/hessian.json" ;;
    landscape)  # the landscape's stacked points and the indexed TensorDataset loader, each against its plain way
      step landscape 200 python3 benchmarks/landscape_passes.py --device cuda --out "$OUT/landscape_passes.json"
      step tensor_loader 200 python3 benchmarks/tensor_loader.py --device cuda --out "$OUT/tensor_loader.json" ;;
    demo)
      step demo 240 python3 -m llcfast.cli demo --device cuda --quiet --out /tmp/demo-cuda
      cp /tmp/demo-cuda/report.png "$OUT/demo_cuda_report.png" 2>/dev/null ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
# At most 8 files come back from a call: the profiles travel as one archive.
if ls "$OUT"/profile_*.txt >/dev/null 2>&1; then
  tar czf "$OUT/profiles.tar.gz" -C "$OUT" $(cd "$OUT" && ls profile_*.txt) && rm "$OUT"/profile_*.txt
fi
cat "$OUT/summary.txt"
