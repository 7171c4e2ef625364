"""Reading a batch's labels and mixing its inputs: ``(inputs, labels)`` sequences and dicts, else ``MultiMixMixin``."""

from __future__ import annotations

import copy
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_multimix.errors import MultiMixError
from lightning_multimix.interpolation import mix_with_partner
from lightning_multimix.sampling import mixup_pairing

LABEL_KEYS = ("label", "labels", "target", "targets", "y")
INPUT_KEYS = ("image", "images", "img", "input", "inputs", "x", "pixel_values", "input_values", "input_ids")


def default_labels(batch: Any) -> Tensor:
    """Labels of a batch: ``batch[1]`` of an ``(inputs, labels)`` pair, or the first of ``LABEL_KEYS`` in a dict;
    anything else (a longer tuple included) raises :class:`MultiMixError` (name them with the mixin)."""
    how = "Add `MultiMixMixin` to your LightningModule and override `multimix_labels(batch)`"
    if isinstance(batch, Mapping):
        for key in LABEL_KEYS:
            if key in batch:
                return batch[key]
        raise MultiMixError(f"MultiMix found no labels in the batch dict (keys {sorted(map(str, batch))}); it looks "
                            f"for {LABEL_KEYS}. {how}.")
    sequence = isinstance(batch, Sequence) and not isinstance(batch, (str, bytes))
    if sequence and len(batch) == 2:
        return batch[1]
    if sequence and len(batch) > 2:
        raise MultiMixError("MultiMix reads the labels of `(inputs, labels)` batches from `batch[1]`, but this "
                            f"batch has {len(batch)} elements, so which one holds the labels is a guess it will not "
                            f"make. {how} (e.g. `return batch[2]`).")
    raise MultiMixError(f"MultiMix cannot find labels in a batch of type {type(batch).__name__}: it expects (inputs, "
                        f"labels) or a dict with one of {LABEL_KEYS}. {how}.")


def default_mix_inputs(batch: Any, mix: Callable[[Tensor], Tensor]) -> Optional[Any]:
    """A copy of the batch with its inputs (``batch[0]``, or the first of ``INPUT_KEYS`` in a dict) mixed by ``mix``;
    ``None`` for integer inputs (token ids) or none found: the batch is then mixed at the last layer."""
    if isinstance(batch, Mapping):
        key = next((k for k in INPUT_KEYS if k in batch), None)
        if key is None or not _floating(batch[key]):
            return None
        if isinstance(batch, MutableMapping):
            mixed = copy.copy(batch)
            mixed[key] = mix(batch[key])
            return mixed
        return {**batch, key: mix(batch[key])}
    if not isinstance(batch, Sequence) or isinstance(batch, (str, bytes)) or len(batch) < 1 or not _floating(batch[0]):
        return None
    first = mix(batch[0])
    if isinstance(batch, tuple) and hasattr(batch, "_replace"):  # a namedtuple
        return batch._replace(**{batch._fields[0]: first})
    return type(batch)([first, *batch[1:]]) if isinstance(batch, (tuple, list)) else [first, *batch[1:]]


def _floating(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point()


class InputMixer:
    """``mix(tensor)`` for one batch: each call reuses the first call's :func:`mixup_pairing` draw, so all inputs are
    mixed alike; a non-floating tensor or another row count raises :class:`MultiMixError`.

    Example:
        >>> mixer = InputMixer(1.0, torch.Generator().manual_seed(0))
        >>> x = torch.arange(4.0).view(4, 1)
        >>> torch.equal(mixer(2 * x), 2 * mixer(x))
        True
    """

    def __init__(self, alpha: float, generator: torch.Generator) -> None:
        self.alpha, self.generator = alpha, generator
        self.draw: Optional[tuple[Tensor, Tensor]] = None

    def __call__(self, inputs: Tensor) -> Tensor:
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
            what = f"dtype {inputs.dtype}" if isinstance(inputs, Tensor) else type(inputs).__name__
            raise MultiMixError(f"MultiMix: `multimix_mix_inputs` asked to interpolate {what}; only floating-point "
                                "tensors can be mixed. Return None from `multimix_mix_inputs` for inputs that "
                                "cannot be (such batches are then mixed at the last layer), or pass "
                                "`MultiMix(other_batches='pairs')`.")
        if self.draw is None:
            self.draw = mixup_pairing(inputs.shape[0], self.alpha, generator=self.generator,
                                      device=self.generator.device)
        lam, partner = self.draw
        if partner.shape[0] != inputs.shape[0]:
            raise MultiMixError(f"MultiMix: `multimix_mix_inputs` asked to mix tensors of {partner.shape[0]} and "
                                f"{inputs.shape[0]} rows in one batch; every mixed tensor needs one row per example.")
        return mix_with_partner(inputs, lam.to(inputs.device), partner.to(inputs.device))
