"""Behavioural metrics of the paper's two models (docs/paper.md), measured at every
checkpoint beside the LLC, so that each stage the LLC finds can be read
against what the model learned in it.

In-context linear regression (RegressionBehaviour):
- ``pred_sq``: the mean squared prediction E[y_hat^2]. Without the context
  the best prediction is 0, so it falls while the model learns that (LR1),
  and rises again as in-context learning predicts t.x (LR2).
- ``icl_score``: the squared error on each sequence's first pair when it
  comes last, after the other K - 1 pairs, minus that when it comes first;
  negative once the model uses the context. Scoring the same pair both ways
  takes the pairs' own spread out: predicting 0 scores exactly 0.
- ``ood_loss``: the test loss on inputs x ~ N(0, 4 I); LR3 gets worse on
  inputs wider than the training distribution (g > 3).

Attention-only language model (LanguageBehaviour):
- ``icl_score``: the loss at token 500 minus the loss at token 50 (token 50
  and 500 of the inputs; contexts under 500 tokens use their last token and
  a tenth of it); negative once later tokens are predicted better.
- ``bigram_kl``: the KL divergence from the empirical next-token distribution
  given the current token (counted on the LLC's pre-sampled set) to the
  model's prediction, averaged over the evaluation tokens: 0 when the model
  predicts exactly the bigram statistics (LM1).
- ``prev_token/L{l}H{h}``: head h of layer l's mean attention weight on the
  previous token (previous-token heads, LM3).
- ``prefix_match/L{l}H{h}``: on random tokens repeated once, the mean
  attention from a token of the repeat to the token that followed its first
  occurrence (Olsson et al.'s prefix matching: induction heads, LM4).

Both: ``ln_rms/{module}``, the root mean square of each LayerNorm's weight
(1 at initialisation; LR3 and LR4 see them collapse).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .models import CausalSelfAttention

SHIFTED_X_VAR = 4.0
ICL_TOKENS = (50, 500)


def layer_norm_rms(model: nn.Module) -> Dict[str, float]:
    return {f"ln_rms/{name}": float(m.weight.detach().float().pow(2).mean().sqrt())
            for name, m in model.named_modules() if isinstance(m, nn.LayerNorm) and m.weight is not None}


def attention_patterns(model: nn.Module, *inputs) -> List[torch.Tensor]:
    """The attention weights [B, H, T, T] of every CausalSelfAttention in
    ``model`` on ``inputs``, in the order the forward pass runs them."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0])))
             for m in model.modules() if isinstance(m, CausalSelfAttention)]
    try:
        with torch.no_grad():
            model(*inputs)
            return [mod.pattern(h) for mod, h in seen]
    finally:
        for hook in hooks:
            hook.remove()


def previous_token_score(pattern: torch.Tensor) -> torch.Tensor:  # [B, H, T, T] -> [H]
    """Each head's mean weight from position i on position i - 1 (i >= 1)."""
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, -1))


def prefix_matching_score(pattern: torch.Tensor, period: int) -> torch.Tensor:  # [B, H, T, T] -> [H]
    """Each head's mean weight from position i >= ``period`` on position
    i - period + 1, on sequences that repeat themselves every ``period``
    tokens: the token that followed the current token's last occurrence."""
    t = pattern.shape[-1]
    if not 1 <= period < t:
        raise ValueError(f"period must be in [1, {t - 1}] for patterns over {t} positions, got {period}")
    # diagonal entry j pairs query period - 1 + j with key j; queries from period on
    return pattern.diagonal(offset=-(period - 1), dim1=-2, dim2=-1)[..., 1:].mean(dim=(0, -1))


