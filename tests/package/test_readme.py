"""The README's first code block runs as pasted, and prints what the README
says it prints: an estimate with its checks and a verdict."""
import contextlib
import io
import os
import re

import torch

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_the_readmes_first_code_block_runs_as_pasted(tmp_path, monkeypatch):
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    scope = {"__name__": "__main__"}
    with contextlib.redirect_stdout(printed):
        exec(compile(block, "README.md", "exec"), scope)
    out = printed.getvalue()
    assert re.match(r"LLC \d+\.\d+ ± \d", out) and "(standard error, 8 of 8 chains x 200 draws" in out
    assert out.rstrip().splitlines()[-1].startswith("verdict: ")
    assert (tmp_path / "traces.png").stat().st_size > 0
    result = scope["result"]
    assert result.config["init_loss"] == "exact" and "epsilon_auto" in result.config
    assert result.diagnostics["step_check"]["step_rule"] <= 0.1
    # The known answer at this nbeta and gamma: the loss is quadratic, S = X^T X / n, and each eigenmode
    # contributes nbeta s / (2 nbeta s + gamma), which tends to 1/2 as nbeta grows.
    x, nbeta, gamma = scope["x"].double(), result.config["nbeta"], result.config["gamma"]
    s = torch.linalg.eigvalsh(x.T @ x / x.shape[0])
    exact = float((nbeta * s / (2 * nbeta * s + gamma)).sum())
    assert abs(exact - 4.93) < 0.01
    assert abs(result.llc_mean - exact) < 4 * result.llc_se, (result.llc_mean, exact, result.llc_se)
