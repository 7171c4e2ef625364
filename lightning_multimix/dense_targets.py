"""Dense MultiMix's target numerator for one-hot targets, by class (torch only, no Lightning).

``sum_i a_ij lambda_ik [y_i = c]``, the attention-weighted one-hot targets mixed at every position, is what
:func:`~lightning_multimix.dense.factorised_dense_logit_loss` divides by the attention's normaliser to get the
interpolated targets. Integer labels make it a per-class sum, cheaper than a product with the one-hot matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_multimix.interpolation import class_buckets, one_hot


def mix_by_class(attention: Tensor, labels: Tensor, num_classes: int, weights: Tensor) -> Tensor:
    r"""The dense target numerator of one-hot targets, ``(r, c, n)``: ``sum_i a_ij lambda_ik [y_i = c]``.

    On CPU, one product ``(r x m_c) @ (m_c x n)`` per class over its ``m_c`` examples (``r*m*n`` multiply-adds in
    all, instead of the ``r*c*m*n`` of one product with the one-hot targets spread over ``r*c`` rows: about 3x faster
    in ``benchmarks/kernels.py``). Elsewhere the one product: the per-class split needs the class counts on the
    host, a synchronisation. A label outside ``[0, c)`` adds nothing.

    Example:
        >>> attention, weights = torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([[0.25], [0.75]])
        >>> mix_by_class(attention, torch.tensor([1, 1]), 2, weights)[:, :, 0]  # (r, c): all of it in class 1
        tensor([[0.0000, 0.6250],
                [0.0000, 0.3750]])
    """
    if weights.device.type != "cpu":
        return spread_by_class(attention, labels, num_classes, weights)
    r = attention.shape[1]
    bucket = class_buckets(labels, num_classes)
    order = torch.argsort(bucket, stable=True)
    attention, weights = attention[order], weights[order]
    out = weights.new_zeros(r, num_classes, weights.shape[1])
    start = 0
    for label, count in enumerate(torch.bincount(bucket, minlength=num_classes + 1).tolist()[:num_classes]):
        if count:
            torch.mm(attention[start:start + count].T, weights[start:start + count], out=out[:, label])
        start += count
    return out


def spread_by_class(attention: Tensor, labels: Tensor, num_classes: int, weights: Tensor) -> Tensor:
    r""":func:`mix_by_class` as one product: the attention spread over ``r*c`` rows by the one-hot labels, ``(r*c x
    m) @ (m x n)``. What :func:`mix_by_class` does off CPU, where it needs no class counts on the host.

    Example:
        >>> attention, weights = torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([[0.25], [0.75]])
        >>> spread_by_class(attention, torch.tensor([1, 1]), 2, weights)[:, :, 0]
        tensor([[0.0000, 0.6250],
                [0.0000, 0.3750]])
    """
    m, r = attention.shape
    spread = attention.unsqueeze(-1) * one_hot(labels, num_classes, attention.dtype).unsqueeze(1)  # (m, r, c)
    return (spread.to(weights.dtype).reshape(m, -1).T @ weights).view(r, num_classes, -1)
