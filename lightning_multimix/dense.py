r"""Dense MultiMix: at position ``j`` of mixed example ``k``, example ``i`` weighs ``lambda_ik a_ij / sum_i' lambda_i'k
a_i'j`` (``a``: attention) and lends its target; interpolations run in float32, the head in the training precision."""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_multimix.interpolation import full_precision
from lightning_multimix.options import ATTENTION_KINDS

AttentionKind = Literal["cam", "softmax", "uniform"]
#: what an attention of exactly zero becomes: below float32's resolution of real attentions, far above underflow
ATTENTION_FLOOR = 1e-20


def attention_from_scores(scores: Tensor, kind: AttentionKind = "cam", mask: Optional[Tensor] = None) -> Tensor:
    """Attention ``(m, r)``, rows on the simplex, from scores ``s`` ``(m, r)``, no gradient: ``"cam"``: ``relu(s)``
    normalised (uniform if none is positive); ``"softmax"``; ``"uniform"``. False ``mask`` positions get none."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"Unknown attention {kind!r}: expected one of {ATTENTION_KINDS}.")
    scores = scores.detach().float()
    valid = torch.ones_like(scores) if mask is None else mask.to(scores.dtype)
    if kind == "softmax":
        return torch.softmax(scores.masked_fill(valid == 0, float("-inf")), dim=-1).nan_to_num_(0.0)
    uniform = valid / valid.sum(-1, keepdim=True).clamp_min(1.0)
    if kind == "uniform":
        return uniform
    activation = scores.clamp_min(0) * valid
    total = activation.sum(-1, keepdim=True)
    return torch.where(total > 0, activation / total.clamp_min(torch.finfo(total.dtype).tiny), uniform)


def class_scores(features: Tensor, class_weights: Tensor, labels: Tensor) -> Tensor:
    """Class activation of each example's own label at each position: ``s_ij = F_ij . W[y_i]``, shape ``(m, r)``; for
    ``(m, c)`` soft targets ``t_i``, the target-weighted ``F_ij . W^T t_i``."""
    with full_precision(features):
        own = labels.float() @ class_weights.float() if labels.is_floating_point() else class_weights[labels].float()
        return torch.einsum("mrd,md->mr", features.float(), own)


def _floored(attention: Tensor, dtype: torch.dtype, mask: Optional[Tensor]) -> Tensor:
    """``attention`` in ``dtype``, exact zeros raised to :data:`ATTENTION_FLOOR`, zero where ``mask`` is false."""
    a = attention.to(dtype)
    a = torch.where(a > 0, a, ATTENTION_FLOOR)
    return a if mask is None else a * mask.to(dtype)


def dense_weights(weights: Tensor, attention: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Per-position weights ``(m, n, r)`` from weights ``(m, n)`` and attention ``(m, r)``: the plain weights where
    none attends; none to padding (``mask`` ``(m, r)`` false), a mixed position of padding only is all zero."""
    raw = weights.unsqueeze(-1) * _floored(attention, weights.dtype, mask).unsqueeze(1)
    return raw / raw.sum(0, keepdim=True).clamp_min(torch.finfo(raw.dtype).tiny)


def dense_interpolate(values: Tensor, weights: Tensor) -> Tensor:
    """Interpolate per-position values ``(m, r, f)`` with per-position weights ``(m, n, r)`` into ``(n, r, f)``."""
    with full_precision(values):
        return torch.einsum("mnr,mrf->nrf", weights, values.to(weights.dtype))


def per_position(head: Callable[[Tensor], Tensor], values: Tensor) -> Tensor:
    """The head on every position, ``(..., r, d) -> (..., r, c)``, fed ``(N, d)`` rows (so a batch-norm head works)."""
    out = head(values.reshape(-1, values.shape[-1]))
    return out.reshape(*values.shape[:-1], out.shape[-1])


