"""The pipeline's data: determinism per step, the synthetic language's
three kinds of structure, and memory-mapped token files."""
import numpy as np
import pytest
import torch

from llcfast.pipeline.tasks import RegressionTask, SyntheticLanguage, TokenFile


def test_regression_batches_are_keyed_by_step_and_follow_the_model():
    task = RegressionTask(task_dim=3, pairs=5, noise_var=0.0, seed=4)
    xs, ys = task.train_batch(7, 32)
    assert xs.shape == (32, 5, 3) and ys.shape == (32, 5)
    assert torch.equal(task.train_batch(7, 32)[0], xs)
    assert not torch.equal(task.train_batch(8, 32)[0], xs)
    # noiseless: each sequence's ys are one linear function of its xs
    t = torch.linalg.lstsq(xs[0], ys[0][:, None]).solution
    assert torch.allclose(xs[0] @ t, ys[0][:, None], atol=1e-4)
    assert not torch.equal(task.eval_set(16)[0], task.llc_batches(16, 16)[0][0])


def _induction_hits(tokens: np.ndarray) -> float:
    """Fraction of positions whose 4-gram ending there already appeared
    earlier in the same sequence (what a copy makes and induction predicts)."""
    hits = 0
    for row in tokens:
        seen = set()
        for t in range(3, len(row)):
            key = tuple(row[t - 3:t + 1])
            hits += key in seen
            seen.add(key)
    return hits / tokens.size


def test_synthetic_language_has_bigrams_phrases_and_copies():
    plain = SyntheticLanguage(vocab=300, context=256, p_phrase=0.0, p_copy=0.0, seed=0)
    toks = plain.train_batch(0, 16)[0].numpy()
    assert toks.shape == (16, 257) and toks.min() >= 0 and toks.max() < 300
    succ = plain.successors
    assert all(toks[b, t] in succ[toks[b, t - 1]] for b in range(16) for t in range(1, 257))
    copying = SyntheticLanguage(vocab=300, context=256, p_phrase=0.0, p_copy=0.1, seed=0)
    phrasing = SyntheticLanguage(vocab=300, context=256, p_phrase=0.1, p_copy=0.0, seed=0)
    base = _induction_hits(toks)
    assert _induction_hits(copying.train_batch(0, 16)[0].numpy()) > base + 0.2
    def phrase_hits(lang, tokens):
        prefixes = {tuple(p[:4]) for p in lang.phrases}
        return sum(tuple(row[t:t + 4]) in prefixes for row in tokens for t in range(len(row) - 3))

    assert phrase_hits(phrasing, phrasing.train_batch(0, 16)[0].numpy()) > 150  # ~ 16 rows x 16 phrases
    assert phrase_hits(phrasing, toks) < 5
    with pytest.raises(ValueError, match="p_phrase \\+ p_copy must be <= 1"):
        SyntheticLanguage(p_phrase=0.6, p_copy=0.6)


@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_token_files_are_windows_of_the_file(tmp_path, suffix):
    data = np.arange(5000, dtype=np.uint16) % 977
    path = str(tmp_path / f"tokens{suffix}")
    np.save(path, data) if suffix == ".npy" else data.tofile(path)
    task = TokenFile(path, context=32, eval_fraction=0.1)
    (batch,) = task.train_batch(3, 8)
    assert batch.shape == (8, 33) and batch.dtype == torch.int64
    for row in batch.numpy():
        start = int(np.flatnonzero(data[:4500 - 32] == row[0])[0])  # values repeat every 977: any match works
        assert np.array_equal(np.asarray(data[start:start + 33], dtype=np.int64) % 977, row % 977)
    (held,) = task.eval_set(4)
    assert held.min() >= 0 and task.vocab == 977
    with pytest.raises(ValueError, match="too few"):
        TokenFile(path, context=4000)
    with pytest.raises(ValueError, match="must end in .npy or .bin"):
        open(str(tmp_path / "t.txt"), "w").close()
        TokenFile(str(tmp_path / "t.txt"))
    with pytest.raises(FileNotFoundError):
        TokenFile(str(tmp_path / "none.npy"))
