"""Logging the loss MultiMix optimises: ``multimix/loss`` (loggers) and ``multimix/loss_epoch``.

The loss is summed on the device (no synchronisation, one operation a batch) and logged, since ``self.log`` is costly,
only as the mean since the last log when Lightning logs a step, at the first batch and at an epoch's last; the epoch's
mean at its end.
"""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch
from torch import Tensor


class LossLog:
    """The optimised loss summed over the epoch, and how much of it is not logged yet.

    Example:
        >>> log = LossLog()
        >>> log.add(torch.tensor(2.0)); log.add(torch.tensor(4.0))
        >>> log.take_window(), log.total
        (tensor(3.), tensor(6.))
    """

    def __init__(self) -> None:
        self.start_epoch()

    def start_epoch(self) -> None:
        self.epoch_batches = 0  # every training batch of the epoch, mixed or not
        self.total: Optional[Tensor] = None  #: the sum over the epoch's mixed batches, on the device
        self.count = 0
        self._logged: Optional[Tensor] = None  # `total` when the last window was taken
        self._logged_count = 0

    def batch_started(self) -> None:
        """Count a training batch of the epoch, mixed or not (the epoch's last one is logged)."""
        self.epoch_batches += 1

    def add(self, loss: Tensor) -> None:
        with torch.no_grad():
            if self.total is None:
                self.total = loss.detach().float().clone()
            else:
                self.total.add_(loss)
        self.count += 1

    def due(self, trainer: pl.Trainer, first: bool) -> bool:
        """Whether to log now: the first batch, an epoch's last, or when Lightning logs this step."""
        return first or self.epoch_batches == trainer.num_training_batches or lightning_logs_now(trainer)

    def take_window(self) -> Tensor:
        """The mean since the last call; starts a new window."""
        logged = self._logged if self._logged is not None else 0.0
        mean = (self.total - logged) / (self.count - self._logged_count)
        self._logged, self._logged_count = self.total.clone(), self.count
        return mean

    def log_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the epoch's mean over all processes. Every process takes part (one with no mixed batch this epoch
        adds ``0 / 0``), so none waits on a collective another skipped."""
        total = self.total if self.total is not None else torch.zeros((), device=pl_module.device)
        both = torch.stack((total.to(pl_module.device), torch.full((), self.count, device=pl_module.device,
                                                                   dtype=total.dtype)))
        both = trainer.strategy.reduce(both, reduce_op="sum")
        if both[1] > 0:  # once an epoch, a synchronisation
            pl_module.log("multimix/loss_epoch", both[0] / both[1], on_step=False, on_epoch=True)


def lightning_logs_now(trainer: pl.Trainer) -> bool:
    """Whether Lightning sends this training step's logged values to the loggers: its rule (every
    ``log_every_n_steps`` optimizer steps, and when the fit stops), from the Trainer's public attributes."""
    every = trainer.log_every_n_steps
    return (every > 0 and (trainer.global_step + 1) % every == 0) or trainer.should_stop
