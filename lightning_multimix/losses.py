"""Soft-target cross-entropy, the loss of every interpolated example (torch only, no Lightning)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def soft_cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0, dim: int = -1) -> Tensor:
    r"""Mean over rows of ``-sum_c t_c log softmax(logits)_c``, computed in float32 whatever the input dtype.

    It is ``F.cross_entropy`` with probability targets, laid out the way that function wants. The class
    dimension may be any: ``dim=0`` is the class-major ``(c, N)`` layout of the logit-space interpolation, ``dim=1``
    the ``(r, c, n)`` layout of the dense one.

    Args:
        logits: unnormalised scores, ``(N, c)``, ``(N, ..., c)`` or with the classes along ``dim``.
        targets: same shape, distributions along ``dim``.
        label_smoothing: ``eps`` in ``[0, 1)``: targets become ``(1 - eps) t + eps / c``.
        dim: the class dimension; the mean runs over all the others.

    Example:
        >>> import torch
        >>> soft_cross_entropy(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]))  # log 2
        tensor(0.6931)
        >>> logits, targets = torch.randn(3, 5), torch.softmax(torch.randn(3, 5), 0)
        >>> bool(torch.isclose(soft_cross_entropy(logits, targets, dim=0),
        ...                    -(targets * logits.log_softmax(0)).sum(0).mean()))
        True
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
