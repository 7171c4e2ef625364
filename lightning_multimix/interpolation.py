"""Interpolation of embeddings, logits and targets with one weight matrix.

``values`` holds one row per example, ``weights`` is ``(m, n)`` (see :mod:`lightning_multimix.sampling`); the result
holds one row per interpolated example: ``weights.T @ values``. Embeddings and targets go through the same function with
the same weights, so they can never disagree.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def full_precision(tensor: Tensor) -> contextlib.AbstractContextManager:
    """A context with autocast off on ``tensor``'s device, so interpolations stay in float32 under mixed precision.

    Autocast would run the weight products in 16 bits, where the weights of a column no longer sum to one.

    Example:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16), full_precision(torch.zeros(1)):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    device = tensor.device.type
    try:
        enabled = torch.is_autocast_enabled(device)
    except (RuntimeError, TypeError):  # torch < 2.4 takes no device type; a device type autocast does not know
        enabled = True
    if not enabled:
        return contextlib.nullcontext()  # nothing to turn off
    try:
        return torch.autocast(device, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot targets ``(b, c)`` from integer labels ``(b,)``.

    Built by comparison, so a label outside ``[0, c)`` gives an all-zero row instead of a device-side crash; callers
    validate the range (see :func:`labels_out_of_range`).

    Example:
        >>> one_hot(torch.tensor([2, 0]), 3)
        tensor([[0., 0., 1.],
                [1., 0., 0.]])
    """
    return (labels.unsqueeze(-1) == torch.arange(num_classes, device=labels.device)).to(dtype)


def labels_out_of_range(labels: Tensor, num_classes: int) -> Tensor:
    """A 0-dim boolean tensor, on the labels' device, that is true when a label lies outside ``[0, num_classes)``.

    It stays on the device (no synchronisation); read it when convenient.

    Example:
        >>> labels_out_of_range(torch.tensor([0, 3]), 3)
        tensor(True)
    """
    return ((labels < 0) | (labels >= num_classes)).any()


def interpolate(values: Tensor, weights: Tensor) -> Tensor:
    r"""Interpolate ``m`` rows of ``values`` into ``n`` rows: ``out[k] = sum_i weights[i, k] * values[i]``.

    Args:
        values: ``(m, *feature_shape)``: embeddings, logits or targets of the ``m`` examples.
        weights: ``(m, n)`` interpolation weights.

    Returns:
        ``(n, *feature_shape)`` in the dtype of ``weights`` (float32 under mixed precision).

    Example:
        >>> values = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> weights = torch.tensor([[0.25, 1.0], [0.75, 0.0]])
        >>> interpolate(values, weights)
        tensor([[0.2500, 1.5000],
                [1.0000, 0.0000]])
    """
    if values.shape[0] != weights.shape[0]:
        raise ValueError(
            f"`values` has {values.shape[0]} rows but `weights` has {weights.shape[0]}: weights must be (m, n) for m "
            "rows."
        )
    flat = values.reshape(values.shape[0], -1).to(weights.dtype)
    with full_precision(values):
        return (weights.T @ flat).reshape(weights.shape[1], *values.shape[1:])


def interpolate_columns(values: Tensor, weights: Tensor) -> Tensor:
    r"""``interpolate(values, weights).T`` for ``(m, f)`` values, computed class-major as ``values.T @ weights``.

    Returns ``(f, n)``: column ``k`` is the ``k``-th interpolated row. For few features (``f`` = the number of classes)
    and many tuples, the wide product ``(f x m) @ (m x n)`` is the fast one for BLAS, forward and backward.

    Example:
        >>> values = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> weights = torch.tensor([[0.25, 1.0], [0.75, 0.0]])
        >>> torch.equal(interpolate_columns(values, weights), interpolate(values, weights).T)
        True
    """
    if values.ndim != 2 or values.shape[0] != weights.shape[0]:
        raise ValueError(
            f"`values` {tuple(values.shape)} must be (m, f) with m = {weights.shape[0]}, the rows of `weights`."
        )
    with full_precision(values):
        # a contiguous (f, m) operand: its gradient is then the wide (f x n) @ (n x m) product, not the skinny
        # (m x n) @ (n x f) that autograd picks for a transposed one
        return values.to(weights.dtype).T.contiguous() @ weights


def mix_with_partner(values: Tensor, lam: Tensor, partner: Tensor) -> Tensor:
    r"""Mixup of one batch: ``lam * values[i] + (1 - lam) * values[partner[i]]`` for every row ``i``.

    ``values`` keeps its dtype (images in the training dtype, one-hot targets in float32); ``lam`` is a 0-dim tensor
    and ``partner`` a permutation (see :func:`~lightning_multimix.sampling.mixup_pairing`). The same ``lam`` and
    ``partner`` mix the inputs and the targets, so they can never disagree.

    Example:
        >>> mix_with_partner(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor(0.75), torch.tensor([1, 0]))
        tensor([[0.7500, 0.2500],
                [0.2500, 0.7500]])
    """
    if not values.is_floating_point():
        raise ValueError(f"mixup interpolates floating-point values, got dtype {values.dtype}.")
    if partner.shape != values.shape[:1]:
        raise ValueError(f"`partner` {tuple(partner.shape)} must hold one index per row of `values` "
                         f"{tuple(values.shape)}.")
    # lerp(start, end, w) = start + w (end - start): two passes over the batch instead of four
    return torch.lerp(values.index_select(0, partner), values, lam.to(values.dtype))
