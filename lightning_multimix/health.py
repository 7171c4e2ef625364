"""The health flag: a non-finite loss or labels out of range, recorded on the device, read when it is cheap.

Reading a device tensor synchronises the host with the device, so the flag is updated on the device at every batch
(no synchronisation) and read at the first batch, at every batch on CPU (free), else every ``check_every_n_steps``
batches and at the end of training.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_multimix.errors import MultiMixError
from lightning_multimix.interpolation import labels_out_of_range


class HealthFlag:
    """The first training batch whose loss was non-finite or whose labels were out of range, kept on ``device``.

    Example:
        >>> flag = HealthFlag(torch.device("cpu"), check_every_n_steps=50)
        >>> flag.update(torch.tensor(float("nan")), torch.tensor([0, 1]), num_classes=2, batch=3)
        >>> flag.raise_if_unhealthy(global_step=4, head_path="fc")
        Traceback (most recent call last):
        ...
        lightning_multimix.errors.MultiMixError: MultiMix: the loss became non-finite (NaN or inf) at training...
    """

    def __init__(self, device: torch.device, check_every_n_steps: int) -> None:
        self.state = torch.tensor([-1, 0], device=device)  # (first bad batch, code: 1 non-finite loss, 2 labels)
        self.check_every_n_steps = check_every_n_steps
        self.num_classes: Optional[int] = None

    def update(self, loss: Tensor, labels: Tensor, num_classes: int, batch: int) -> None:
        """Record, on the device and without synchronising, ``batch`` if it is the first bad one."""
        code = (~torch.isfinite(loss.detach())).long() + 2 * labels_out_of_range(labels, num_classes).long()
        first = (self.state[0] < 0) & (code > 0)
        index = torch.full((), batch, device=self.state.device)
        self.state = torch.where(first, torch.stack((index, code.to(index.device))), self.state)
        self.num_classes = num_classes

    def read_due(self, batch: int, device: torch.device) -> bool:
        """Whether to read the flag after ``batch``: always on CPU, every ``check_every_n_steps`` batches elsewhere."""
        return device.type == "cpu" or batch % self.check_every_n_steps == 0

    def raise_if_unhealthy(self, global_step: int, head_path: Optional[str]) -> None:
        """Read the flag (a host-device synchronisation) and raise :class:`MultiMixError` if a batch was bad."""
        bad_batch, code = self.state.tolist()
        if bad_batch < 0:
            return
        if code & 2:
            raise MultiMixError(
                f"MultiMix: labels outside [0, {self.num_classes}) at training batch {bad_batch}: the head "
                f"{head_path!r} has {self.num_classes} outputs. Check the dataset's labels, or, if that is not your "
                "classifier, pass `MultiMix(head='dotted.path')`."
            )
        raise MultiMixError(
            f"MultiMix: the loss became non-finite (NaN or inf) at training batch {bad_batch} (noticed at global "
            f"step {global_step}). Lower the learning rate, clip gradients (`Trainer(gradient_clip_val=...)`), or "
            "use bf16 instead of fp16."
        )
