"""The loader a user passes to estimate_llc (and the Hessian its batches):
checks that name what is wrong with it, passes over it for each chain, and
the random streams each chain fetches its batches on."""
from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Mapping
from typing import Optional

import numpy as np
import torch


def check_loader(loader, name: str = "loader", *, one_shot: bool = False) -> None:
    """Each chain makes its own passes over the loader, so it must be
    iterable again and again (a one-shot iterator would run dry after the
    init loss); ``one_shot`` allows one for callers that read it once."""
    if isinstance(loader, torch.Tensor):
        raise TypeError(f"{name} is a tensor of shape {tuple(loader.shape)}; pass a list of batches "
                        "(e.g. [(x, y)] for one full batch)" + ("" if one_shot else " or a DataLoader"))
    if isinstance(loader, (str, bytes)) or not hasattr(loader, "__iter__"):
        raise TypeError(f"{name} must be an iterable of batches (a DataLoader, a list of batches), "
                        f"got {type(loader).__name__}")
    if _looks_like_one_batch(loader):
        shapes = ", ".join(str(tuple(t.shape)) for t in loader)
        raise TypeError(f"{name} is a {type(loader).__name__} of tensors of shapes {shapes}, which looks like one "
                        f"batch (x, y) rather than a sequence of batches; pass [(x, y)] for one full batch, or a "
                        "list of batches")
    if isinstance(loader, Iterator) and not one_shot:
        raise TypeError(f"{name} is a one-shot iterator ({type(loader).__name__}), but each chain makes its own "
                        f"passes over the {name}; pass a list of batches (list({name})) or a DataLoader")


def _looks_like_one_batch(loader) -> bool:
    # A loader's batches share their structure, so tensors of different ranks
    # (or a tuple of equally long tensors of different shapes) are the parts
    # of one batch, not batches.
    if not isinstance(loader, (list, tuple)) or len(loader) < 2 \
            or not all(isinstance(t, torch.Tensor) and t.dim() for t in loader):
        return False
    if len({t.dim() for t in loader}) > 1:
        return True
    return isinstance(loader, tuple) and len({t.shape[0] for t in loader}) == 1 \
        and len({tuple(t.shape[1:]) for t in loader}) > 1


def cycle_batches(loader) -> Iterator:
    """Endless batches: the loader is restarted when exhausted (a chain that
    needs more batches than it holds reuses them)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the loader yielded no batches; pass a non-empty loader")


def loader_batches(loader, seed: int, chain: Optional[int] = None, *, endless: bool = True,
                   stream: int = 1) -> Iterator:
    """The loader's batches (cycled when ``endless``, else one pass) fetched
    on their own random streams, keyed by (seed, stream, chain); chain None
    is the stream of the init loss, stream 2 that of the draws. Swapped in around each fetch: torch's global
    CPU generator and the loader's own (DataLoader(generator=...), its
    sampler's). A shuffling DataLoader, or a dataset with random transforms,
    then gives each chain the same batches for the same seed, in either
    backend and any split across processes, and the caller's generators are
    left as they were. Lists and tuples draw no random numbers and are
    passed over directly."""
    loader = _own_workers(loader)
    passes = TensorPasses(loader) if TensorPasses.applies(loader) else loader
    batches = cycle_batches(passes) if endless else _one_pass(passes)
    if isinstance(loader, (list, tuple)):
        return batches
    key = [seed, 0] if chain is None else [seed, stream, chain]
    owned = {id(g): g for g in (getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None),
                                                                              "generator", None))
             if isinstance(g, torch.Generator) and g.device.type == "cpu"}
    starts = np.random.SeedSequence(key).generate_state(1 + len(owned), np.uint64) >> np.uint64(1)
    states = [torch.Generator().manual_seed(int(v)).get_state() for v in starts]
    return _on_own_rng(batches, [None, *owned.values()], states)


DRAW_BATCHES = ("independent", "step")


def check_draw_batches(value) -> str:
    if value not in DRAW_BATCHES:
        raise ValueError(f"draw_batches must be one of {DRAW_BATCHES}, got {value!r}")
    return value


def draw_batches(loader, seed: int, chain: int) -> Iterator:
    """Endless batches for chain ``chain``'s draws, independent of the
    batches that drive it, so that a draw's expected loss is the full-data
    loss at the chain's weights: a uniformly random element of a list, a
    uniformly random set of batch_size samples of a DataLoader's map-style
    dataset (collated as the loader does), or a stream's own pass on a
    random stream of its own. (The batch that is about to drive a step has
    not been fitted within the epoch, and its loss runs high.) Random numbers
    drawn by the dataset (augmentation) come from a generator of the stream's
    own, so the caller's are left alone."""
    from torch.utils.data import DataLoader, IterableDataset
    start = int(np.random.SeedSequence([seed, 2, chain]).generate_state(1, np.uint64)[0] >> np.uint64(1))
    g = torch.Generator().manual_seed(start)
    if isinstance(loader, (list, tuple)):
        def picked():
            while True:
                yield loader[int(torch.randint(len(loader), (1,), generator=g))]
        return picked()
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset) and loader.batch_size:
        dataset, size = loader.dataset, min(loader.batch_size, len(loader.dataset))

        fetch = TensorPasses.fetch if TensorPasses.applies(loader) else \
            (lambda loader, picks: loader.collate_fn([dataset[i] for i in picks]))

        def sampled():
            while True:
                yield fetch(loader, torch.randperm(len(dataset), generator=g)[:size].tolist())
        return _on_own_rng(sampled(), [None], [torch.Generator().manual_seed(start + 1).get_state()])
    return loader_batches(loader, seed, chain, stream=2)


