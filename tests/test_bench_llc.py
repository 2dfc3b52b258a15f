"""benchmarks/bench_llc.py on a CPU: a smoke run whose profiles describe the
variant named in their file (a "+sdpa" profile once ran the matmul model,
because the attention was set back before it was taken)."""
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_llc  # noqa: E402


def test_each_profile_runs_its_own_variant(tmp_path):
    out = tmp_path / "llc.json"
    bench_llc.main(["--quick", "--device", "cpu", "--cases", "lm-8", "--precisions", "fp32,fp32+sdpa",
                    "--skip-devinterp", "--steps", "3", "--ref-steps", "1", "--profile", "--out", str(out)])
    runs = json.loads(out.read_text())["cases"][0]["runs"]
    assert {"llcfast-fp32", "llcfast-fp32+sdpa", "llcfast-reference"} <= set(runs)
    sdpa = (tmp_path / "profile_lm-8ch_fp32-sdpa.txt").read_text()
    matmul = (tmp_path / "profile_lm-8ch_fp32.txt").read_text()
    assert "scaled_dot_product" in sdpa and "scaled_dot_product" not in matmul


def test_nofold_leaves_sdpa_to_torch_for_its_run_only(tmp_path, monkeypatch, fold_as_on_cuda):
    from llcfast import chain_attention
    calls = []
    inner = chain_attention._attend
    monkeypatch.setattr(chain_attention, "_attend", lambda *a: calls.append(1) or inner(*a))
    assert bench_llc.variant_error("bf16+sdpa+nofold") is None
    assert "+sdpa only" in bench_llc.variant_error("bf16+nofold")
    counts = []
    for variant in ("fp32+sdpa+nofold", "fp32+sdpa"):
        bench_llc.main(["--quick", "--device", "cpu", "--cases", "lm-8", "--precisions", variant, "--skip-devinterp",
                        "--steps", "3", "--ref-steps", "1", "--out", str(tmp_path / "llc.json")])
        counts.append(len(calls))
        assert chain_attention.FOLD_DEVICES == {"cpu", "cuda"}
    assert counts[0] == 0 and counts[1] > 0
