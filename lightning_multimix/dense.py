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
    normalised (uniform if none is positive); ``"softmax"``; ``"uniform"``. False ``mask`` positions get none.

    Example:
        >>> attention_from_scores(torch.tensor([[2.0, -1.0, 0.0, 2.0], [-1.0, -1.0, -1.0, -1.0]]))
        tensor([[0.5000, 0.0000, 0.0000, 0.5000],
                [0.2500, 0.2500, 0.2500, 0.2500]])
    """
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
    """Class activation of each example's own label at each position: ``s_ij = F_ij . W[y_i]``, shape ``(m, r)``.

    Example:
        >>> class_scores(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[3.0, -1.0]]), torch.tensor([0]))
        tensor([[ 3., -1.]])
    """
    with full_precision(features):
        return torch.einsum("mrd,md->mr", features.float(), class_weights[labels].float())


def dense_weights(weights: Tensor, attention: Tensor) -> Tensor:
    """Per-position weights ``(m, n, r)`` from weights ``(m, n)`` and attention ``(m, r)``; plain where none attends.

    Example:
        >>> dense_weights(torch.tensor([[0.5], [0.5]]), torch.tensor([[0.75, 0.25], [0.25, 0.75]]))[:, 0]
        tensor([[0.7500, 0.2500],
                [0.2500, 0.7500]])
    """
    raw = weights.unsqueeze(-1) * attention.to(weights.dtype).unsqueeze(1)
    total = raw.sum(0, keepdim=True)
    fallback = weights.unsqueeze(-1).expand_as(raw)
    return torch.where(total > 0, raw / total.clamp_min(torch.finfo(raw.dtype).tiny), fallback)


def dense_interpolate(values: Tensor, weights: Tensor) -> Tensor:
    """Interpolate per-position values ``(m, r, f)`` with per-position weights ``(m, n, r)`` into ``(n, r, f)``.

    Example:
        >>> dense_interpolate(torch.tensor([[[1.], [1.]], [[3.], [3.]]]), torch.tensor([[[0.5, 1.]], [[0.5, 0.]]]))
        tensor([[[2.],
                 [1.]]])
    """
    with full_precision(values):
        return torch.einsum("mnr,mrf->nrf", weights, values.to(weights.dtype))


def dense_interpolate_targets(targets: Tensor, weights: Tensor) -> Tensor:
    """Interpolate per-example targets ``(m, c)`` (each position inherits its example's) into ``(n, r, c)``.

    Example:
        >>> dense_interpolate_targets(torch.eye(2), torch.tensor([[[0.25, 1.0]], [[0.75, 0.0]]]))
        tensor([[[0.2500, 0.7500],
                 [1.0000, 0.0000]]])
    """
    with full_precision(targets):
        return torch.einsum("mnr,mc->nrc", weights, targets.to(weights.dtype))


def per_position(head: Callable[[Tensor], Tensor], values: Tensor) -> Tensor:
    """The head on every position, ``(..., r, d) -> (..., r, c)``, fed ``(N, d)`` rows (so a batch-norm head works).

    Example:
        >>> head = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
        >>> per_position(head, torch.randn(5, 6, 3)).shape
        torch.Size([5, 6, 2])
    """
    out = head(values.reshape(-1, values.shape[-1]))
    return out.reshape(*values.shape[:-1], out.shape[-1])


def position_linear(features: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(features, weight, bias)``, ``(m, r, d) -> (m, r, c)``, never copying a CNN map (``(m, d, r)``).

    Example:
        >>> features, head = torch.randn(2, 5, 3), torch.nn.Linear(3, 4)
        >>> torch.allclose(position_linear(features, head.weight, head.bias), head(features), atol=1e-6)
        True
    """
    expanded = weight.unsqueeze(0).expand(features.shape[0], *weight.shape)
    columns = features.transpose(1, 2)  # (m, d, r): a CNN feature map's own layout
    product = torch.bmm(expanded, columns) if bias is None else torch.baddbmm(bias.view(1, -1, 1), expanded, columns)
    return product.transpose(1, 2)


def floored_attention(attention: Tensor, dtype: torch.dtype) -> Tensor:
    """``attention`` in ``dtype``, exact zeros set to :data:`ATTENTION_FLOOR` (plain weights where none attends).

    Example:
        >>> floored_attention(torch.tensor([0.0, 0.5]), torch.float32)
        tensor([1.0000e-20, 5.0000e-01])
    """
    a = attention.to(dtype)
    return torch.where(a > 0, a, ATTENTION_FLOOR)


def factorised_dense_logit_loss(
    position_logits: Tensor, targets: Tensor, weights: Tensor, attention: Tensor, mask: Optional[Tensor] = None,
) -> Tensor:
    r"""The dense loss of per-position logits ``(m, r, c)`` with ``dense_weights(weights, attention)``, without forming
    the ``(m, n, r)`` weights: for an affine head, equal to :func:`dense_multimix_loss`. ``attention`` ``(m, r)`` gets
    no gradient. ``mask`` ``(m, r)``, false at padding: padding is never mixed, and interpolated positions of padding
    only leave the loss.

    Example:
        >>> head, features, targets = torch.nn.Linear(2, 3), torch.randn(3, 4, 2), torch.eye(3)
        >>> weights, attention = torch.full((3, 5), 1 / 3), torch.rand(3, 4)
        >>> attention[:, 0] = 0.0  # no example has attention at position 0: the plain weights there
        >>> reference = dense_multimix_loss(features, targets, dense_weights(weights, attention), head)
        >>> torch.allclose(factorised_dense_logit_loss(head(features), targets, weights, attention), reference)
        True
    """
    m = position_logits.shape[0]
    dtype = weights.dtype

    def mix(values: Tensor) -> Tensor:  # (m, r or 1, f) -> (r or 1, f, n), class-major
        return (values.reshape(m, -1).T @ weights).view(values.shape[1], values.shape[2], -1)

    with full_precision(position_logits):
        a = floored_attention(attention.detach(), dtype)
        a = (a if mask is None else a * mask.to(dtype)).unsqueeze(-1)  # (m, r, 1)
        logits = position_logits.to(dtype)
        with torch.no_grad():
            denominator = mix(a)  # (r, 1, n), positive wherever a column has a positive weight (and no mask is 0)
            if mask is not None:
                valid = denominator > 0
                denominator = denominator.clamp_min(torch.finfo(dtype).tiny)
            mixed_targets = mix(a * targets.to(dtype).unsqueeze(1)).div_(denominator)
        mixed_logits = mix(a * logits) / denominator
    return soft_cross_entropy(mixed_logits, mixed_targets, dim=1, valid=valid.squeeze(1) if mask is not None else None)


def dense_multimix_loss(
    features: Tensor,
    targets: Tensor,
    weights: Tensor,
    head: Callable[[Tensor], Tensor],
    valid: Optional[Tensor] = None,
) -> Tensor:
    """Dense MultiMix loss for any head, run on the ``(n, r, d)`` mixed map with per-position weights ``(m, n, r)``;
    ``valid`` ``(n, r)``: the positions to average.

    Example:
        >>> head, features, targets = torch.nn.Linear(3, 2), torch.zeros(2, 4, 3), torch.eye(2)
        >>> _ = torch.nn.init.zeros_(head.bias)
        >>> dense_multimix_loss(features, targets, dense_weights(torch.full((2, 5), 0.5), torch.rand(2, 4)), head)
        tensor(0.6931)
    """
    mixed_logits = per_position(head, dense_interpolate(features, weights).to(features.dtype))
    return soft_cross_entropy(mixed_logits, dense_interpolate_targets(targets, weights), valid=valid)


def masked_dense_weights(weights: Tensor, attention: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`dense_weights` giving padding (``mask`` false) none, and the ``(n, r)`` mixed positions not all padding.

    Example:
        >>> w, valid = masked_dense_weights(torch.tensor([[0.5], [0.5]]), torch.full((2, 2), 0.5),
        ...                                 torch.tensor([[True, False], [True, False]]))
        >>> w[:, 0, 0], valid
        (tensor([0.5000, 0.5000]), tensor([[ True, False]]))
    """
    a = floored_attention(attention, weights.dtype) * mask.to(weights.dtype)
    raw = weights.unsqueeze(-1) * a.unsqueeze(1)
    total = raw.sum(0, keepdim=True)
    return raw / total.clamp_min(torch.finfo(raw.dtype).tiny), total[0] > 0


def soft_cross_entropy(logits: Tensor, targets: Tensor, dim: int = -1, valid: Optional[Tensor] = None) -> Tensor:
    r"""Float32 mean of ``-sum_c t_c log softmax(logits)_c`` over every entry but the class dimension ``dim``
    (``dim=0``: class-major), or over those where ``valid`` (``logits``' shape without ``dim``) is true.

    Example:
        >>> soft_cross_entropy(torch.zeros(2, 3), torch.eye(3)[:2], valid=torch.tensor([True, False]))  # log 3
        tensor(1.0986)
    """
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
    if valid is None:
        return F.cross_entropy(logits, targets)
    per_entry = F.cross_entropy(logits, targets, reduction="none").reshape(-1)
    keep = valid.reshape(-1).to(per_entry.dtype)
    return (per_entry * keep).sum() / keep.sum().clamp_min(1.0)