def position_linear(features: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(features, weight, bias)``, ``(m, r, d) -> (m, r, c)``, never copying a CNN map (``(m, d, r)``)."""
    expanded = weight.unsqueeze(0).expand(features.shape[0], *weight.shape)
    columns = features.transpose(1, 2)  # (m, d, r): a CNN feature map's own layout
    product = torch.bmm(expanded, columns) if bias is None else torch.baddbmm(bias.view(1, -1, 1), expanded, columns)
    return product.transpose(1, 2)


def factorised_dense_logit_loss(position_logits: Tensor, targets: Tensor, weights: Tensor, attention: Tensor,
                                mask: Optional[Tensor] = None, loss: str = "cross_entropy") -> Tensor:
    r"""The dense loss of per-position logits ``(m, r, c)`` with ``dense_weights(weights, attention, mask)``, without
    forming them: for an affine head, equal to :func:`dense_multimix_loss`. ``attention`` ``(m, r)`` gets no gradient.
    ``mask`` ``(m, r)``, false at padding: never mixed, and mixed positions of padding only leave the loss."""
    m, dtype = position_logits.shape[0], weights.dtype

    def mix(values: Tensor) -> Tensor:  # (m, r or 1, f) -> (r or 1, f, n), class-major
        return (values.reshape(m, -1).T @ weights).view(values.shape[1], values.shape[2], -1)

    with full_precision(position_logits):
        a = _floored(attention.detach(), dtype, mask).unsqueeze(-1)  # (m, r, 1)
        with torch.no_grad():
            denominator = mix(a)  # (r, 1, n), positive wherever a column has a positive weight (and no mask is 0)
            valid = None if mask is None else denominator[:, 0] > 0
            if mask is not None:
                denominator = denominator.clamp_min(torch.finfo(dtype).tiny)
            mixed_targets = mix(a * targets.to(dtype).unsqueeze(1)).div_(denominator)
        mixed_logits = mix(a * position_logits.to(dtype)) / denominator
    return soft_cross_entropy(mixed_logits, mixed_targets, dim=1, valid=valid, loss=loss)


def dense_multimix_loss(features: Tensor, targets: Tensor, weights: Tensor, head: Callable[[Tensor], Tensor],
                        valid: Optional[Tensor] = None, loss: str = "cross_entropy") -> Tensor:
    """Dense MultiMix loss for any head, run on the ``(n, r, d)`` mixed map with per-position weights ``(m, n, r)``
    (the targets ``(m, c)`` hold at every position); ``valid`` ``(n, r)``: the positions to average."""
    mixed_logits = per_position(head, dense_interpolate(features, weights).to(features.dtype))
    every_position = targets.unsqueeze(1).expand(-1, weights.shape[-1], -1)
    return soft_cross_entropy(mixed_logits, dense_interpolate(every_position, weights), valid=valid, loss=loss)


def soft_cross_entropy(logits: Tensor, targets: Tensor, dim: int = -1, valid: Optional[Tensor] = None,
                       loss: str = "cross_entropy") -> Tensor:
    r"""Float32 mean of ``-sum_c t_c log softmax(logits)_c`` over every entry but the class dimension ``dim``
    (``dim=0``: class-major), or over those where ``valid`` (``logits``' shape without ``dim``) is true;
    ``loss="bce"``: of ``binary_cross_entropy_with_logits`` averaged over the classes."""
    if logits.shape != targets.shape:
        raise ValueError(f"`logits` {tuple(logits.shape)} and `targets` {tuple(targets.shape)} must have the same "
                         "shape.")
    dim = dim % logits.ndim
    logits, targets = logits.float(), targets.float()
    if dim == logits.ndim - 1:  # rows of classes: (N, ..., c) -> (N * ..., c), a free view when contiguous
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, targets.shape[-1])
    elif dim == 0:  # class-major (c, ...): one "batch" whose classes lie along dimension 1
        logits, targets = logits.unsqueeze(0), targets.unsqueeze(0)
    elif dim != 1:
        logits, targets = logits.movedim(dim, 1), targets.movedim(dim, 1)
    if loss == "bce":  # elementwise: the mean over every entry and class, or per entry over the classes
        if valid is None:
            return F.binary_cross_entropy_with_logits(logits, targets)
        per_entry = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).reshape(-1)
    elif valid is None:
        return F.cross_entropy(logits, targets)
    else:
        per_entry = F.cross_entropy(logits, targets, reduction="none").reshape(-1)
    keep = valid.reshape(-1).to(per_entry.dtype)
    return (per_entry * keep).sum() / keep.sum().clamp_min(1.0)