def _check_tokens(name: str, tokens, vocab: int) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point \
            or tokens.shape[1] < 2:
        raise ValueError(f"{name} must be integer token ids [sequences, length >= 2], got "
                         f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    lo, hi = (int(tokens.min()), int(tokens.max())) if tokens.numel() else (0, 0)
    if lo < 0 or hi >= vocab:
        raise ValueError(f"{name} holds token ids from {lo} to {hi}; allowed: 0 to vocab - 1 = {vocab - 1}")
    return tokens.long()


def _per_head(prefix: str, scores: Sequence[torch.Tensor]) -> Dict[str, float]:
    return {f"{prefix}/L{layer}H{head}": float(v) for layer, s in enumerate(scores) for head, v in enumerate(s)}


class RegressionBehaviour:
    """The in-context regression metrics at a model, on ``eval_set`` and a
    shifted set of the same size drawn from ``task``."""

    def __init__(self, task, eval_set: Tuple[torch.Tensor, torch.Tensor], chunk: int = 256):
        self.eval_set = eval_set
        self.shifted = task.shifted_set(eval_set[0].shape[0], SHIFTED_X_VAR, eval_set[0].device)
        self.chunk = chunk

    def _predict(self, model, data) -> torch.Tensor:  # [N, K]
        xs, ys = data
        with torch.no_grad():
            return torch.cat([model(xs[i:i + self.chunk], ys[i:i + self.chunk]).float()
                              for i in range(0, xs.shape[0], self.chunk)])

    def __call__(self, model: nn.Module) -> Dict[str, float]:
        xs, ys = self.eval_set
        preds = self._predict(model, self.eval_set).double()  # [N, K]
        last = self._predict(model, (xs.roll(-1, dims=1), ys.roll(-1, dims=1)))[:, -1].double()  # pair 0, seen last
        y0 = ys[:, 0].double()
        shifted = self._predict(model, self.shifted).double()
        return {"pred_sq": float(preds.pow(2).mean()),
                "icl_score": float(((last - y0) ** 2 - (preds[:, 0] - y0) ** 2).mean()),
                "ood_loss": float((shifted - self.shifted[1].double()).pow(2).mean()), **layer_norm_rms(model)}


class BigramTable:
    """The empirical distribution of the next token given the current one,
    counted on ``tokens`` [N, T], stored row by row (only the pairs seen)."""

    def __init__(self, tokens: torch.Tensor, vocab: int):
        tokens = _check_tokens("bigram tokens", tokens, vocab)
        keys, counts = torch.unique(tokens[:, :-1] * vocab + tokens[:, 1:], return_counts=True)  # sorted
        rows = keys // vocab
        self.cols = keys % vocab  # [E]
        self.length = torch.bincount(rows, minlength=vocab)  # [V]
        self.start = torch.cumsum(self.length, 0) - self.length  # [V]
        totals = torch.zeros(vocab, dtype=torch.float64, device=keys.device).index_add_(0, rows, counts.double())
        self.prob = counts.double() / totals[rows]  # [E]
        self.log_prob = self.prob.log()

    def kl(self, log_q: torch.Tensor, current: torch.Tensor, max_entries: int = 1 << 21) -> torch.Tensor:
        """KL(p(. | current) || q) per position ([P, V], [P] -> [P]); NaN where
        ``current`` was never followed by anything in the counted tokens.
        Positions go in blocks of at most ``max_entries`` table entries (at
        least one position): a common token can have thousands of successors."""
        ends = torch.cumsum(self.length[current], 0)
        out = torch.empty(len(current), dtype=torch.float64, device=current.device)
        start = 0
        while start < len(current):
            base = int(ends[start - 1]) if start else 0
            stop = max(int(torch.searchsorted(ends, base + max_entries, right=True)), start + 1)
            out[start:stop] = self._kl(log_q[start:stop], current[start:stop])
            start = stop
        return out

    def _kl(self, log_q: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        lens = self.length[current]
        ends = torch.cumsum(lens, 0)
        pos = torch.repeat_interleave(torch.arange(len(current), device=current.device), lens)
        entry = self.start[current][pos] + torch.arange(int(ends[-1]) if len(ends) else 0,
                                                       device=current.device) - (ends - lens)[pos]
        terms = self.prob[entry] * (self.log_prob[entry] - log_q[pos, self.cols[entry]].double())
        out = torch.zeros(len(current), dtype=torch.float64, device=current.device).index_add_(0, pos, terms)
        return out.masked_fill(lens == 0, math.nan)


class LanguageBehaviour:
    """The language-model metrics at a model: the ICL score and the bigram KL
    on ``eval_set`` (token rows [N, T + 1], inputs and next-token targets),
    bigrams counted on ``bigram_tokens``; the head scores on the first
    ``pattern_sequences`` evaluation rows (their first 256 tokens) and on as
    many random rows of up to 128 tokens repeated once."""

    def __init__(self, vocab: int, eval_set, bigram_tokens: torch.Tensor, *, chunk: int = 8,
                 pattern_sequences: int = 8, seed: int = 0):
        tokens = _check_tokens("eval_set", eval_set[0] if isinstance(eval_set, (tuple, list)) else eval_set, vocab)
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]
        t = self.inputs.shape[1]
        late = min(ICL_TOKENS[1], t)
        self.icl_tokens = (max(1, late * ICL_TOKENS[0] // ICL_TOKENS[1]), late)
        self.table = BigramTable(bigram_tokens, vocab)
        self.vocab, self.chunk = vocab, chunk
        self.natural = self.inputs[:pattern_sequences, :min(t, 256)]
        self.period = min(t // 2, 128)
        if self.period >= 2:
            g = torch.Generator().manual_seed(seed)
            rand = torch.randint(vocab, (pattern_sequences, self.period), generator=g).to(tokens.device)
            self.repeated = torch.cat([rand, rand], 1)

    def __call__(self, model: nn.Module) -> Dict[str, float]:
        early, late = (i - 1 for i in self.icl_tokens)
        nll = torch.zeros(2, dtype=torch.float64)
        kl_sum, kl_n = 0.0, 0
        with torch.no_grad():
            for i in range(0, self.inputs.shape[0], self.chunk):
                inp, tgt = self.inputs[i:i + self.chunk], self.targets[i:i + self.chunk]
                log_q = F.log_softmax(model(inp).float(), dim=-1)  # [n, T, V]
                picked = log_q[:, [early, late]].gather(-1, tgt[:, [early, late], None])[..., 0]  # [n, 2]
                nll -= picked.double().sum(0).cpu()
                kl = self.table.kl(log_q.reshape(-1, log_q.shape[-1]), inp.reshape(-1))
                seen = kl.isfinite()
                kl_sum += float(kl[seen].sum())
                kl_n += int(seen.sum())
        n = self.inputs.shape[0]
        out = {"icl_score": float(nll[1] - nll[0]) / n, "bigram_kl": kl_sum / kl_n if kl_n else math.nan}
        out.update(_per_head("prev_token", [previous_token_score(p) for p in attention_patterns(model, self.natural)]))
        if self.period >= 2:
            out.update(_per_head("prefix_match", [prefix_matching_score(p, self.period)
                                                  for p in attention_patterns(model, self.repeated)]))
        out.update(layer_norm_rms(model))
        return out


def for_task(task, eval_set, llc_batches: Sequence) -> "RegressionBehaviour | LanguageBehaviour":
    """The metrics of ``task``'s kind (llcfast.pipeline.tasks), measured on its
    evaluation set; a language's bigrams are counted on the LLC's batches."""
    if task.kind == "regression":
        return RegressionBehaviour(task, eval_set)
    bigram_tokens = torch.cat([b[0] if isinstance(b, (tuple, list)) else b for b in llc_batches])
    return LanguageBehaviour(task.vocab, eval_set, bigram_tokens, seed=task.seed)


_PANELS = {"prev_token": "previous-token score", "prefix_match": "prefix matching", "ln_rms": "LayerNorm weight RMS"}
_LABELS = {"pred_sq": "E[ŷ²]", "icl_score": "ICL score", "ood_loss": "loss, x ~ N(0, 4I)",
           "bigram_kl": "KL(bigram || model)"}


def series(records: Sequence[dict]) -> Dict[str, Dict[str, List[float]]]:
    """The records' behavioural metrics as plot panels: {panel: {line: values
    by record}}, NaN where a record lacks one. Scalar metrics get a panel
    each; per-head scores one panel per kind with a line per layer (its
    best head); LayerNorm RMS one panel with a line per LayerNorm."""
    keys: List[str] = []
    for r in records:
        keys += [k for k in r.get("behaviour") or {} if k not in keys]
    panels: Dict[str, Dict[str, List[float]]] = {}

    def value(r, k):
        v = (r.get("behaviour") or {}).get(k)
        return math.nan if v is None else v

    heads: Dict[Tuple[str, str], List[str]] = {}  # (kind, a layer's line) -> the keys of its heads
    for k in keys:
        kind, _, name = k.partition("/")
        if not name:
            panels[_LABELS.get(k, k)] = {k: [value(r, k) for r in records]}
        elif kind in ("prev_token", "prefix_match"):
            line = f"{name.split('H')[0]} (best head)"
            panels.setdefault(_PANELS[kind], {})[line] = []  # its place; the values come from its heads below
            heads.setdefault((kind, line), []).append(k)
        else:
            panels.setdefault(_PANELS.get(kind, kind), {})[name] = [value(r, k) for r in records]
    for (kind, line), ks in heads.items():
        panels[_PANELS[kind]][line] = [_nanmax(value(r, k) for k in ks) for r in records]
    return panels


def _nanmax(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else math.nan


def stage_changes(stages, records: Sequence[dict]) -> List[dict]:
    """Per stage (stages.Stage): each behavioural line's value at the
    checkpoints nearest the stage's start and end (on the log(step + 1) axis
    the stages live on): {"stage", "start", "end", "metrics": {panel: {line:
    [first, last]}}}."""
    records = sorted(records, key=lambda r: r["step"])
    panels = series(records)
    logs = [math.log1p(max(r["step"], 0)) for r in records]

    def nearest(step: float) -> int:
        x = math.log1p(max(step, 0))
        return min(range(len(logs)), key=lambda i: abs(logs[i] - x))

    rows = []
    for s in stages:
        i, j = nearest(s.start), nearest(s.end)
        rows.append({"stage": s.number, "start": records[i]["step"], "end": records[j]["step"],
                     "metrics": {p: {line: [v[i], v[j]] for line, v in lines.items()} for p, lines in panels.items()}})
    return rows


def change_lines(rows: List[dict], skip: Tuple[str, ...] = (_PANELS["ln_rms"],)) -> List[str]:
    """``stage_changes`` rows as text, a stage a line (panels in ``skip`` left out)."""
    out = []
    for row in rows:
        parts = [f"{line if len(lines) == 1 else panel + ' ' + line} {a:.3g} -> {b:.3g}"
                 for panel, lines in row["metrics"].items() if panel not in skip for line, (a, b) in lines.items()]
        if parts:
            out.append(f"stage {row['stage']} (checkpoints {row['start']} -> {row['end']}): " + ", ".join(parts))
    return out
