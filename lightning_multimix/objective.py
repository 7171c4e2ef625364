r"""The losses MultiMix optimises, for any training loop: :func:`multimix_objective` and :func:`mixup_objective`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_multimix.dense import attention_from_scores, class_scores, dense_multimix_loss, dense_weights
from lightning_multimix.dense import factorised_dense_logit_loss, per_position, position_linear
from lightning_multimix.interpolation import full_precision, interpolate, is_affine
from lightning_multimix.options import DISTILL_TARGETS
from lightning_multimix.positions import position_multimix_loss
from lightning_multimix.targets import LOSSES, example_targets, mixed_targets, smooth_

Head = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class TeacherOutputs:
    r"""A teacher's predictions on the batch and how they enter the targets; raises ``ValueError`` on bad values.

    Args:
        logits: ``(m, c)`` the teacher's logits.
        weight, temperature: ``beta`` in ``[0, 1]`` and ``T > 0``.
        targets: ``"probs"``: targets ``(1 - beta) Y + beta softmax(logits / T)``, then interpolated; ``"logits"``:
            the teacher's ``head`` on its interpolated ``embeddings`` (both or neither), else its interpolated logits.

    Example:
        >>> TeacherOutputs(logits=torch.zeros(2, 3), weight=0.5).probs()
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

    def probs(self, dim: int = -1, logits: Optional[Tensor] = None, binary: bool = False) -> Tensor:
        """``softmax(logits / T)`` (``binary``: ``sigmoid``) in float32, without gradient (the teacher's own logits by
        default)."""
        logits = (self.logits if logits is None else logits).detach().float() / self.temperature
        return torch.sigmoid(logits) if binary else torch.softmax(logits, dim=dim)


