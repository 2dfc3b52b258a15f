"""The behavioural metrics of the paper's models: attention patterns are the
ones the layers apply, head scores and the bigram KL against constructed
answers, the regression metrics against the zero predictor's exact values,
and their place in sweeps and reports."""
import json
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llcfast.pipeline.models import AttentionOnlyLM, CausalSelfAttention, InContextRegression
from llcfast.pipeline import train
from llcfast.pipeline.behaviour import (BigramTable, LanguageBehaviour, RegressionBehaviour, attention_patterns,
                                        change_lines, layer_norm_rms, prefix_matching_score, previous_token_score,
                                        series, stage_changes)
from llcfast.pipeline.report import stage_table, write_report
from llcfast.pipeline.sweep import read_results, settings_key, sweep
from llcfast.pipeline.tasks import RegressionTask
from pipeline_configs import tiny, tiny_language


def _outputs_and_patterns(model, *inputs):
    outs = []
    hooks = [m.register_forward_hook(lambda mod, args, out: outs.append((mod, args[0], out)))
             for m in model.modules() if isinstance(m, CausalSelfAttention)]
    with torch.no_grad():
        model(*inputs)
    for h in hooks:
        h.remove()
    return outs, attention_patterns(model, *inputs)


@pytest.mark.parametrize("make", ["lm", "lr"])
def test_patterns_are_the_weights_each_layer_applies(make):
    torch.manual_seed(0)
    if make == "lm":
        model, inputs = AttentionOnlyLM(vocab=50, d_model=24, heads=3, layers=2, context=40), (torch.randint(50, (3, 37)),)
    else:
        model = InContextRegression(task_dim=3, max_pairs=6, d_model=16, heads=2, layers=2, mlp_width=8)
        inputs = (torch.randn(3, 5, 3), torch.randn(3, 5))
    outs, patterns = _outputs_and_patterns(model, *inputs)
    assert len(patterns) == len(outs) == 2
    for (mod, h, out), p in zip(outs, patterns):
        b, t, d = h.shape
        assert p.shape == (b, mod.heads, t, t)
        torch.testing.assert_close(p.sum(-1), torch.ones(b, mod.heads, t))
        assert torch.all(p.triu(1) == 0)  # causal
        _, _, v = mod._heads(h)
        mixed = (p @ v).transpose(1, 2).reshape(b, t, d)
        torch.testing.assert_close(mod.out(mixed), out, rtol=1e-5, atol=1e-6)


def test_the_sdpa_layer_has_the_same_pattern():
    torch.manual_seed(1)
    model = AttentionOnlyLM(vocab=30, d_model=16, heads=2, layers=1, context=20)
    tokens = torch.randint(30, (2, 19))
    outs, patterns = _outputs_and_patterns(model, tokens)
    model.blocks[0].attn.attention = "sdpa"
    outs_sdpa, patterns_sdpa = _outputs_and_patterns(model, tokens)
    torch.testing.assert_close(patterns_sdpa[0], patterns[0])
    torch.testing.assert_close(outs_sdpa[0][2], outs[0][2], rtol=1e-5, atol=1e-6)


def _shift_pattern(t, shift):  # every query on key i - shift (itself where i < shift)
    p = torch.zeros(t, t)
    for i in range(t):
        p[i, i - shift if i >= shift else i] = 1
    return p


def test_previous_token_score_on_constructed_patterns():
    t = 11
    uniform = torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None]
    heads = torch.stack([_shift_pattern(t, 1), uniform, torch.eye(t)])[None].repeat(2, 1, 1, 1)  # [2, 3, t, t]
    score = previous_token_score(heads)
    expected_uniform = sum(1 / (i + 1) for i in range(1, t)) / (t - 1)
    torch.testing.assert_close(score, torch.tensor([1.0, expected_uniform, 0.0]))


