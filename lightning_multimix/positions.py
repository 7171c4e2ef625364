"""MultiMix for labels per position (segmentation masks, token tags), in bounded memory (torch only).

Interpolation ``k`` mixes the whole batch at every position ``p`` with the same weights ``lambda_k``: an example
whose label at ``p`` is ignored has weight 0 there and the others are renormalised, ``w_ik[p] = lambda_ik m_i[p] /
sum_j lambda_jk m_j[p]``; the mixed logits are ``sum_i w_ik[p] z_i[p]`` and the targets ``sum_i w_ik[p]
onehot(y_i[p])``. The loss is the mean cross-entropy over the mixed positions that keep a label (a position ignored by
every example leaves it), as ``F.cross_entropy`` averages over the kept positions.

Formed at once, the mixed logits hold ``n x c x P`` values, ``n / b`` times the model's own logits. The loss runs over
chunks of interpolations instead, each no larger than :data:`CHUNK_FACTOR` times the model's logits, and computes its
gradient in the same pass (the cross-entropy's ``softmax - target``, mapped back through the linear mix), so that
nothing of a chunk is kept for the backward: the value and the gradient are those of the whole tensor. Besides a
chunk, it holds three tensors of the logits' size (the masked logits, the one-hot labels, the gradient).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_multimix.interpolation import full_precision

#: a chunk of interpolations holds at most about this many times the values of the model's logits
CHUNK_FACTOR = 4


def class_dims(logits_shape: tuple[int, ...], labels_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Where the classes can be in logits of ``logits_shape`` for per-position labels of ``labels_shape``: ``1``
    (segmentation: ``(b, c, H, W)`` for ``(b, H, W)``), ``-1`` (tokens: ``(b, T, c)`` for ``(b, T)``), both when the
    shapes cannot tell, none when they do not match."""
    if len(logits_shape) != len(labels_shape) + 1 or logits_shape[0] != labels_shape[0]:
        return ()
    return tuple(dim for dim, positions in ((1, logits_shape[2:]), (-1, logits_shape[1:-1]))
                 if tuple(positions) == tuple(labels_shape[1:]))


def resizable(logits_shape: tuple[int, ...], labels_shape: tuple[int, ...]) -> bool:
    """Whether ``(b, c, h, w)`` logits are of another size than ``(b, H, W)`` masks, which the loss may read resized."""
    return len(logits_shape) == 4 and len(labels_shape) == 3 and logits_shape[0] == labels_shape[0] and \
        tuple(logits_shape[2:]) != tuple(labels_shape[1:])


def resized(logits: Tensor, labels: Tensor) -> Tensor:
    """``(b, c, h, w)`` logits resized to the ``(b, H, W)`` labels' size as Hugging Face's segmentation models do
    before their loss (bilinear, corners not aligned): linear, so resizing commutes with mixing."""
    return F.interpolate(logits, size=tuple(labels.shape[1:]), mode="bilinear", align_corners=False)


def flatten_positions(logits: Tensor, labels: Tensor, class_dim: int) -> tuple[Tensor, Tensor]:
    """``(b, c, P)`` logits (a view where the layout allows) and ``(b, P)`` labels from per-position ones."""
    return logits.movedim(class_dim, 1).flatten(2), labels.flatten(1)


def chunk_size(batch: int, classes: int, positions: int, factor: int = CHUNK_FACTOR) -> int:
    """Interpolations per chunk: a chunk's mixed logits, targets, log-probabilities and residuals ``(k, c, P)`` hold
    at most ``factor`` times the ``b x c x P`` values of the logits (at least one interpolation)."""
    return max(1, factor * batch // 4)


class _PositionMixLoss(torch.autograd.Function):
    """The per-position MultiMix loss of ``(b, c, P)`` float32 logits, its gradient computed in the forward pass.

    The weights factor, ``w_ik[p] = lambda_ik m_i[p] / s_k[p]`` with ``s = lambda^T m``, so every mix is one matrix
    product over the batch: ``mixed = (lambda^T (m z)) / s``, and the gradient ``m (lambda ((p - t) / s))``.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor, weights: Tensor, ignore_index: Optional[int],
                label_smoothing: float, chunk: int) -> Tensor:
        batch, classes, positions = logits.shape
        keep = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
        mask = keep.to(logits.dtype)  # (b, P)
        masked = (logits * mask.unsqueeze(1)).reshape(batch, -1)  # (b, c P): ignored positions weigh nothing
        one_hot = torch.where(keep, labels, -1).unsqueeze(1) == torch.arange(classes, device=labels.device)[:, None]
        one_hot = one_hot.to(logits.dtype).view(batch, -1)
        total, count = logits.new_zeros(()), logits.new_zeros(())
        grad = torch.zeros_like(masked)
        for start in range(0, weights.shape[1], chunk):
            lam = weights[:, start:start + chunk].to(logits.dtype)  # (b, k)
            mass = lam.T @ mask  # (k, P): the weight kept at each position
            kept = mass > 0
            inverse = torch.where(kept, 1.0 / mass.clamp_min(torch.finfo(logits.dtype).tiny), 0.0).unsqueeze(1)
            mixed = (lam.T @ masked).view(-1, classes, positions).mul_(inverse)
            targets = (lam.T @ one_hot).view(-1, classes, positions).mul_(inverse)
            if label_smoothing:
                targets.mul_(1.0 - label_smoothing).add_(kept.unsqueeze(1), alpha=label_smoothing / classes)
            log_probs = torch.log_softmax(mixed, dim=1)
            total = total - (targets * log_probs).sum()  # targets are 0 where no example keeps a label
            count = count + kept.sum()
            residual = log_probs.exp_().sub_(targets).mul_(inverse)  # (softmax - targets) / s, 0 where not kept
            grad.addmm_(lam, residual.view(residual.shape[0], -1))
        count = count.clamp_min(1)
        ctx.save_for_backward(grad.view_as(logits).mul_(mask.unsqueeze(1)).div_(count))
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple:
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None, None


def position_multimix_loss(logits: Tensor, labels: Tensor, weights: Tensor, ignore_index: Optional[int] = None,
                           label_smoothing: float = 0.0, chunk: Optional[int] = None) -> Tensor:
    r"""The float32 per-position MultiMix loss of ``(m, c, P)`` logits and ``(m, P)`` integer labels, mixed by the
    columns of ``(m, n)`` weights; ``ignore_index`` positions are left out and the others renormalised. ``chunk``:
    interpolations per pass (default :func:`chunk_size`). Labels must lie in ``[0, c)`` or be ``ignore_index`` (not
    checked here: that would synchronise; the callback counts them).

    Example:
        >>> logits, labels = torch.zeros(2, 3, 4), torch.tensor([[0, 1, 2, -100], [0, 0, -100, -100]])
        >>> w = torch.tensor([[0.5], [0.5]])  # one interpolation, half of each
        >>> float(position_multimix_loss(logits, labels, w, ignore_index=-100))  # uniform prediction: log 3
        1.0986...
    """
    if logits.ndim != 3 or labels.shape != (logits.shape[0], logits.shape[2]) or weights.shape[0] != logits.shape[0]:
        raise ValueError(f"position_multimix_loss: expected logits (m, c, P), labels (m, P) and weights (m, n), got "
                         f"{tuple(logits.shape)}, {tuple(labels.shape)} and {tuple(weights.shape)}.")
    chunk = chunk or chunk_size(*logits.shape)
    with full_precision(logits):
        return _PositionMixLoss.apply(logits.float(), labels.long(), weights.detach().float(), ignore_index,
                                      float(label_smoothing), chunk)
