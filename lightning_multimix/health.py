"""The health flag: a non-finite loss or labels out of range, recorded on the device at every batch (no
synchronisation) and read at the first batch, every ``check_every_n_steps`` batches and at the end of training.
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
        # (first bad batch, code: 1 non-finite loss, 2 labels out of range, 4 some of them negative; examples left
        # out by an ignore index)
        self.state = torch.tensor([-1, 0, 0], device=device)
        self.check_every_n_steps = check_every_n_steps
        self.num_classes: Optional[int] = None
        self.reported_ignored = False

    def update(self, loss: Tensor, labels: Tensor, num_classes: int, batch: int, keep: Optional[Tensor] = None) -> None:
        """Record, on the device and without synchronising, ``batch`` if it is the first bad one, and count the
        examples left out (``keep`` false: their label is the ignore index, never out of range)."""
        self.num_classes = num_classes
        labels = labels if keep is None else labels.where(keep, 0)
        code = (~torch.isfinite(loss.detach())).long() + 2 * labels_out_of_range(labels, num_classes).long() + \
            4 * (labels < 0).any().long()
        first = (self.state[0] < 0) & (code > 0)
        index = torch.full((), batch, device=self.state.device)
        bad = torch.where(first, torch.stack((index, code.to(index.device))), self.state[:2])
        ignored = self.state[2:] + (0 if keep is None else (~keep).sum().to(index.device))
        self.state = torch.cat((bad, ignored))

    def read_due(self, batch: int) -> bool:
        """Whether to read the flag after ``batch``: the first batch, then every ``check_every_n_steps``."""
        return batch % self.check_every_n_steps == 0

    def raise_if_unhealthy(self, global_step: int, head_path: Optional[str]) -> int:
        """Read the flag (a host-device synchronisation) and raise :class:`MultiMixError` if a batch was bad; else
        return the number of examples left out so far the first time it is not zero (to be said once), else 0."""
        bad_batch, code, ignored = self.state.tolist()
        if bad_batch < 0:
            if ignored and not self.reported_ignored:
                self.reported_ignored = True
                return ignored
            return 0
        if code & 2:
            negative = (" If a negative label marks examples your loss ignores, pass that label as "
                        "`MultiMix(ignore_index=...)` (the default is -100, PyTorch's).") if code & 4 else ""
            raise MultiMixError(
                f"MultiMix: labels outside [0, {self.num_classes}) at training batch {bad_batch}: the head "
                f"{head_path!r} has {self.num_classes} outputs. Check the dataset's labels, or, if that is not your "
                f"classifier, pass `MultiMix(head='dotted.path')`.{negative}"
            )
        raise MultiMixError(
            f"MultiMix: the loss became non-finite (NaN or inf) at training batch {bad_batch} (noticed at global "
            f"step {global_step}). Lower the learning rate, clip gradients (`Trainer(gradient_clip_val=...)`), or "
            "use bf16 instead of fp16."
        )
