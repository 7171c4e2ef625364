"""An optional mixin through which a LightningModule tells MultiMix where things are."""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor, nn

from lightning_multimix.batch import default_labels, default_mix_inputs


class MultiMixMixin:
    """Lets a LightningModule name its head, feature map, labels and inputs; override only what detection gets wrong.

    Example:
        >>> class Net(MultiMixMixin, nn.Module):
        ...     def multimix_labels(self, batch):
        ...         return batch["class_id"]
        >>> Net().multimix_labels({"class_id": 3})
        3
    """

    def multimix_head(self) -> Optional[nn.Module]:
        """The head, ``(b, d)`` embeddings to ``(b, c)`` logits; ``None``: detect it (``MultiMix(head=...)`` wins)."""
        return None

    def multimix_feature_map(self) -> Optional[nn.Module]:
        """Dense mode: the module outputting the un-pooled map whose mean is the head's input; ``None``: detect it."""
        return None

    def multimix_labels(self, batch: Any) -> Tensor:
        """The targets of a training batch: ``(b,)`` class indices or ``(b, c)`` floating targets."""
        return default_labels(batch)

    def multimix_mix_inputs(self, batch: Any, mix: Callable[[Tensor], Tensor]) -> Optional[Any]:
        """The batch with ``mix`` applied to each floating ``(b, ...)`` input (``{**batch, "img": mix(batch["img"])}``),
        one draw per batch; ``None``: mix this batch at the last layer instead."""
        return default_mix_inputs(batch, mix)
