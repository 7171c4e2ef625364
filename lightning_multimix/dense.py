r"""Dense MultiMix: interpolation at every spatial position (or token) of a feature map, weighted by attention.

Layout: a feature map is ``(m, r, d)``: ``m`` examples, ``r = h * w`` positions (or tokens), ``d`` channels.

For the ``k``-th interpolated example and position ``j`` the weight of example ``i`` is
``w_ikj = lambda_ik * a_ij / sum_i' lambda_i'k * a_i'j``: the MultiMix weight times the example's attention at that
position, l1-normalised over the examples. Embeddings and targets are interpolated with these weights (each position
inherits its example's label), the head is applied at every position, and the soft cross-entropy is averaged over all
``n * r`` terms.

Attention kinds (``scores`` are the class activations of each example's own label, ``s_ij = F_ij . W[y_i]`` for a
linear head ``W`` (the bias left out, as in CAM); for any other head, the head's logit of ``y_i`` at position ``j``,
``s_ij = g(F_ij)[y_i]``):

- ``"cam"`` (default): ``a_ij = relu(s_ij) / sum_j' relu(s_ij')``. It is the class activation map: positions that
  carry evidence for the example's own class dominate, positions that argue against it get no weight, so the
  interpolated position is made of the examples whose object is really there.
- ``"softmax"``: ``a_ij = softmax_j(s_ij)``: smoother, never exactly zero.
- ``"uniform"``: ``a_ij = 1 / r``: plain per-position MultiMix.

An example whose ``cam`` attention is zero at every position falls back to uniform; a position where every example
with a non-zero MultiMix weight has zero attention falls back to the plain MultiMix weights. Nothing divides by zero.
Attention is a weighting, not a path for gradients: it is computed without gradient (our choice).

No ``m*n*r*d`` (or ``m*n*r*c``) tensor is ever formed: each product contracts over the ``m`` examples with ``r`` as a
batch dimension. The interpolations run in float32 with autocast turned off, so that under mixed precision the weights
keep summing to one; the head itself runs in the training precision.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
from torch import Tensor

from lightning_multimix.interpolation import full_precision
from lightning_multimix.losses import soft_cross_entropy

AttentionKind = Literal["cam", "softmax", "uniform"]
#: what an attention of exactly zero becomes (:func:`floored_attention`, see :func:`factorised_dense_logit_loss`): far
#: below the last bit of usual non-zero attentions in float32, far above the smallest normal float even multiplied by
#: a weight and a logit
ATTENTION_FLOOR = 1e-20
ATTENTION_KINDS = ("cam", "softmax", "uniform")


def attention_from_scores(scores: Tensor, kind: AttentionKind = "cam", mask: Optional[Tensor] = None) -> Tensor:
    """Per-example attention over positions, ``(m, r)`` rows on the simplex, from class activations ``(m, r)``;
    positions where ``mask`` (``(m, r)`` booleans, e.g. a token attention mask) is false get none.

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
        >>> features = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # 1 example, 2 positions, 2 channels
        >>> class_scores(features, torch.tensor([[3.0, -1.0]]), torch.tensor([0]))
        tensor([[ 3., -1.]])
    """
    with full_precision(features):
        return torch.einsum("mrd,md->mr", features.float(), class_weights[labels].float())


def dense_weights(weights: Tensor, attention: Tensor) -> Tensor:
    """Per-position interpolation weights ``(m, n, r)`` from MultiMix weights ``(m, n)`` and attention ``(m, r)``.

    For every tuple ``k`` and position ``j`` the column ``[:, k, j]`` lies on the simplex.

    Example:
        >>> w = dense_weights(torch.tensor([[0.5], [0.5]]), torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
        >>> w[:, 0, :]
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
        >>> values = torch.tensor([[[1.0], [1.0]], [[3.0], [3.0]]])
        >>> dense_interpolate(values, torch.tensor([[[0.5, 1.0]], [[0.5, 0.0]]]))
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
    """The head on every position: ``(..., r, d)`` to ``(..., r, c)``, through the head's own ``(N, d) -> (N, c)``
    contract (a head with batch norm, or anything else that wants 2-d input, works).

    Example:
        >>> head = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
        >>> per_position(head, torch.randn(5, 6, 3)).shape
        torch.Size([5, 6, 2])
    """
    out = head(values.reshape(-1, values.shape[-1]))
    return out.reshape(*values.shape[:-1], out.shape[-1])


def position_linear(features: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(features, weight, bias)``: a linear head's logits at every position of an ``(m, r, d)`` feature map,
    ``(m, r, c)``.

    Computed class-major, one ``(c x d) @ (d x r)`` product per example (a batched product), and returned as the
    ``(m, r, c)`` view of the ``(m, c, r)`` result: a CNN's feature map, which lies in memory as ``(m, d, r)`` and
    reaches here as a transposed view, is read where it lies, with no transposing copy forward or backward.

    Example:
        >>> features, head = torch.randn(2, 5, 3), torch.nn.Linear(3, 4)
        >>> torch.allclose(position_linear(features, head.weight, head.bias), head(features), atol=1e-6)
        True
    """
    expanded = weight.unsqueeze(0).expand(features.shape[0], *weight.shape)
    columns = features.transpose(1, 2)  # (m, d, r): a CNN feature map's own layout
    product = torch.bmm(expanded, columns) if bias is None else torch.baddbmm(bias.view(1, -1, 1), expanded, columns)
    return product.transpose(1, 2)


def dense_multimix_logit_loss(
    position_logits: Tensor, targets: Tensor, weights: Tensor, label_smoothing: float = 0.0
) -> Tensor:
    """Dense MultiMix loss from the head's logits at every position of the ``m`` real examples, ``(m, r, c)``.

    Exact for an affine head (the weights sum to one at every ``(k, j)``): equal in value and gradient to
    :func:`dense_multimix_loss`, without the ``(n, r, d)`` mixed feature map.

    Example:
        >>> logits, targets = torch.zeros(2, 4, 3), torch.eye(3)[:2]
        >>> w = dense_weights(torch.full((2, 5), 0.5), torch.full((2, 4), 0.25))
        >>> dense_multimix_logit_loss(logits, targets, w)  # uniform logits: log 3
        tensor(1.0986)
    """
    mixed_logits = dense_interpolate(position_logits, weights)
    return soft_cross_entropy(mixed_logits, dense_interpolate_targets(targets, weights), label_smoothing)


def floored_attention(attention: Tensor, dtype: torch.dtype) -> Tensor:
    """``attention`` in ``dtype`` with every exact zero replaced by :data:`ATTENTION_FLOOR`: where no example of a
    tuple has attention at a position, the normalised weights become the plain ``lambda`` there, and no other weight
    changes (the positive attentions are left as they are).

    Example:
        >>> floored_attention(torch.tensor([0.0, 0.5]), torch.float32)
        tensor([1.0000e-20, 5.0000e-01])
    """
    a = attention.to(dtype)
    return torch.where(a > 0, a, ATTENTION_FLOOR)


def factorised_dense_logit_loss(
    position_logits: Tensor, targets: Tensor, weights: Tensor, attention: Tensor, label_smoothing: float = 0.0,
    mask: Optional[Tensor] = None,
) -> Tensor:
    r"""Dense MultiMix loss in logit space without the ``(m, n, r)`` per-position weights.

    Equal in value and gradient (to float32 rounding) to ``dense_multimix_logit_loss(position_logits, targets,
    dense_weights(weights, attention))``. With ``D = Lambda^T A`` (the normaliser of :func:`dense_weights`),
    ``sum_i w_ikj v_ij = (sum_i lambda_ik a_ij v_ij) / D_kj``: products ``(r*c x m) @ (m x n)`` of the
    attention-weighted logits and targets, then a division. An attention of exactly zero becomes
    :data:`ATTENTION_FLOOR`, which gives the plain weights ``lambda`` where no example of a tuple has attention (the
    fallback of :func:`dense_weights`) and changes no other weight in float32.

    Args:
        position_logits: ``(m, r, c)`` the head's logits at every position of the ``m`` real examples.
        targets: ``(m, c)`` per-example targets (each position inherits its example's).
        weights: ``(m, n)`` MultiMix weights.
        attention: ``(m, r)`` non-negative attention (no gradient flows through it).
        mask: ``(m, r)`` booleans, false at padding: a padded position is never mixed, and an interpolated position
            made of padding only leaves the loss (the mean runs over the others).

    Example:
        >>> logits, targets = torch.randn(3, 4, 2), torch.eye(2)[[0, 1, 1]]
        >>> weights, attention = torch.full((3, 5), 1 / 3), torch.rand(3, 4)
        >>> attention[:, 0] = 0.0  # no example has attention at position 0: the plain weights there
        >>> reference = dense_multimix_logit_loss(logits, targets, dense_weights(weights, attention))
        >>> torch.allclose(factorised_dense_logit_loss(logits, targets, weights, attention), reference)
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
    if mask is None:
        return soft_cross_entropy(mixed_logits, mixed_targets, label_smoothing, dim=1)
    return masked_soft_cross_entropy(mixed_logits, mixed_targets, valid.squeeze(1), label_smoothing, dim=1)


def dense_multimix_loss(
    features: Tensor,
    targets: Tensor,
    weights: Tensor,
    head: Callable[[Tensor], Tensor],
    label_smoothing: float = 0.0,
    valid: Optional[Tensor] = None,
) -> Tensor:
    """Dense MultiMix loss in embedding space: the head on the ``(n, r, d)`` mixed feature map, as ``n * r`` rows of
    ``d`` (see :func:`per_position`). Valid for any head.

    Example:
        >>> head = torch.nn.Linear(3, 2)
        >>> features, targets = torch.randn(2, 4, 3), torch.eye(2)
        >>> w = dense_weights(torch.full((2, 5), 0.5), torch.rand(2, 4))
        >>> a = dense_multimix_loss(features, targets, w, head)
        >>> b = dense_multimix_logit_loss(head(features), targets, w)
        >>> torch.allclose(a, b, atol=1e-6)
        True
    """
    mixed = dense_interpolate(features, weights).to(features.dtype)
    mixed_logits = per_position(head, mixed)
    mixed_targets = dense_interpolate_targets(targets, weights)
    if valid is None:
        return soft_cross_entropy(mixed_logits, mixed_targets, label_smoothing)
    return masked_soft_cross_entropy(mixed_logits, mixed_targets, valid, label_smoothing)


def masked_dense_weights(weights: Tensor, attention: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`dense_weights` for a feature map with padding: ``(m, n, r)`` weights that give padding none, and the
    ``(n, r)`` booleans of the interpolated positions made of something else than padding (the others are dropped).

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


def masked_soft_cross_entropy(logits: Tensor, targets: Tensor, valid: Tensor, label_smoothing: float = 0.0,
                              dim: int = -1) -> Tensor:
    """:func:`~lightning_multimix.losses.soft_cross_entropy` averaged over the entries where ``valid`` (the shape
    of ``logits`` without the class dimension) is true only.

    Example:
        >>> logits, targets = torch.zeros(2, 3), torch.eye(3)[:2]
        >>> masked_soft_cross_entropy(logits, targets, torch.tensor([True, False]))  # log 3, over one row
        tensor(1.0986)
    """
    dim = dim % logits.ndim
    moved = (lambda t: t.movedim(dim, -1).reshape(-1, t.shape[dim]))  # noqa: E731 - rows of classes
    per_entry = torch.nn.functional.cross_entropy(moved(logits.float()), moved(targets.float()), reduction="none",
                                                  label_smoothing=label_smoothing)
    keep = valid.reshape(-1).to(per_entry.dtype)
    return (per_entry * keep).sum() / keep.sum().clamp_min(1.0)
