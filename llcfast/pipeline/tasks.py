"""The data the paper's models learn from (docs/paper.md).

Every task draws the batch of training step t from its own generator seeded by
(seed, stream, t) through numpy's SeedSequence (torch's CPU generator keeps
only 32 bits of a seed, so streams offset by large constants would collide),
so a resumed run sees exactly the batches an uninterrupted one would.
Evaluation and LLC sets are fixed by the task's seed.

- RegressionTask: in-context linear regression, a fresh task per sequence.
- SyntheticLanguage: token sequences whose statistics pay off in the order of
  the paper's LM stages: bigrams, then common phrases (n-grams), then copies
  of earlier spans (which only induction heads can predict).
- TokenFile: a user's own corpus as a memory-mapped token-id file.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple

import numpy as np
import torch

from .._checks import check_float, check_int

# Offsets that keep the streams of one seed apart.
_TRAIN, _EVAL, _LLC, _GRAMMAR, _SHIFTED = 0, 1 << 40, 2 << 40, 3 << 40, 4 << 40


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _batches(data: Tuple[torch.Tensor, ...], batch_size: int) -> List[Tuple[torch.Tensor, ...]]:
    n = data[0].shape[0]
    return [tuple(t[i:i + batch_size] for t in data) for i in range(0, n - batch_size + 1, batch_size)]


class _Task:
    """The three data streams every task serves; a task implements
    ``_draw(n, stream, device)``, n sequences from the generator of ``stream``."""

    def _draw(self, n: int, stream: int, device) -> Tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def train_batch(self, step: int, batch_size: int, device="cpu"):
        return self._draw(batch_size, _TRAIN + step, device)

    def eval_set(self, num_sequences: int, device="cpu"):
        return self._draw(num_sequences, _EVAL, device)

    def llc_batches(self, num_sequences: int, batch_size: int, device="cpu"):
        """A fixed pre-sampled set cut into minibatches (docs/paper.md's LLC data)."""
        return _batches(self._draw(num_sequences, _LLC, device), batch_size)


def sample_regression(num_sequences: int, pairs: int = 16, task_dim: int = 4, noise_var: float = 0.125,
                      generator=None, device="cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """A fresh task t ~ N(0, I) per sequence; x ~ N(0, I); y = t.x + N(0, noise_var)."""
    tasks = torch.randn(num_sequences, task_dim, 1, generator=generator).to(device)
    xs = torch.randn(num_sequences, pairs, task_dim, generator=generator).to(device)
    noise = math.sqrt(noise_var) * torch.randn(num_sequences, pairs, generator=generator).to(device)
    return xs, (xs @ tasks)[..., 0] + noise


class RegressionTask(_Task):
    """In-context linear regression: batches are (xs [B, K, D], ys [B, K])."""

    kind = "regression"

    def __init__(self, task_dim: int = 4, pairs: int = 16, noise_var: float = 0.125, seed: int = 0):
        self.task_dim = check_int("task_dim", task_dim, minimum=1)
        self.pairs = check_int("pairs", pairs, minimum=1)
        self.noise_var = check_float("noise_var", noise_var, minimum=0.0)
        self.seed = check_int("seed", seed)

    def _draw(self, n: int, stream: int, device, x_var: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
        rng = _rng(self.seed, stream)
        tasks = rng.standard_normal((n, self.task_dim, 1), dtype=np.float32)
        xs = np.float32(math.sqrt(x_var)) * rng.standard_normal((n, self.pairs, self.task_dim), dtype=np.float32)
        noise = np.float32(math.sqrt(self.noise_var)) * rng.standard_normal((n, self.pairs), dtype=np.float32)
        ys = (xs @ tasks)[..., 0] + noise
        return torch.from_numpy(xs).to(device), torch.from_numpy(ys).to(device)

    def shifted_set(self, num_sequences: int, x_var: float, device="cpu") -> Tuple[torch.Tensor, torch.Tensor]:
        """A fixed evaluation set with inputs x ~ N(0, x_var I) (tasks and noise
        as in training): docs/paper.md's out-of-distribution inputs."""
        check_float("x_var", x_var, minimum=0.0)
        return self._draw(num_sequences, _SHIFTED, device, x_var=x_var)



class SyntheticLanguage(_Task):
    """Sequences built from three kinds of segment, so that each stage of an
    LM's development buys loss: a Zipfian bigram chain (each token has a few
    likely successors), fixed common phrases inserted whole (predictable
    only from the previous two or more tokens, since phrase tokens are drawn
    independently of the bigram table), and copies of earlier spans of the
    same sequence (predictable only by looking back: induction)."""

    kind = "language"

    def __init__(self, vocab: int = 5000, context: int = 1024, successors: int = 8, phrases: int = 200,
                 phrase_length: Tuple[int, int] = (4, 8), copy_length: Tuple[int, int] = (6, 16),
                 p_phrase: float = 0.03, p_copy: float = 0.03, seed: int = 0):
        self.vocab = check_int("vocab", vocab, minimum=8)
        self.context = check_int("context", context, minimum=2)
        check_int("successors", successors, minimum=1, maximum=vocab)
        check_int("phrases", phrases, minimum=1)
        for name, (lo, hi) in (("phrase_length", phrase_length), ("copy_length", copy_length)):
            if not (isinstance(lo, int) and isinstance(hi, int) and 2 <= lo <= hi):
                raise ValueError(f"{name} must be (min, max) ints with 2 <= min <= max, got {(lo, hi)}")
        for name, p in (("p_phrase", p_phrase), ("p_copy", p_copy)):
            if not 0 <= check_float(name, p) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if p_phrase + p_copy > 1:
            raise ValueError(f"p_phrase + p_copy must be <= 1, got {p_phrase + p_copy}")
        self.p_phrase, self.p_copy = float(p_phrase), float(p_copy)
        self.copy_length = copy_length
        self.seed = check_int("seed", seed)
        rng = _rng(seed, _GRAMMAR)
        zipf = 1.0 / np.arange(1, vocab + 1)
        self.unigram = zipf / zipf.sum()
        self.successors = rng.choice(vocab, size=(vocab, successors), p=self.unigram)
        weights = 1.0 / np.arange(1, successors + 1)
        self.successor_cdf = np.cumsum(weights / weights.sum())
        lengths = rng.integers(phrase_length[0], phrase_length[1] + 1, size=phrases)
        self.phrase_len = lengths
        self.phrases = rng.integers(0, vocab, size=(phrases, phrase_length[1]))

    def _generate(self, n: int, rng: np.random.Generator) -> np.ndarray:
        t_len = self.context + 1  # inputs and next-token targets
        out = np.empty((n, t_len), dtype=np.int64)
        rows = np.arange(n)
        out[:, 0] = rng.choice(self.vocab, size=n, p=self.unigram)
        remaining = np.zeros(n, dtype=np.int64)  # tokens left in the current phrase or copy
        source = np.zeros(n, dtype=np.int64)  # copy: position to read; phrase: index into the phrase
        phrase = np.full(n, -1, dtype=np.int64)  # -1: copying from the sequence itself
        lo_c, hi_c = self.copy_length
        for t in range(1, t_len):
            busy = remaining > 0
            u = rng.random(n)
            start_copy = ~busy & (u < self.p_copy) & (t > hi_c + 1)
            start_phrase = ~busy & ~start_copy & (u >= self.p_copy) & (u < self.p_copy + self.p_phrase)
            if start_copy.any():
                k = int(start_copy.sum())
                length = rng.integers(lo_c, hi_c + 1, size=k)
                source[start_copy] = (rng.random(k) * (t - length)).astype(np.int64)
                remaining[start_copy], phrase[start_copy] = length, -1
            if start_phrase.any():
                k = int(start_phrase.sum())
                j = rng.integers(0, len(self.phrases), size=k)
                phrase[start_phrase], source[start_phrase], remaining[start_phrase] = j, 0, self.phrase_len[j]
            active = remaining > 0
            copying = active & (phrase < 0)
            in_phrase = active & (phrase >= 0)
            bigram = ~active
            tok = np.empty(n, dtype=np.int64)
            tok[copying] = out[rows[copying], source[copying]]
            tok[in_phrase] = self.phrases[phrase[in_phrase], source[in_phrase]]
            idx = np.searchsorted(self.successor_cdf, rng.random(int(bigram.sum())))
            tok[bigram] = self.successors[out[bigram, t - 1], np.minimum(idx, self.successors.shape[1] - 1)]
            out[:, t] = tok
            source[active] += 1
            remaining[active] -= 1
        return out

    def _draw(self, n: int, stream: int, device) -> Tuple[torch.Tensor]:
        return (torch.from_numpy(self._generate(n, _rng(self.seed, stream))).to(device),)


class TokenFile(_Task):
    """A corpus of token ids in a ``.npy`` file or a raw ``.bin`` (``dtype``,
    default uint16 as nanoGPT writes them), memory-mapped, never read whole.
    Sequences are windows of ``context + 1`` tokens at random offsets;
    the last ``eval_fraction`` of the file is held out for evaluation."""

    kind = "language"

    def __init__(self, path: str, context: int = 1024, dtype: str = "uint16", eval_fraction: float = 0.05,
                 seed: int = 0, vocab: Optional[int] = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"token file {path!r} does not exist")
        self.path = path
        self.context = check_int("context", context, minimum=2)
        self.seed = check_int("seed", seed)
        if path.endswith(".npy"):
            self.tokens = np.load(path, mmap_mode="r")
        elif path.endswith(".bin"):
            self.tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        else:
            raise ValueError(f"token file {path!r} must end in .npy or .bin")
        if self.tokens.ndim != 1 or not np.issubdtype(self.tokens.dtype, np.integer):
            raise ValueError(f"token file {path!r} must hold a 1-D array of integer token ids, "
                             f"got {self.tokens.dtype} with shape {self.tokens.shape}")
        if not 0 < check_float("eval_fraction", eval_fraction) < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        n = len(self.tokens)
        self.split = int(n * (1 - eval_fraction))
        if min(self.split, n - self.split) < context + 1:
            raise ValueError(f"token file {path!r} holds {n} tokens: too few for windows of context + 1 = "
                             f"{context + 1} in both the training and the held-out part")
        self.vocab = vocab if vocab is not None else int(self.tokens[: min(n, 1 << 24)].max()) + 1

    def _draw(self, n: int, stream: int, device) -> Tuple[torch.Tensor]:
        lo, hi = (self.split, len(self.tokens)) if stream == _EVAL else (0, self.split)
        rng = _rng(self.seed, stream)
        starts = rng.integers(lo, hi - self.context, size=n)  # window s .. s + context inclusive
        rows = np.stack([np.asarray(self.tokens[s:s + self.context + 1], dtype=np.int64) for s in starts])
        return (torch.from_numpy(rows).to(device),)
