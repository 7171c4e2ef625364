"""Soft-target cross-entropy, the loss of every interpolated example (torch only, no Lightning)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def soft_cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0, dim: int = -1) -> Tensor:
    r"""Float32 mean of ``-sum_c t_c log softmax(logits)_c`` over every entry but the class dimension ``dim``.

    ``targets``: ``logits``' shape (``dim=0``: class-major); ``label_smoothing`` ``eps`` in ``[0, 1)`` makes them
    ``(1 - eps) t + eps / c``. Other shapes or ``eps`` raise ``ValueError``.

    Example:
        >>> import torch
        >>> soft_cross_entropy(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]))  # log 2
        tensor(0.6931)
    """
    if logits.shape != targets.shape:
        raise ValueError(f"`logits` {tuple(logits.shape)} and `targets` {tuple(targets.shape)} must have the same "
                         "shape.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"Expected `label_smoothing` in [0, 1), got {label_smoothing!r}.")
    dim = dim % logits.ndim
    logits, targets = logits.float(), targets.float()
    if dim == logits.ndim - 1:  # rows of classes: (N, ..., c) -> (N * ..., c), a free view when contiguous
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, targets.shape[-1])
    elif dim == 0:  # class-major (c, ...): one "batch" whose classes lie along dimension 1
        logits, targets = logits.unsqueeze(0), targets.unsqueeze(0)
    elif dim != 1:
        logits, targets = logits.movedim(dim, 1), targets.movedim(dim, 1)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
