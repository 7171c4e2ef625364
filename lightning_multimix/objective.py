r"""The MultiMix objective from captured tensors (torch only, no Lightning).

:func:`multimix_objective` is what the :class:`~lightning_multimix.MultiMix` callback optimises on a batch mixed at
the last layer, and :func:`mixup_objective` what it optimises on a batch mixed in input space; a LightningModule
with manual optimization (or any training loop) calls the same functions::

    from lightning_multimix.objective import multimix_objective
    from lightning_multimix.sampling import dirichlet_weights

    weights = dirichlet_weights(len(labels), 1000, alpha=1.0, generator=generator, device=labels.device)
    loss = multimix_objective(weights, labels, logits=logits)  # logits of an affine head: exact, cheapest

Which path runs is said by what is given:

- ``logits`` ``(m, c)``: logit space. For an affine head ``g`` and columns of ``weights`` summing to one,
  ``g(Z Lambda) = g(Z) Lambda``: interpolating the ``m`` logit vectors gives the loss and gradients of the head on the
  interpolated embeddings, at ``n*m*c`` instead of ``n*m*d + n*d*c``.
- ``embeddings`` ``(m, d)`` and ``head``: embedding space, for any head: the head runs on the ``n`` interpolated
  embeddings.
- ``feature_map`` ``(m, r, d)`` and ``head``: Dense MultiMix (:mod:`lightning_multimix.dense`), in logit space when
  the head is affine (``affine_head``, by default: it is an ``nn.Linear``).

``teacher`` (:class:`TeacherOutputs`) adds self-distillation: the teacher's predictions enter the targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_multimix.dense import (
    attention_from_scores,
    class_scores,
    dense_multimix_loss,
    dense_weights,
    factorised_dense_logit_loss,
    masked_dense_weights,
    per_position,
    position_linear,
)
from lightning_multimix.interpolation import (
    interpolate,
    interpolate_columns,
    interpolate_labels_columns,
    mix_with_partner,
    one_hot,
)
from lightning_multimix.losses import soft_cross_entropy
from lightning_multimix.options import ATTENTION_KINDS, DISTILL_TARGETS

Head = Callable[[Tensor], Tensor]
_NO_INDEX = torch.iinfo(torch.int64).min  # an ignore index no label takes


@dataclass(frozen=True)
class TeacherOutputs:
    r"""What a teacher predicted for the batch, and how it enters the targets.

    Args:
        logits: ``(m, c)`` the teacher's logits on the batch.
        weight: ``beta``, the weight of the teacher's predictions in the targets.
        temperature: ``T`` of ``softmax(logits / T)``.
        targets: ``"probs"``: per-example targets ``(1 - beta) Y + beta softmax(logits / T)``, then interpolated;
            ``"logits"``: ``(1 - beta) Y Lambda + beta softmax(g_T(Z_T Lambda) / T)``, the teacher's prediction on
            its own interpolated embeddings: with ``embeddings`` and ``head`` the teacher's head runs on them,
            without, the teacher's logits are interpolated (exact for an affine head).
        embeddings: ``(m, d)`` the teacher's embeddings (``targets="logits"`` with a non-affine head).
        head: the teacher's head (with ``embeddings``).

    Example:
        >>> t = TeacherOutputs(logits=torch.zeros(2, 3), weight=0.5)
        >>> t.probs()
        tensor([[0.3333, 0.3333, 0.3333],
                [0.3333, 0.3333, 0.3333]])
    """

    logits: Tensor
    weight: float
    temperature: float = 1.0
    targets: Literal["probs", "logits"] = "probs"
    embeddings: Optional[Tensor] = None
    head: Optional[Head] = None

    def __post_init__(self) -> None:
        if self.targets not in DISTILL_TARGETS:
            raise ValueError(f"TeacherOutputs: targets={self.targets!r}; expected one of {DISTILL_TARGETS}.")
        if not 0.0 <= self.weight <= 1.0 or not self.temperature > 0:
            raise ValueError(f"TeacherOutputs: weight={self.weight!r} must lie in [0, 1] and "
                             f"temperature={self.temperature!r} be > 0.")
        if (self.embeddings is None) != (self.head is None):
            raise ValueError("TeacherOutputs: pass both `embeddings` and `head` (the teacher's head runs on its "
                             "interpolated embeddings), or neither (its logits are interpolated).")

    def probs(self, dim: int = -1, logits: Optional[Tensor] = None) -> Tensor:
        """``softmax(logits / T)`` in float32, without gradient (the teacher's own logits by default)."""
        logits = self.logits if logits is None else logits
        return torch.softmax(logits.detach().float() / self.temperature, dim=dim)


def multimix_objective(
    weights: Tensor,
    labels: Tensor,
    *,
    logits: Optional[Tensor] = None,
    embeddings: Optional[Tensor] = None,
    head: Optional[Head] = None,
    feature_map: Optional[Tensor] = None,
    attention: Literal["cam", "softmax", "uniform"] = "cam",
    position_mask: Optional[Tensor] = None,
    affine_head: Optional[bool] = None,
    teacher: Optional[TeacherOutputs] = None,
    keep: Optional[Tensor] = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    r"""The MultiMix loss of one batch: ``mean_k CE(g(Z lambda_k), Y lambda_k)`` over the ``n`` columns of ``weights``.

    Args:
        weights: ``(m, n)`` interpolation weights, columns on the simplex (:mod:`lightning_multimix.sampling`).
        labels: ``(m,)`` integer class labels.
        logits: ``(m, c)`` the head's outputs: logit space (exact for an affine head).
        embeddings: ``(m, d)`` the head's inputs, with ``head``: embedding space (any head).
        head: the classifier head, ``(N, d) -> (N, c)`` (embedding space and dense).
        feature_map: ``(m, r, d)`` the un-pooled features, with ``head``: Dense MultiMix.
        attention: dense: ``"cam"``, ``"softmax"`` or ``"uniform"`` (:func:`~lightning_multimix.dense.
            attention_from_scores`).
        position_mask: dense: ``(m, r)`` booleans, false at padding (a token attention mask): padding is never mixed
            and interpolated positions of padding only leave the loss.
        affine_head: dense: whether the head is affine, so that the per-position logits can be interpolated;
            ``None``: it is when it is an ``nn.Linear``.
        teacher: self-distillation targets (:class:`TeacherOutputs`).
        keep: ``(m,)`` booleans: the examples to mix; the others (labels equal to an ignore index) get weight 0 in
            every tuple, whose weights are renormalised over the kept examples (a tuple of left-out examples only
            becomes the mean of the kept ones). ``None``: all.
        label_smoothing: smoothing of the interpolated targets.

    Returns:
        The scalar loss, float32.

    Example:
        >>> head = torch.nn.Linear(4, 3)
        >>> z, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> w = torch.distributions.Dirichlet(torch.ones(5)).sample((100,)).T  # (m, n) = (5, 100)
        >>> logit_space = multimix_objective(w, y, logits=head(z))
        >>> embedding_space = multimix_objective(w, y, embeddings=z, head=head)
        >>> bool(torch.isclose(logit_space, embedding_space, atol=1e-5))
        True
    """
    _check_weights_and_labels(weights, labels)
    if keep is not None:
        weights = keep_rows(weights, keep)
    if feature_map is not None:
        if logits is not None or embeddings is not None or head is None:
            raise ValueError("multimix_objective: dense mode takes `feature_map` and `head`, not `logits` or "
                             "`embeddings`.")
        return _dense_objective(weights, labels, feature_map, head, attention, affine_head, teacher, label_smoothing,
                                position_mask)
    if attention != "cam" or affine_head is not None or position_mask is not None:
        raise ValueError("multimix_objective: `attention`, `position_mask` and `affine_head` apply to dense mode only "
                         "(pass `feature_map`).")
    if (logits is None) == (embeddings is None) or (embeddings is not None and head is None):
        raise ValueError("multimix_objective: pass `logits` (logit space) or `embeddings` and `head` (embedding "
                         "space), not both.")
    if logits is not None:
        _check_rows("logits", logits, labels)
        # class-major (c, n): CPU BLAS computes (c x m) @ (m x n) several times faster than (n x m) @ (m x c)
        mixed_logits = interpolate_columns(logits, weights)
        if teacher is None or teacher.targets == "logits":  # one-hot targets: summed by class, no product
            mixed_targets = interpolate_labels_columns(labels, logits.shape[-1], weights)
        else:
            mixed_targets = interpolate_columns(_targets(labels, logits.shape[-1], teacher), weights)
        class_dim = 0
    else:
        _check_rows("embeddings", embeddings, labels)
        mixed_logits = head(interpolate(embeddings, weights).to(embeddings.dtype))
        mixed_targets = interpolate(_targets(labels, mixed_logits.shape[-1], teacher), weights)
        class_dim = -1
    if teacher is not None and teacher.targets == "logits":
        with torch.no_grad():
            if teacher.embeddings is not None:
                mixed_teacher = teacher.head(interpolate(teacher.embeddings, weights).to(teacher.embeddings.dtype))
                mixed_teacher = mixed_teacher if class_dim == -1 else mixed_teacher.T
            else:
                mixed_teacher = interpolate_columns(teacher.logits, weights)
                mixed_teacher = mixed_teacher if class_dim == 0 else mixed_teacher.T
        beta = teacher.weight
        mixed_targets = (1.0 - beta) * mixed_targets + beta * teacher.probs(dim=class_dim, logits=mixed_teacher)
    return soft_cross_entropy(mixed_logits, mixed_targets, label_smoothing, dim=class_dim)


def mixup_objective(
    logits: Tensor,
    labels: Tensor,
    lam: Tensor,
    partner: Tensor,
    *,
    teacher: Optional[TeacherOutputs] = None,
    keep: Optional[Tensor] = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    r"""The input-mixup loss of one batch: the logits of the mixed inputs ``lam x + (1 - lam) x[partner]`` against
    ``lam Y + (1 - lam) Y[partner]``; with ``teacher`` (its logits on the same mixed inputs),
    ``(1 - beta)`` of that plus ``beta softmax(teacher_logits / T)``. With ``keep`` (``(b,)`` booleans), a mixed
    example whose own or partner's label is left out does not count (the mean runs over the others).

    Example:
        >>> logits, labels = torch.zeros(2, 2), torch.tensor([0, 1])
        >>> mixup_objective(logits, labels, torch.tensor(0.3), torch.tensor([1, 0]))  # uniform prediction: log 2
        tensor(0.6931)
    """
    if logits.ndim != 2:
        raise ValueError(f"mixup_objective: `logits` must be (b, c), got {tuple(logits.shape)}.")
    _check_rows("logits", logits, labels)
    if teacher is None and keep is None and logits.device.type == "cpu":
        # the soft cross-entropy is linear in the targets: lam CE(y) + (1 - lam) CE(y[partner]) is the loss of the
        # mixed one-hot targets, in five operations instead of eleven (0.26 -> 0.12 ms inside a training step here:
        # benchmarks/results/step_profile_before_after/). CPU only: a label outside [0, c) (the ignore index
        # included: no index is ignored) raises IndexError there, and the one-hot way below gives it no class; on a
        # GPU it would be a device-side assert.
        try:
            logits, labels = logits.float(), labels.long()
            own = F.cross_entropy(logits, labels, ignore_index=_NO_INDEX, label_smoothing=label_smoothing)
            partners = F.cross_entropy(logits, labels.index_select(0, partner), ignore_index=_NO_INDEX,
                                       label_smoothing=label_smoothing)
            return torch.lerp(partners, own, lam.to(own.dtype))
        except IndexError:
            pass
    targets = mix_with_partner(one_hot(labels, logits.shape[-1]), lam.float(), partner)
    if teacher is not None:
        targets = (1.0 - teacher.weight) * targets + teacher.weight * teacher.probs()
    if keep is None:
        return soft_cross_entropy(logits, targets, label_smoothing)
    counts = (keep & keep[partner]).float()
    per_example = F.cross_entropy(logits.float(), targets, reduction="none", label_smoothing=label_smoothing)
    return (per_example * counts).sum() / counts.sum().clamp_min(1.0)  # nothing kept: 0, as multimix_objective


# ---------------------------------------------------------------------------------------------------- helpers


def keep_rows(weights: Tensor, keep: Tensor) -> Tensor:
    """``weights`` with the rows of left-out examples zeroed and every column renormalised over the kept ones; a
    column with no kept example becomes uniform over the kept ones. No host synchronisation.

    Example:
        >>> keep_rows(torch.tensor([[0.5, 0.0], [0.25, 0.0], [0.25, 1.0]]), torch.tensor([True, True, False]))
        tensor([[0.6667, 0.5000],
                [0.3333, 0.5000],
                [0.0000, 0.0000]])
    """
    mask = keep.to(weights.dtype).unsqueeze(1)
    kept = weights * mask
    total = kept.sum(0, keepdim=True)
    uniform = mask / mask.sum().clamp_min(1.0)
    return torch.where(total > 0, kept / total.clamp_min(torch.finfo(weights.dtype).tiny), uniform)


def _targets(labels: Tensor, num_classes: int, teacher: Optional[TeacherOutputs]) -> Tensor:
    """Per-example targets ``(m, c)``: one-hot, or with ``"probs"`` distillation mixed with the teacher's."""
    targets = one_hot(labels, num_classes)
    if teacher is not None and teacher.targets == "probs":
        targets = (1.0 - teacher.weight) * targets + teacher.weight * teacher.probs()
    return targets


def _dense_objective(weights: Tensor, labels: Tensor, features: Tensor, head: Head, attention: str,
                     affine_head: Optional[bool], teacher: Optional[TeacherOutputs], label_smoothing: float,
                     mask: Optional[Tensor]) -> Tensor:
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"multimix_objective: attention={attention!r}; expected one of {ATTENTION_KINDS}.")
    if features.ndim != 3:
        raise ValueError(f"multimix_objective: `feature_map` must be (m, r, d), got {tuple(features.shape)}.")
    if teacher is not None and teacher.targets != "probs":
        raise ValueError("Dense MultiMix takes teacher targets='probs' only: the teacher's per-example predictions "
                         "are the targets every position inherits.")
    _check_rows("feature_map", features, labels)
    linear = isinstance(head, nn.Linear)
    affine = linear if affine_head is None else affine_head
    if not (linear and affine):  # read more than once, by products that would each copy a transposed (CNN) map
        features = features.contiguous()
    position_logits = None
    if affine:  # the head at every position of the real examples, needed anyway: the class scores come from it
        position_logits = position_linear(features, head.weight, head.bias) if linear else \
            per_position(head, features)
    with torch.no_grad():
        readable = labels.clamp_min(0)  # a left-out example (ignore index) has weight 0: any class's scores do
        own_class = readable.view(-1, 1, 1).expand(-1, features.shape[1], 1)
        if linear and position_logits is not None:  # F_ij . W[y_i]: the logit without its bias, as in CAM
            scores = position_logits.detach().float().gather(-1, own_class)[..., 0]
            scores = scores - head.bias[readable, None].float() if head.bias is not None else scores
        elif linear:
            scores = class_scores(features, head.weight, readable)
        else:
            logits_here = position_logits if position_logits is not None else per_position(head, features)
            scores = logits_here.detach().float().gather(-1, own_class)[..., 0]
        num_classes = head.out_features if linear else logits_here.shape[-1]
        weights_per_position = attention_from_scores(scores, attention, mask)
    targets = _targets(labels, num_classes, teacher)
    if position_logits is not None:  # one-hot targets go as labels: summed by class, cheaper
        return factorised_dense_logit_loss(position_logits, labels if teacher is None else targets, weights,
                                           weights_per_position, label_smoothing, mask)
    if mask is None:
        return dense_multimix_loss(features, targets, dense_weights(weights, weights_per_position), head,
                                   label_smoothing)
    per_position_weights, valid = masked_dense_weights(weights, weights_per_position, mask)
    return dense_multimix_loss(features, targets, per_position_weights, head, label_smoothing, valid)


def _check_weights_and_labels(weights: Tensor, labels: Tensor) -> None:
    if weights.ndim != 2:
        raise ValueError(f"multimix_objective: `weights` must be (m, n), got {tuple(weights.shape)}.")
    if labels.ndim != 1 or labels.is_floating_point() or labels.shape[0] != weights.shape[0]:
        raise ValueError(f"multimix_objective: `labels` must be ({weights.shape[0]},) integers, one per row of "
                         f"`weights`, got {labels.dtype} {tuple(labels.shape)}.")


def _check_rows(name: str, values: Tensor, labels: Tensor) -> None:
    if values.shape[0] != labels.shape[0]:
        raise ValueError(f"`{name}` has {values.shape[0]} rows but there are {labels.shape[0]} labels.")
