"""The optional second line of adoption: a mixin through which a LightningModule tells MultiMix where things are."""

from __future__ import annotations

import copy
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, Callable, Optional

from torch import Tensor, nn

LABEL_KEYS = ("label", "labels", "target", "targets", "y")
INPUT_KEYS = ("image", "images", "img", "input", "inputs", "x", "pixel_values", "input_values", "input_ids")


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


def default_mix_inputs(batch: Any, mix: Callable[[Tensor], Tensor]) -> Optional[Any]:
    """The batch with its inputs mixed by ``mix``, or ``None`` where the inputs cannot be interpolated.

    The inputs are ``batch[0]`` of a tuple or list, or the first of ``INPUT_KEYS`` in a dict. Integer inputs (token
    ids) or a batch without such inputs give ``None``: the batch is then mixed at the last layer instead. The batch
    is copied, never modified in place.

    Example:
        >>> import torch
        >>> halve = lambda t: t / 2
        >>> default_mix_inputs((torch.ones(2, 3), torch.tensor([1, 0])), halve)[0]
        tensor([[0.5000, 0.5000, 0.5000],
                [0.5000, 0.5000, 0.5000]])
        >>> default_mix_inputs({"input_ids": torch.tensor([[3, 4]]), "labels": torch.tensor([1])}, halve) is None
        True
    """
    if isinstance(batch, Mapping):
        key = next((k for k in INPUT_KEYS if k in batch), None)
        if key is None or not _floating(batch[key]):
            return None
        if isinstance(batch, MutableMapping):
            mixed = copy.copy(batch)
            mixed[key] = mix(batch[key])
            return mixed
        return {**batch, key: mix(batch[key])}
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 1:
        if not _floating(batch[0]):
            return None
        first = mix(batch[0])
        if isinstance(batch, tuple) and hasattr(batch, "_replace"):  # a namedtuple
            return batch._replace(**{batch._fields[0]: first})
        return type(batch)([first, *batch[1:]]) if isinstance(batch, (tuple, list)) else [first, *batch[1:]]
    return None


def _floating(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point()


class MultiMixMixin:
    """Lets a LightningModule name its classifier head, its feature map and its labels for :class:`MultiMix`.

    Override only what auto-detection gets wrong::

        class Net(MultiMixMixin, L.LightningModule):
            def multimix_head(self):
                return self.classifier  # the module whose input is the penultimate embedding

            def multimix_labels(self, batch):
                return batch["class_id"]

    ``multimix_head`` returns a module called once per forward on ``(b, d)`` embeddings giving ``(b, c)`` logits.
    ``multimix_mix_inputs`` (batches mixed in input space) returns the batch with ``mix`` applied to every tensor that
    should be interpolated (e.g. ``{**batch, "img": mix(batch["img"])}``), or ``None`` when nothing can be.
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

    def multimix_mix_inputs(self, batch: Any, mix: Callable[[Tensor], Tensor]) -> Optional[Any]:
        """A training batch with its inputs replaced by ``mix(inputs)``, for the batches that :class:`MultiMix` mixes
        in input space; ``None``: the inputs cannot be interpolated (those batches are mixed at the last layer).

        ``mix`` applies the same ``lambda`` and partner permutation to every tensor it is given (``(b, ...)``
        floating-point tensors). The default mixes ``batch[0]`` or the first of ``INPUT_KEYS`` in a dict.
        """
        return default_mix_inputs(batch, mix)
