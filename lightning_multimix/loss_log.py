"""Logging the loss MultiMix optimises: ``multimix/loss`` (progress bar and loggers) and ``multimix/loss_epoch``.

The loss is summed on the device (no synchronisation) and logged, since ``self.log`` is costly, only as the mean since
the last log when Lightning logs a step, at the first batch and at an epoch's last; the epoch's mean at its end.
"""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch
from torch import Tensor


class LossLog:
    """The optimised loss summed since the last log and over the epoch.

    Example:
        >>> log = LossLog()
        >>> log.add(torch.tensor(2.0)); log.add(torch.tensor(4.0))
        >>> log.take_window(), log.epoch_total()
        (tensor(3.), [6.0, 2])
    """

    def __init__(self) -> None:
        self.start_epoch()

    def start_epoch(self) -> None:
        self.epoch_batches = 0  # every training batch of the epoch, mixed or not
        self._window: Optional[Tensor] = None
        self._epoch: Optional[Tensor] = None
        self._window_count = self._epoch_count = 0

    def batch_started(self) -> None:
        """Count a training batch of the epoch, mixed or not (the epoch's last one is logged)."""
        self.epoch_batches += 1

    def add(self, loss: Tensor) -> None:
        value = loss.detach()
        self._window = value if self._window is None else self._window + value
        self._epoch = value if self._epoch is None else self._epoch + value
        self._window_count, self._epoch_count = self._window_count + 1, self._epoch_count + 1

    def due(self, trainer: pl.Trainer, first: bool) -> bool:
        """Whether to log now: the first batch, an epoch's last, or when Lightning logs this step."""
        return first or self.epoch_batches == trainer.num_training_batches or lightning_logs_now(trainer)

    def take_window(self) -> Tensor:
        """The mean since the last call; starts a new window."""
        mean = self._window / self._window_count
        self._window, self._window_count = None, 0
        return mean

    def epoch_total(self) -> list:
        """``[sum, count]`` of the epoch on this process."""
        return [0.0 if self._epoch is None else float(self._epoch), self._epoch_count]

    def log_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the epoch's mean over all processes. Every process takes part (one with no mixed batch this epoch
        adds ``0 / 0``), so none waits on a collective another skipped."""
        total = trainer.strategy.reduce(torch.tensor(self.epoch_total(), device=pl_module.device), reduce_op="sum")
        if total[1] > 0:
            pl_module.log("multimix/loss_epoch", total[0] / total[1], on_step=False, on_epoch=True)


def lightning_logs_now(trainer: pl.Trainer) -> bool:
    """Whether Lightning sends this training step's logged values to the loggers."""
    try:  # private but long-lived (Lightning 1.6 to 2.x); its rule is the fallback
        return bool(trainer._logger_connector.should_update_logs)
    except AttributeError:
        return (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0
