"""benchmarks/bench_llc.py on a CPU: a smoke run whose profiles describe the
variant named in their file (a "+sdpa" profile once ran the matmul model,
because the attention was set back before it was taken)."""
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_llc  # noqa: E402
from llcfast.fastpath import settings  # noqa: E402


def test_each_profile_runs_its_own_variant(tmp_path):
    out = tmp_path / "llc.json"
    bench_llc.main(["--quick", "--device", "cpu", "--cases", "lm-8", "--precisions", "fp32,fp32+sdpa",
                    "--skip-devinterp", "--steps", "3", "--ref-steps", "1", "--profile", "--out", str(out)])
    runs = json.loads(out.read_text())["cases"][0]["runs"]
    assert {"llcfast-fp32", "llcfast-fp32+sdpa", "llcfast-reference"} <= set(runs)
    sdpa = (tmp_path / "profile_lm-8ch_fp32-sdpa.txt").read_text()
    matmul = (tmp_path / "profile_lm-8ch_fp32.txt").read_text()
    assert "scaled_dot_product" in sdpa and "scaled_dot_product" not in matmul


def test_nofold_nonorm_nolinear_and_nohead_leave_folds_to_torch_for_their_run_only(tmp_path, monkeypatch,
                                                                                    fold_as_on_cuda):
    assert bench_llc.variant_error("bf16+sdpa+nofold") is None and bench_llc.variant_error("bf16+nonorm") is None
    assert bench_llc.variant_error("bf16+sdpa+nonorm+nolinear+nohead") is None
    assert "drop +nonorm" in bench_llc.variant_error("bf16+nofold+nonorm")
    assert "drop +nolinear" in bench_llc.variant_error("bf16+nolinear+nofold")
    assert "drop +nohead" in bench_llc.variant_error("bf16+nohead+nofold")
    folds = {}
    variants = ("fp32+sdpa+nofold", "fp32+sdpa+nonorm", "fp32+sdpa+nolinear", "fp32+sdpa+nohead", "fp32+sdpa")
    for variant in variants:
        bench_llc.main(["--quick", "--device", "cpu", "--cases", "lm-8", "--precisions", variant, "--skip-devinterp",
                        "--steps", "3", "--ref-steps", "1", "--out", str(tmp_path / "llc.json")])
        run = json.loads((tmp_path / "llc.json").read_text())["cases"][0]["runs"][f"llcfast-{variant}"]
        folds[variant] = (run["attention_fold"], run["layer_norm_fold"], run["linear_fold"], run["head_fusion"])
        after = settings.current()  # the benchmark's variants are undone
        assert after.attention == after.layer_norm == after.linear == after.head == ("cpu", "cuda")
    assert folds == {"fp32+sdpa+nofold": (False, False, False, False), "fp32+sdpa+nonorm": (True, False, True, True),
                     "fp32+sdpa+nolinear": (True, True, False, True), "fp32+sdpa+nohead": (True, True, True, False),
                     "fp32+sdpa": (True, True, True, True)}