def test_prefix_matching_score_on_constructed_patterns():
    period, t = 5, 10
    induction = torch.zeros(t, t)
    for i in range(t):
        induction[i, i - period + 1 if i >= period else i] = 1
    heads = torch.stack([induction, _shift_pattern(t, 1), _shift_pattern(t, period)])[None]
    torch.testing.assert_close(prefix_matching_score(heads, period), torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="period must be in \\[1, 9\\].*got 10"):
        prefix_matching_score(heads, t)


def test_bigram_kl_equals_the_dense_computation():
    g = torch.Generator().manual_seed(0)
    vocab = 9
    tokens = torch.randint(vocab - 1, (20, 30), generator=g)  # token vocab - 1 never occurs
    table = BigramTable(tokens, vocab)
    counts = torch.zeros(vocab, vocab, dtype=torch.float64)
    for row in tokens:
        for a, b in zip(row[:-1], row[1:]):
            counts[a, b] += 1
    p = counts / counts.sum(1, keepdim=True)
    current = torch.cat([torch.randint(vocab - 1, (40,), generator=g), torch.tensor([vocab - 1])])
    log_q = F.log_softmax(torch.randn(len(current), vocab, generator=g), -1)
    kl = table.kl(log_q, current)
    pc = p[current[:-1]]
    dense = torch.where(pc > 0, pc * (pc.log() - log_q[:-1].double()), torch.zeros(()).double()).sum(-1)
    torch.testing.assert_close(kl[:-1], dense)
    assert math.isnan(kl[-1])  # never seen as a current token
    for block in (1, 7, 50):  # positions in blocks of at most this many table entries
        torch.testing.assert_close(table.kl(log_q, current, max_entries=block), kl, equal_nan=True)
    torch.testing.assert_close(table.kl(p[current[:-1]].log().float().clamp_min(-80), current[:-1]),
                               torch.zeros(len(current) - 1, dtype=torch.float64), atol=1e-6, rtol=0)


class _BigramModel(nn.Module):
    """Predicts the next token from the current one through a fixed table of
    log-probabilities (no attention)."""

    def __init__(self, log_p):
        super().__init__()
        self.log_p = log_p

    def forward(self, tokens):
        return self.log_p[tokens]


def test_a_model_that_predicts_the_bigram_statistics_scores_zero_and_icl_matches_per_token_losses():
    g = torch.Generator().manual_seed(1)
    vocab, t = 12, 60
    source = torch.randint(vocab, (50, t + 1), generator=g)
    eval_tokens = torch.randint(vocab, (10, t + 1), generator=g)
    counts = torch.ones(vocab, vocab) * 1e-12
    for row in source:
        counts.index_put_((row[:-1], row[1:]), torch.ones(t), accumulate=True)
    exact = _BigramModel((counts / counts.sum(1, keepdim=True)).log())
    probe = LanguageBehaviour(vocab, (eval_tokens,), source, chunk=3)
    out = probe(exact)
    assert abs(out["bigram_kl"]) < 1e-5
    assert not any(k.startswith(("prev_token", "prefix_match")) for k in out)  # no attention layers
    other = probe(_BigramModel(torch.randn(vocab, vocab, generator=g).log_softmax(-1)))
    assert other["bigram_kl"] > 0.1
    # a context of 60: the mean loss at its last token minus that at a tenth of it
    assert probe.icl_tokens == (6, 60)
    nll = F.cross_entropy(exact(eval_tokens[:, :-1]).transpose(1, 2), eval_tokens[:, 1:], reduction="none")
    assert out["icl_score"] == pytest.approx(float(nll[:, 59].mean() - nll[:, 5].mean()), rel=1e-5, abs=1e-6)


