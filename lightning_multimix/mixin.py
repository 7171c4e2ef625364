"""The optional second line of adoption: a mixin through which a LightningModule tells MultiMix where things are."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

from torch import Tensor, nn

LABEL_KEYS = ("label", "labels", "target", "targets", "y")


def default_labels(batch: Any) -> Tensor:
    """Integer labels of a batch: ``batch[1]`` of a tuple or list, or the first of ``LABEL_KEYS`` in a dict.

    Example:
        >>> import torch
        >>> default_labels((torch.zeros(2, 3), torch.tensor([1, 0])))
        tensor([1, 0])
        >>> default_labels({"image": torch.zeros(2, 3), "label": torch.tensor([2, 2])})
        tensor([2, 2])
    """
    if isinstance(batch, Mapping):
        for key in LABEL_KEYS:
            if key in batch:
                return batch[key]
        raise ValueError(
            f"MultiMix found no labels in the batch dict (keys {sorted(map(str, batch))}); it looks for {LABEL_KEYS}. "
            "Add `MultiMixMixin` to your LightningModule and override `multimix_labels(batch)`."
        )
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
        return batch[1]
    raise ValueError(
        f"MultiMix cannot find labels in a batch of type {type(batch).__name__}: it expects (inputs, labels, ...) or a "
        f"dict with one of {LABEL_KEYS}. Add `MultiMixMixin` to your LightningModule and override "
        "`multimix_labels(batch)`."
    )


class MultiMixMixin:
    """Lets a LightningModule name its classifier head, its feature map and its labels for :class:`MultiMix`.

    Override only what auto-detection gets wrong::

        class Net(MultiMixMixin, L.LightningModule):
            def multimix_head(self):
                return self.classifier  # the module whose input is the penultimate embedding

            def multimix_labels(self, batch):
                return batch["class_id"]

    ``multimix_head`` returns a module called once per forward on ``(b, d)`` embeddings giving ``(b, c)`` logits.
    ``multimix_feature_map`` (dense mode) returns a module whose output is the un-pooled feature map, ``(b, d, h, w)``
    or ``(b, r, d)`` tokens, whose mean over positions is the head's input.
    The callback's ``head=`` argument, when given, takes precedence over ``multimix_head``.
    """

    def multimix_head(self) -> Optional[nn.Module]:
        """The classifier head; ``None`` (the default) lets the callback auto-detect it."""
        return None

    def multimix_feature_map(self) -> Optional[nn.Module]:
        """The module whose output is the feature map for dense MultiMix; ``None`` lets the callback auto-detect it."""
        return None

    def multimix_labels(self, batch: Any) -> Tensor:
        """Integer class labels ``(b,)`` of a training batch."""
        return default_labels(batch)
