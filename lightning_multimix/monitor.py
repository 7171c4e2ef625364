"""The loss MultiMix optimises, watched on the device without synchronising: logged (:class:`LossLog`:
``multimix/loss`` as the mean since the last log when Lightning logs a step, at the first batch and at an epoch's last,
and ``multimix/loss_epoch``) and checked (:class:`HealthFlag`: a non-finite loss or labels out of range, read at the
first batch, every ``check_every_n_steps`` batches, at an epoch's end and at the end of training).
"""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_multimix.errors import MultiMixError
from lightning_multimix.targets import Targets


class LossLog:
    """The optimised loss summed over the epoch, and how much of it is not logged yet."""

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
            self.total = loss.detach().float().clone() if self.total is None else self.total.add_(loss)
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


class HealthFlag:
    """Counts, on ``device``, the labels out of range since the fit started; :meth:`raise_if_unhealthy` reads them with
    the loss's running sum (non-finite once any loss was) and names the batches since the last healthy read."""

    def __init__(self, device: torch.device) -> None:
        self.unexpected_labels = torch.zeros((), dtype=torch.long, device=device)
        self.targets: Optional[Targets] = None
        self.healthy_before = 0  #: the batches before this index were read healthy

    def update(self, unexpected: Tensor, targets: Targets) -> None:
        """Count, without synchronising, the targets of a batch that ``targets`` rejects (``unexpected``, ``(b,)``
        booleans: labels neither a class nor ignored, or rows that are not targets of the loss)."""
        self.targets = targets
        self.unexpected_labels.add_(unexpected.sum())

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
            raise self.targets.error(where, head_path)
        if not finite:
            raise MultiMixError(
                f"MultiMix: the loss became non-finite (NaN or inf) {where} (noticed at global step {global_step}). "
                "Lower the learning rate, clip gradients (`Trainer(gradient_clip_val=...)`), or use bf16 instead of "
                "fp16."
            )