def test_language_behaviour_of_an_attention_model_has_every_head():
    torch.manual_seed(2)
    model = AttentionOnlyLM(vocab=40, d_model=16, heads=2, layers=2, context=64)
    tokens = torch.randint(40, (6, 65))
    out = LanguageBehaviour(40, (tokens,), tokens, pattern_sequences=3)(model)
    for kind in ("prev_token", "prefix_match"):
        assert sorted(k for k in out if k.startswith(kind)) == [f"{kind}/L{l}H{h}" for l in range(2) for h in range(2)]
        assert all(0 <= out[k] <= 1 for k in out if k.startswith(kind))
    assert sorted(k for k in out if k.startswith("ln_rms")) == ["ln_rms/blocks.0.ln_attn", "ln_rms/blocks.1.ln_attn",
                                                               "ln_rms/ln_out"]


def test_regression_metrics_of_the_zero_predictor_are_the_data_moments():
    # y = t.x + noise with t, x ~ N(0, I_D) and x ~ N(0, 4 I_D) shifted: E[y^2] = D + s2 and 4 D + s2.
    task = RegressionTask(task_dim=3, pairs=5, noise_var=0.125, seed=0)
    eval_set = task.eval_set(4096)

    class Zero(nn.Module):
        def forward(self, xs, ys):
            return torch.zeros_like(ys)

    probe = RegressionBehaviour(task, eval_set, chunk=1000)
    out = probe(Zero())
    assert out["pred_sq"] == 0
    shifted = probe.shifted[1]
    assert out["icl_score"] == 0  # the same pair scored first and last
    shifted = shifted.double()
    assert out["ood_loss"] == pytest.approx(float(shifted.pow(2).mean()), rel=1e-12)
    # against the exact moments, within 4 standard errors of the sample mean
    y2 = shifted.pow(2).flatten()
    se = float(y2.std() / math.sqrt(y2.numel()))  # pairs of one sequence share a task: a lower bound
    se *= math.sqrt(task.pairs)  # ... so bound it by counting sequences, not pairs
    assert abs(out["ood_loss"] - (4 * 3 + 0.125)) < 4 * se
    assert torch.equal(RegressionBehaviour(task, eval_set).shifted[0], probe.shifted[0])  # a fixed set


def test_icl_score_of_a_predictor_exact_after_the_first_pair():
    task = RegressionTask(task_dim=2, pairs=4, seed=1)
    eval_set = task.eval_set(300)

    class ExactFromPairTwo(nn.Module):  # reads its answer off ys: error 0 from the second pair on, y^2 at the first
        def forward(self, xs, ys):
            return ys * (torch.arange(ys.shape[1]) > 0)

    out = RegressionBehaviour(task, eval_set, chunk=128)(ExactFromPairTwo())
    assert out["icl_score"] == pytest.approx(-float(eval_set[1][:, 0].double().pow(2).mean()), rel=1e-12)


