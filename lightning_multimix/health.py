"""The health check: a non-finite loss or labels out of range, counted on the device at every batch (no
synchronisation) and read at the first batch, every ``check_every_n_steps`` batches, at an epoch's end and at the end
of training.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_multimix.errors import MultiMixError
from lightning_multimix.targets import labels_error


class HealthFlag:
    """Counts, on ``device``, the labels out of range since the fit started; :meth:`raise_if_unhealthy` reads them with
    the loss's running sum (non-finite once any loss was) and names the batches since the last healthy read.

    Example:
        >>> flag = HealthFlag(torch.device("cpu"), check_every_n_steps=50)
        >>> flag.update(torch.tensor([False, True]), num_classes=2)
        >>> flag.raise_if_unhealthy(torch.tensor(1.0), batch=3, global_step=4, head_path="fc")
        Traceback (most recent call last):
        ...
        lightning_multimix.errors.MultiMixError: MultiMix: labels outside [0, 2) at a training batch from 0 to 3...
    """

    def __init__(self, device: torch.device, check_every_n_steps: int) -> None:
        self.unexpected_labels = torch.zeros((), dtype=torch.long, device=device)
        self.check_every_n_steps = check_every_n_steps
        self.num_classes: Optional[int] = None
        self.healthy_before = 0  #: the batches before this index were read healthy

    def update(self, unexpected: Tensor, num_classes: int) -> None:
        """Count, without synchronising, the labels of a batch that are neither a class nor ignored (``unexpected``,
        ``(b,)`` booleans)."""
        self.num_classes = num_classes
        self.unexpected_labels.add_(unexpected.sum())

    def read_due(self, batch: int) -> bool:
        """Whether to read after ``batch``: the first batch, then every ``check_every_n_steps``."""
        return batch % self.check_every_n_steps == 0

    def raise_if_unhealthy(self, loss_total: Optional[Tensor], batch: int, global_step: int,
                           head_path: Optional[str]) -> None:
        """Read (a host-device synchronisation) the label count and ``loss_total`` (the sum of the losses since the
        epoch started) after ``batch``, and raise :class:`MultiMixError` if a label was out of range or a loss not
        finite. Nothing is read when no batch ran since the last read."""
        if batch < self.healthy_before:
            return  # read since the last batch
        total = loss_total.detach().float() if loss_total is not None else torch.zeros(())
        finite, unexpected = torch.stack((total.isfinite().to(total.device, torch.long),
                                          self.unexpected_labels.to(total.device))).tolist()
        first, self.healthy_before = self.healthy_before, batch + 1
        where = f"at training batch {batch}" if first == batch else f"at a training batch from {first} to {batch}"
        if unexpected:
            raise labels_error(self.num_classes, where, head_path)
        if not finite:
            raise MultiMixError(
                f"MultiMix: the loss became non-finite (NaN or inf) {where} (noticed at global step {global_step}). "
                "Lower the learning rate, clip gradients (`Trainer(gradient_clip_val=...)`), or use bf16 instead of "
                "fp16."
            )
