"""The benchmark tables of docs/performance.md: rendered from the results JSON, ranges over
same-day repeats, the newest date only, smoke runs left out, and only the
marked blocks rewritten."""
import copy
import json
import os
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import tables  # noqa: E402


def sampler_report(date, fused_ms, quick=False):
    return {"device": "GPU X", "torch": "2.11", "date": date, "quick": quick, "rows": [
        {"sampler": "sgld", "params_per_chain": 10**6, "chains": 8, "fused_ms": fused_ms, "fused_GBps": 500.0,
         "fraction_of_copy": 0.2},
        {"sampler": "sgld", "params_per_chain": 10**9, "chains": 8, "skipped": "does not fit in device memory"}]}


def write(folder, name, report):
    with open(os.path.join(folder, name), "w") as f:
        json.dump(report, f)


def test_repeats_show_as_ranges_and_only_the_newest_full_runs_count(tmp_path):
    write(tmp_path, "samplers_GPU_2026-01-01.json", sampler_report("2026-01-01", 9.0))
    write(tmp_path, "samplers_GPU_2026-02-01.json", sampler_report("2026-02-01", 0.18))
    write(tmp_path, "samplers_GPU_2026-02-01_repeat1.json", sampler_report("2026-02-01", 0.25))
    write(tmp_path, "samplers_quick_GPU_2026-03-01.json", sampler_report("2026-03-01", 5.0, quick=True))
    write(tmp_path, "unrelated.json", {"x": 1})
    found = tables.load(str(tmp_path))
    assert list(found) == ["samplers"] and len(found["samplers"]) == 3
    table = tables.render("samplers", found["samplers"])
    assert "GPU X, torch 2.11, 2026-02-01" in table and "2026-01-01" not in table
    lines = table.splitlines()
    assert lines[2].startswith("| sampler | params per chain | chains | fused step (ms) | GB/s | of copy |")
    assert "twin" not in lines[2]  # a column no report has is left out
    assert "| sgld | 1e6 | 8 | 0.18–0.25 | 500 | 20% |" in table
    assert "| sgld | 1e9 | 8 |  |  |  | does not fit in device memory |" in table


def test_each_device_shows_its_own_newest_date(tmp_path):
    write(tmp_path, "samplers_GPU_2026-02-01.json", sampler_report("2026-02-01", 0.18))
    cpu = dict(sampler_report("2026-01-01", 9.0), device="AMD EPYC, 2 threads")
    write(tmp_path, "samplers_CPU_2026-01-01.json", cpu)
    write(tmp_path, "samplers_CPU_2025-12-01.json", dict(sampler_report("2025-12-01", 7.0), device=cpu["device"]))
    table = tables.render("samplers", tables.load(str(tmp_path))["samplers"])
    assert table.index("GPU X, torch 2.11, 2026-02-01") < table.index("AMD EPYC, 2 threads, torch 2.11, 2026-01-01")
    assert "| 9 |" in table and "| 7 |" not in table and "2025-12-01" not in table


def test_llc_columns_follow_the_runs_and_the_checks():
    report = json.load(open(os.path.join(ROOT, "tests", "data", "llc_report.json")))
    table = tables.render("llc", [("llc_x.json", report)])
    header = table.splitlines()[2]
    assert header == ("| case | params | chains | fp32 (ms) | bf16 (ms) | reference (ms) | devinterp-1.3.2 (ms) "
                      "| fastest vs devinterp | fp32 of matmul peak | bf16 - fp32 (SE) | z vs devinterp, same steps |")
    # bf16 - fp32 = 0.1 with an fp32 standard error of 0.5; the fastest run is bf16 at 40x
    assert "| lr-8ch | 5.3e4 | 8 | 1 | 0.5 | 300 | 20 | 40.0x | 5% | +0.20 | -0.40 |" in table


def test_only_marked_blocks_are_rewritten():
    text = "intro\n<!-- results:llc -->\nold\n<!-- /results:llc -->\nmiddle\n<!-- results:large -->\n<!-- /results:large -->\n"
    new = tables.update_readme(text, {"llc": "TABLE", "samplers": "unused"})
    assert new == text.replace("old", "TABLE")
    assert tables.update_readme(new, {"llc": "TABLE"}) == new
    with pytest.raises(ValueError, match="exactly one <!-- results:llc -->"):
        tables.update_readme(text + "<!-- results:llc -->", {"llc": "T"})
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        tables.render("nope", [])


def test_the_readme_tables_match_the_results_folder():
    """Results JSON committed without the README regenerated fails here:
    python benchmarks/tables.py --readme docs/performance.md"""
    readme = open(os.path.join(ROOT, "docs", "performance.md")).read()
    rendered = {kind: tables.render(kind, reports) for kind, reports in tables.load().items()}
    assert rendered, "benchmarks/results/ holds no full reports"
    assert tables.update_readme(readme, rendered) == readme
    for kind in rendered:
        assert f"<!-- results:{kind} -->" in readme


def test_the_input_reports_are_not_modified():
    report = sampler_report("2026-02-01", 0.2)
    before = copy.deepcopy(report)
    tables.render("samplers", [("a.json", report)])
    assert report == before