def multimix_objective(weights: Tensor, labels: Tensor, *, logits: Optional[Tensor] = None,
                       embeddings: Optional[Tensor] = None, head: Optional[Head] = None,
                       feature_map: Optional[Tensor] = None, attention: Literal["cam", "softmax", "uniform"] = "cam",
                       position_mask: Optional[Tensor] = None, affine_head: Optional[bool] = None,
                       teacher: Optional[TeacherOutputs] = None, label_smoothing: float = 0.0,
                       loss: Literal["cross_entropy", "bce"] = "cross_entropy",
                       ignore_index: Optional[int] = None) -> Tensor:
    r"""The float32 MultiMix loss, ``mean_k L(g(Z lambda_k), Y lambda_k)`` over the columns of ``weights``.

    Pass ``logits`` ``(m, c)`` (logit space: exact for an affine head, cheapest), or ``head`` ``(N, d) -> (N, c)``
    with ``embeddings`` ``(m, d)`` or a dense ``feature_map`` ``(m, r, d)``; anything else raises ``ValueError``.
    Labels per position, ``(m, P)`` integers with ``logits`` ``(m, c, P)``, are mixed at every position
    (:func:`~lightning_multimix.positions.position_multimix_loss`: cross-entropy only, ``ignore_index`` positions
    left out).

    Args:
        weights: ``(m, n)``, columns on the simplex; left-out examples (ignore index) have zero rows (``keep``).
        labels: ``(m,)`` integer labels in ``[0, c)`` (a left-out row, weight zero, may hold any label; the range is
            not checked here, that would synchronise: a label out of range reads a class in range), ``(m, c)``
            floating targets (probabilities for the cross-entropy, values in ``[0, 1]`` for the BCE), or ``(m, P)``
            integer labels per position.
        loss: ``"cross_entropy"`` (soft-target cross-entropy) or ``"bce"`` (``binary_cross_entropy_with_logits``,
            mean over examples and classes); both are affine in the targets, so mixing them is exact.
        attention: dense: ``"cam"``, ``"softmax"`` or ``"uniform"`` of own-label scores (``F_ij . W[y_i]`` or logit).
        position_mask: dense: ``(m, r)``, false at padding: never mixed; mixed positions of padding only leave the loss.
        affine_head: dense: interpolate per-position logits; ``None``: when the head is an ``nn.Linear``.
        teacher: self-distillation targets (:class:`TeacherOutputs`).
        ignore_index: labels per position: the label of positions left out (for ``(m,)`` labels, a zero row of
            ``weights`` leaves an example out).

    Example:
        >>> head, z, y = torch.nn.Linear(4, 3), torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> w = torch.distributions.Dirichlet(torch.ones(5)).sample((100,)).T  # (m, n) = (5, 100)
        >>> bool(torch.isclose(multimix_objective(w, y, logits=head(z)),
        ...                    multimix_objective(w, y, embeddings=z, head=head), atol=1e-5))
        True
    """
    if weights.ndim != 2:
        raise ValueError(f"multimix_objective: `weights` must be (m, n), got {tuple(weights.shape)}.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"multimix_objective: expected `label_smoothing` in [0, 1), got {label_smoothing!r}.")
    if not labels.is_floating_point() and labels.ndim == 2:
        return _position_objective(weights, labels, logits, embeddings, feature_map, teacher, label_smoothing, loss,
                                   ignore_index)
    if ignore_index is not None:
        raise ValueError("multimix_objective: `ignore_index` applies to labels per position; leave an example out "
                         "with a zero row of `weights`.")
    if labels.ndim != 1 + labels.is_floating_point() or labels.shape[0] != weights.shape[0]:
        raise ValueError(f"multimix_objective: `labels` must be ({weights.shape[0]},) integers or ({weights.shape[0]}, "
                         f"c) floating targets, one per row of `weights`, got {labels.dtype} {tuple(labels.shape)}.")
    if loss not in LOSSES:
        raise ValueError(f"multimix_objective: loss={loss!r}; expected one of {LOSSES}.")
    if feature_map is not None:
        if logits is not None or embeddings is not None or head is None:
            raise ValueError("multimix_objective: dense mode takes `feature_map` and `head`, not `logits` or "
                             "`embeddings`.")
        return _dense_objective(weights, labels, feature_map, head, attention, affine_head, teacher, label_smoothing,
                                position_mask, loss)
    if attention != "cam" or affine_head is not None or position_mask is not None:
        raise ValueError("multimix_objective: `attention`, `position_mask` and `affine_head` apply to dense mode only "
                         "(pass `feature_map`).")
    if (logits is None) == (embeddings is None) or (embeddings is not None and head is None):
        raise ValueError("multimix_objective: pass `logits` (logit space) or `embeddings` and `head` (embedding "
                         "space), not both.")
    class_major = logits is not None  # (c, n): the logits' product is wide, the softmax runs along n
    _check_rows("logits" if class_major else "embeddings", logits if class_major else embeddings, labels)

    def mix(values: Tensor) -> Tensor:
        """``(m, c)`` values of the examples, interpolated into the layout of the mixed logits."""
        if not class_major:
            return interpolate(values, weights)
        with full_precision(values):
            return values.to(weights.dtype).T @ weights

    def head_on_mixed(head: Head, embeddings: Tensor) -> Tensor:  # (n, c)
        return head(interpolate(embeddings, weights).to(embeddings.dtype))

    mixed_logits = mix(logits) if class_major else head_on_mixed(head, embeddings)
    class_dim, binary = (0 if class_major else -1), loss == "bce"
    num_classes, n = mixed_logits.shape[class_dim], weights.shape[1]
    beta = teacher.weight if teacher is not None else 0.0
    # the cross-entropy's sign and mean folded into the targets: its loss is one product and a sum
    mass = 1.0 if binary else -1.0 / n
    with torch.no_grad():
        targets = mixed_targets(labels, weights, num_classes, scale=(1.0 - beta) * mass)
        targets = targets if class_major else targets.T
        if teacher is not None:
            if teacher.targets == "probs":
                mixed_teacher = mix(teacher.probs(binary=binary))
            elif teacher.head is None:
                mixed_teacher = teacher.probs(dim=class_dim, logits=mix(teacher.logits), binary=binary)
            else:
                mixed = head_on_mixed(teacher.head, teacher.embeddings)
                mixed_teacher = teacher.probs(dim=class_dim, logits=mixed.T if class_major else mixed, binary=binary)
            targets.add_(mixed_teacher, alpha=beta * mass)
        smooth_(targets, label_smoothing, num_classes, mass=mass)
    if binary:
        return F.binary_cross_entropy_with_logits(mixed_logits.float(), targets)
    return (targets * torch.log_softmax(mixed_logits.float(), dim=class_dim)).sum()


def mixup_objective(logits: Tensor, labels: Tensor, lam: Tensor, partner: Tensor, *,
                    teacher: Optional[TeacherOutputs] = None, ignore_index: int = -100, label_smoothing: float = 0.0,
                    loss: Literal["cross_entropy", "bce"] = "cross_entropy") -> Tensor:
    r"""Input-mixup loss of the ``(b, c)`` logits of ``lam x + (1 - lam) x[partner]``: ``lam L(logits, labels) +
    (1 - lam) L(logits, labels[partner])``. With class indices and the cross-entropy each term is ``F.cross_entropy``
    (which leaves out ``ignore_index``; a batch with every label ignored has no loss: NaN, as there), also per
    position (``(b, c, P)`` logits, ``(b, P)`` labels); with ``(b, c)`` targets or ``loss="bce"`` it is the loss of
    the lerped targets (the same: the loss is affine in them). ``teacher``: its logits on the same inputs.

    Example:
        >>> logits, labels = torch.zeros(2, 2), torch.tensor([0, 1])
        >>> mixup_objective(logits, labels, torch.tensor(0.3), torch.tensor([1, 0]))  # uniform prediction: log 2
        tensor(0.6931)
    """
    per_position = not labels.is_floating_point() and labels.ndim == 2 and logits.ndim == 3
    if logits.ndim != 2 and not (per_position and teacher is None and loss == "cross_entropy"):
        raise ValueError(f"mixup_objective: `logits` must be (b, c), or (b, c, P) with labels (b, P) per position "
                         f"(cross-entropy, no teacher), got {tuple(logits.shape)}.")
    _check_rows("logits", logits, labels)
    binary = loss == "bce"
    if binary or labels.is_floating_point():
        targets = example_targets(labels, logits.shape[-1])
        mixed = smooth_(torch.lerp(targets.index_select(0, partner), targets, lam.float()), label_smoothing,
                        logits.shape[-1])
        loss_fn = F.binary_cross_entropy_with_logits if binary else F.cross_entropy
        result = loss_fn(logits.float(), mixed)
    else:
        log_probs = torch.log_softmax(logits.float(), dim=1)
        labels = labels.long()

        def cross_entropy(targets: Tensor) -> Tensor:  # F.cross_entropy's, from the shared log-probabilities
            if label_smoothing:
                return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index,
                                       label_smoothing=label_smoothing)
            return F.nll_loss(log_probs, targets, ignore_index=ignore_index)

        result = torch.lerp(cross_entropy(labels.index_select(0, partner)), cross_entropy(labels), lam.float())
        loss_fn = F.cross_entropy
    if teacher is not None:
        taught = smooth_(teacher.probs(binary=binary), label_smoothing, logits.shape[-1])
        result = torch.lerp(result, loss_fn(logits.float(), taught), teacher.weight)
    return result