class TensorPasses:
    """Passes over a DataLoader of a TensorDataset that index the tensors
    with each batch's indices instead of fetching and collating sample by
    sample, which costs more than a small model's whole step. The batches
    are the loader's own, value for value (collated as a list, as
    default_collate collates a TensorDataset's tuples), and each pass draws
    the same random numbers as the loader's iterator: its base seed, then
    the sampler's."""

    def __init__(self, loader):
        self.loader = loader

    @staticmethod
    def applies(loader) -> bool:
        from torch.utils.data import DataLoader, TensorDataset
        from torch.utils.data._utils.collate import default_collate
        return (type(loader) is DataLoader and type(loader.dataset) is TensorDataset
                and loader.batch_sampler is not None and loader.collate_fn is default_collate
                and loader.num_workers == 0 and not loader.pin_memory)

    @staticmethod
    def fetch(loader, indices) -> list:
        return [t[indices] for t in loader.dataset.tensors]

    def __iter__(self):
        iter(self.loader)  # the iterator's start draws the pass's base seed; its sampler has drawn nothing yet
        for indices in self.loader.batch_sampler:
            yield self.fetch(self.loader, indices)

    def __len__(self):
        return len(self.loader)


def _own_workers(loader):
    """A DataLoader with persistent workers keeps one iterator and restarts
    it on every iter(), so chains passing over it at once would steal each
    other's batches; each stream gets a copy with its own workers."""
    from torch.utils.data import DataLoader
    if isinstance(loader, DataLoader) and loader.persistent_workers and loader.num_workers > 0:
        loader = copy.copy(loader)
        loader._iterator = None  # the copy starts its own workers on its first pass
    return loader


def _one_pass(loader) -> Iterator:
    yield from loader  # a generator function, so iter(loader) runs at the first next(), on the batches' streams


def _on_own_rng(batches: Iterator, generators: list, states: list) -> Iterator:
    """``batches`` with each generator (None: torch's global one) set to its
    state in ``states`` during each fetch, and restored after."""
    def get(g):
        return torch.get_rng_state() if g is None else g.get_state()

    def put(g, state):
        torch.set_rng_state(state) if g is None else g.set_state(state)

    while True:
        outer = [get(g) for g in generators]
        for g, state in zip(generators, states):
            put(g, state)
        try:
            batch = next(batches)
        except StopIteration:
            return
        finally:
            states = [get(g) for g in generators]
            for g, state in zip(generators, outer):
                put(g, state)
        yield batch


def batch_size_of(loader) -> int:
    size = getattr(loader, "batch_size", None)
    if isinstance(size, int) and size > 0:
        return size
    first = next(loader_batches(loader, 0, endless=False), None)
    if first is None:
        raise ValueError("the loader yielded no batches; pass a non-empty loader")
    leaf = first
    while not isinstance(leaf, torch.Tensor):
        if isinstance(leaf, Mapping) and leaf:
            leaf = next(iter(leaf.values()))
        elif isinstance(leaf, (tuple, list)) and leaf:
            leaf = leaf[0]
        else:
            raise ValueError("cannot tell the batch size from the loader; pass nbeta explicitly")
    return int(leaf.shape[0]) if leaf.dim() else 1


FEW_BATCHES = 8  # a loader this short, cycled, repeats the same handful of minibatches


def warn_if_cycled(loader, steps: int, per_step: int = 1, stacklevel: int = 3) -> None:
    """A chain that needs more batches than the loader holds passes over it
    again, as training does in epochs; users should know only where the
    loader is a handful of batches, so the same few minibatches drive every
    step. A single batch is full-batch sampling, reused by design, so it
    passes silently."""
    try:
        n = len(loader)
    except TypeError:
        return
    need = steps * per_step
    if 1 < n < min(need, FEW_BATCHES):
        took = f"{steps} steps" if per_step == 1 else f"{steps} steps of {per_step} micro-batches"
        warnings.warn(f"the loader holds {n} batches but each chain takes {took}; it is cycled, so every "
                      f"batch is used about {need / n:.1f} times per chain and the same few minibatches drive "
                      "every step (pass one full batch, [(x, y)], for full-batch sampling)",
                      UserWarning, stacklevel=stacklevel)
