"""benchmarks/tensor_loader.py and benchmarks/landscape_passes.py, run
small: each way they time gives the same numbers, and the report holds a
row per case."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from benchmarks import landscape_passes, tensor_loader  # noqa: E402


@pytest.mark.filterwarnings("ignore")
def test_the_indexed_loader_gives_the_estimates_of_the_collated_one(tmp_path):
    tensor_loader.main(["--quick", "--out", str(tmp_path / "t.json")])
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["equal_estimates"] and r["per_sample_s"] > 0 for r in rows)


def test_every_way_of_passing_the_points_gives_the_same_losses(tmp_path):
    landscape_passes.main(["--quick", "--out", str(tmp_path / "l.json")])
    rows = json.loads((tmp_path / "l.json").read_text())["rows"]
    assert {r["call"] for r in rows} == {"loss_along_path", "layer_ablation", "layer_ablation twin"}
    assert len(rows) == 9 and max(r["max_relative_difference"] for r in rows) < 1e-5