def _position_objective(weights: Tensor, labels: Tensor, logits: Optional[Tensor], embeddings: Optional[Tensor],
                        feature_map: Optional[Tensor], teacher: Optional[TeacherOutputs], label_smoothing: float,
                        loss: str, ignore_index: Optional[int]) -> Tensor:
    if logits is None or embeddings is not None or feature_map is not None or teacher is not None or loss != \
            "cross_entropy":
        raise ValueError("multimix_objective: labels per position take `logits` (m, c, P) and the cross-entropy, "
                         "without `embeddings`, `feature_map` or `teacher`.")
    if logits.ndim != 3 or labels.shape != (logits.shape[0], logits.shape[2]) or weights.shape[0] != labels.shape[0]:
        raise ValueError(f"multimix_objective: labels per position {tuple(labels.shape)} need logits (m, c, P) and "
                         f"weights (m, n) of the same m and P, got {tuple(logits.shape)} and {tuple(weights.shape)}.")
    return position_multimix_loss(logits, labels, weights, ignore_index, label_smoothing)


def _dense_objective(weights: Tensor, labels: Tensor, features: Tensor, head: Head, attention: str,
                     affine_head: Optional[bool], teacher: Optional[TeacherOutputs], label_smoothing: float,
                     mask: Optional[Tensor], loss: str) -> Tensor:
    if features.ndim != 3:
        raise ValueError(f"multimix_objective: `feature_map` must be (m, r, d), got {tuple(features.shape)}.")
    if teacher is not None and teacher.targets != "probs":
        raise ValueError("Dense MultiMix takes teacher targets='probs' only: the teacher's per-example predictions "
                         "are the targets every position inherits.")
    _check_rows("feature_map", features, labels)
    linear = is_affine(head)
    affine = linear if affine_head is None else affine_head
    if not (linear and affine):  # read more than once, by products that would each copy a transposed (CNN) map
        features = features.contiguous()
    position_logits = None
    if affine:  # the head at every position of the real examples, needed anyway: the class scores come from it
        position_logits = position_linear(features, head.weight, head.bias) if linear else \
            per_position(head, features)
    soft = labels.is_floating_point()
    with torch.no_grad():
        # each example's own-label scores (soft targets: weighted by them); a left-out example (ignore index) has
        # weight 0: any class's scores do
        readable = labels if soft else labels.clamp_min(0)
        if linear and position_logits is None:
            scores, num_classes = class_scores(features, head.weight, readable), head.out_features
        else:
            logits_here = (position_logits if position_logits is not None else per_position(head, features)).float()
            num_classes = logits_here.shape[-1]
            if soft:
                scores = (logits_here * readable.float().unsqueeze(1)).sum(-1)
            else:
                scores = logits_here.gather(-1, readable.view(-1, 1, 1).expand(-1, features.shape[1], 1))[..., 0]
            if linear and head.bias is not None:  # F_ij . W[y_i]: the logit without its bias, as in CAM
                bias = readable.float() @ head.bias.float() if soft else head.bias[readable].float()
                scores = scores - bias[:, None]
        weights_per_position = attention_from_scores(scores, attention, mask)
    # per-example targets (m, c), mixed with the teacher's predictions, smoothed
    targets = example_targets(labels, num_classes)
    if teacher is not None:
        targets = (1.0 - teacher.weight) * targets + teacher.weight * teacher.probs(binary=loss == "bce")
    targets = smooth_(targets, label_smoothing, num_classes)
    if position_logits is not None:
        return factorised_dense_logit_loss(position_logits, targets, weights, weights_per_position, mask, loss)
    per_position_weights = dense_weights(weights, weights_per_position, mask)
    valid = per_position_weights.sum(0) > 0 if mask is not None else None  # the mixed positions not all padding
    return dense_multimix_loss(features, targets, per_position_weights, head, valid, loss)


def _check_rows(name: str, values: Tensor, labels: Tensor) -> None:
    if values.shape[0] != labels.shape[0]:
        raise ValueError(f"`{name}` has {values.shape[0]} rows but there are {labels.shape[0]} labels.")