def test_layer_norm_rms_follows_the_weights():
    model = InContextRegression(task_dim=2, max_pairs=3, d_model=8, heads=2, layers=1, mlp_width=8)
    with torch.no_grad():
        model.ln_out.weight.copy_(torch.tensor([0.0, 0, 0, 0, 2, 2, 2, 2]))
    rms = layer_norm_rms(model)
    assert rms["ln_rms/ln_out"] == pytest.approx(math.sqrt(2))
    assert rms["ln_rms/blocks.0.ln_attn"] == 1.0


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("run"))
    train(tiny(), path, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # untrained checkpoints: negative LLC
        records = sweep(path, progress=False)
    return path, records


def test_sweep_records_carry_the_behaviour_and_the_report_shows_it(swept, tmp_path):
    path, records = swept
    for r in records:
        assert set(r["behaviour"]) == {"pred_sq", "icl_score", "ood_loss", "ln_rms/blocks.0.ln_attn",
                                       "ln_rms/blocks.0.ln_mlp", "ln_rms/ln_out"}
    assert records[-1]["behaviour"]["pred_sq"] < records[0]["behaviour"]["pred_sq"]  # learning y_hat ~ 0
    panels = series(records)
    assert list(panels)[:3] == ["E[ŷ²]", "ICL score", "loss, x ~ N(0, 4I)"]
    assert len(panels["LayerNorm weight RMS"]) == 3
    paths = write_report(records, str(tmp_path))
    summary = json.load(open(paths["summary"]))
    rows = summary["behaviour_by_stage"]
    assert [r["stage"] for r in rows] == [s["stage"] for s in summary["stages"]] == list(range(1, len(rows) + 1))
    first, last = rows[0]["metrics"]["E[ŷ²]"]["pred_sq"], rows[-1]["metrics"]["E[ŷ²]"]["pred_sq"]
    assert first[0] == records[0]["behaviour"]["pred_sq"] and last[1] == records[-1]["behaviour"]["pred_sq"]
    import pandas as pd
    csv = pd.read_csv(paths["csv"])
    assert list(csv["ln_rms/ln_out"]) == pytest.approx([r["behaviour"]["ln_rms/ln_out"] for r in records])
    text = stage_table(paths["fit"], None, paths["behaviour"])
    assert any(line.startswith("stage 1 (checkpoints 0 -> ") and "pred_sq" in line for line in text)
    assert not any("ln_out" in line for line in text)  # LayerNorms: in the plot and summary, not the table


def test_behaviour_changes_no_settings_key_and_can_be_left_out(swept, tmp_path):
    from dataclasses import replace

    from llcfast.pipeline.config import SweepSettings
    path, records = swept
    s = tiny().sweep
    assert settings_key(s) == settings_key(replace(s, behaviour=False)) == records[0]["settings"]
    # a results file written before the field existed keeps its key: it is computed without it
    assert settings_key(SweepSettings()) == settings_key(replace(SweepSettings(), behaviour=False))
    before = read_results(os.path.join(path, "results.jsonl"))
    again = sweep(path, settings=replace(s, behaviour=False), progress=False)  # done already: nothing re-measured
    assert read_results(os.path.join(path, "results.jsonl")) == before and len(again) == len(records)
    out = str(tmp_path / "no_behaviour.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fresh = sweep(path, settings=replace(s, behaviour=False), out=out, progress=False)
    assert all("behaviour" not in r for r in fresh)
    assert series(fresh) == {} and stage_changes([], fresh) == [] and change_lines([]) == []


def test_every_preset_builds_and_the_language_demo_reports_its_heads(tmp_path):
    from llcfast.pipeline.config import PRESETS, preset
    from llcfast.pipeline.demo import PRESET, demo
    assert set(PRESET.values()) <= set(PRESETS)
    for name in PRESETS:
        cfg = preset(name)
        assert cfg.make_model() is not None and cfg.sweep.behaviour
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # untrained checkpoints: negative LLC
        paths = demo(str(tmp_path), config=tiny_language(), progress=False, hessian=False)
    summary = json.load(open(paths["summary"]))
    metrics = summary["behaviour_by_stage"][0]["metrics"]
    assert set(metrics) == {"ICL score", "KL(bigram || model)", "previous-token score", "prefix matching",
                            "LayerNorm weight RMS"}
    assert set(metrics["prefix matching"]) == {"L0 (best head)", "L1 (best head)"}
    import pandas as pd
    assert {"bigram_kl", "prev_token/L1H0", "prefix_match/L0H1"} <= set(pd.read_csv(paths["csv"]).columns)


def test_token_ids_outside_the_vocabulary_are_refused_by_name():
    tokens = torch.arange(36).reshape(4, 9) % 10
    with pytest.raises(ValueError, match="bigram tokens holds token ids from 0 to 9; allowed: 0 to vocab - 1 = 7"):
        BigramTable(tokens, 8)
    with pytest.raises(ValueError, match=r"eval_set must be integer token ids \[sequences, length >= 2\], got \(9,\)"):
        LanguageBehaviour(10, (tokens[0],), tokens)
