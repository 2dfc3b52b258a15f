"""A batch of token sequences split into a language model's inputs and the
next tokens it predicts."""
from __future__ import annotations

from collections.abc import Mapping

import torch

HF_BATCH_KEYS = ("input_ids", "labels")


def inputs_and_targets(batch):
    """A batch of token sequences (alone, first of a tuple, or a dict's
    "input_ids", with "labels" as the tokens to predict where given) split
    into the model's inputs and the next tokens it predicts."""
    if isinstance(batch, Mapping):
        extra = sorted(set(batch) - set(HF_BATCH_KEYS))
        if "input_ids" not in batch or extra:
            raise ValueError(f"a dict batch for the next-token loss holds 'input_ids' and optionally 'labels', got "
                             f"keys {sorted(batch)}; for attention masks pass loss_fn=None, which takes the "
                             "model's own .loss")
        labels = batch.get("labels", batch["input_ids"])
        if _inspectable(labels) and bool((labels < 0).any()):
            raise ValueError("the batch's 'labels' hold negative ids (-100 masks?); the next-token loss scores every "
                             "position: for masked labels pass loss_fn=None, which takes the model's own .loss")
        return batch["input_ids"][:, :-1], labels[:, 1:]
    tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
    return tokens[:, :-1], tokens[:, 1:]


def _inspectable(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values is allowed here: not under a torch.func
    transform, a CUDA graph capture or torch.compile."""
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return not ((wrapped is not None and wrapped(t)) or torch.compiler.is_compiling()
                or (t.is_cuda and torch.cuda.is_current_stream_capturing()))
