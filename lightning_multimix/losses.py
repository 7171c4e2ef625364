"""Losses on interpolated examples: soft-target cross-entropy and the MultiMix loss in its two exact forms."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from lightning_multimix.interpolation import interpolate, interpolate_columns, one_hot  # noqa: F401 (one_hot: doctests)


def soft_cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0, dim: int = -1) -> Tensor:
    r"""Mean over rows of ``-sum_c t_c log softmax(logits)_c``, computed in float32 whatever the input dtype.

    Args:
        logits: ``(N, c)`` or ``(N, ..., c)`` unnormalised scores.
        targets: same shape, rows on the simplex.
        label_smoothing: ``eps`` in ``[0, 1)``: targets become ``(1 - eps) t + eps / c``.
        dim: the class dimension; the mean runs over all the others (``dim=0``: the class-major ``(c, N)`` layout).

    Example:
        >>> logits = torch.tensor([[0.0, 0.0]])
        >>> soft_cross_entropy(logits, torch.tensor([[1.0, 0.0]]))  # log 2
        tensor(0.6931)
    """
    if logits.shape != targets.shape:
        raise ValueError(f"`logits` {tuple(logits.shape)} and `targets` {tuple(targets.shape)} must have the same shape.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"Expected `label_smoothing` in [0, 1), got {label_smoothing!r}.")
    targets = targets.float()
    if label_smoothing > 0:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[dim]
    log_probs = torch.log_softmax(logits.float(), dim=dim)
    return -(targets * log_probs).sum(dim).mean()


def multimix_loss(
    embeddings: Tensor,
    targets: Tensor,
    weights: Tensor,
    head: Callable[[Tensor], Tensor],
    label_smoothing: float = 0.0,
) -> Tensor:
    r"""MultiMix loss in embedding space: the head on ``n`` interpolated embeddings against interpolated targets.

    ``loss = mean_k CE(head(Z^T lambda_k), Y^T lambda_k)``. Valid for any head.

    Args:
        embeddings: ``(m, d)`` penultimate embeddings (the head's input).
        targets: ``(m, c)`` target distributions (``one_hot(labels, c)`` or teacher-made soft targets).
        weights: ``(m, n)`` interpolation weights.
        head: the classifier head, mapping ``(n, d)`` to ``(n, c)``.

    Example:
        >>> head = torch.nn.Linear(3, 2)
        >>> weights = torch.full((4, 10), 0.25)
        >>> targets = one_hot(torch.tensor([0, 1, 0, 1]), 2)
        >>> multimix_loss(torch.randn(4, 3), targets, weights, head).shape
        torch.Size([])
    """
    mixed_embeddings = interpolate(embeddings, weights)
    mixed_logits = head(mixed_embeddings.to(embeddings.dtype))
    return soft_cross_entropy(mixed_logits, interpolate(targets, weights), label_smoothing)


def multimix_logit_loss(logits: Tensor, targets: Tensor, weights: Tensor, label_smoothing: float = 0.0) -> Tensor:
    r"""MultiMix loss in logit space, exact for an affine head.

    For ``g(z) = W z + b`` and columns of ``weights`` summing to 1, ``g(Z lambda) = g(Z) lambda``: interpolating the
    ``m`` logit vectors costs ``n*m*c`` instead of ``n*m*d + n*d*c`` and gives the same loss and gradients as
    :func:`multimix_loss`.

    Example:
        >>> head = torch.nn.Linear(3, 2)
        >>> z, w = torch.randn(4, 3), torch.full((4, 5), 0.25)
        >>> t = one_hot(torch.tensor([0, 1, 0, 1]), 2)
        >>> torch.allclose(multimix_logit_loss(head(z), t, w), multimix_loss(z, t, w, head), atol=1e-6)
        True
    """
    mixed_logits = interpolate_columns(logits, weights)  # (c, n): the fast product layout
    return soft_cross_entropy(mixed_logits, interpolate_columns(targets, weights), label_smoothing, dim=0)
