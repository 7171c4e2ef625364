"""The optional second line of adoption: a mixin through which a LightningModule tells MultiMix where things are."""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor, nn

from lightning_multimix.batch import default_labels, default_mix_inputs


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
