"""What a fit's targets are, decided once on the first batch, and the rules that build them (torch only).

Targets are ``(b,)`` integer class indices, ``(b, c)`` floating targets (probabilities, multi-hot), or integer labels
per position (``(b, H, W)`` masks for ``(b, c, H, W)`` logits, ``(b, T)`` tags for ``(b, T, c)``: cross-entropy
only, read flattened to ``(b, P)`` against ``(b, c, P)`` logits).
:func:`read_targets` reads them and the user's loss ``U`` into :class:`Targets`, which flows down to the objective.
``U`` is explained when ``dU/dlogits`` equals the gradient of one of the losses MultiMix carries (:data:`LOSSES`:
``F.cross_entropy`` with class indices or probabilities, ``F.binary_cross_entropy_with_logits`` with the targets or
``one_hot(labels)``), their targets smoothed by some ``eps`` in ``[0, 1)`` (compared by value where the logits are not
in the graph of ``U``, as with a compiled forward): ``U`` less that loss then does not involve the logits (a
regulariser, an auxiliary task: kept beside the MultiMix loss) and ``eps`` is carried into the mixed targets. Both
losses are affine in their targets, so mixing the targets with the logits' weights is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_multimix.errors import MultiMixError
from lightning_multimix.positions import resized

LOSSES = ("cross_entropy", "bce")
LABELS_HOW = ("return them from `MultiMixMixin.multimix_labels(batch)` (MultiMix reads `batch[1]` or a 'label'/"
              "'labels'/'target'/'targets'/'y' key)")
_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def target_tensor(labels: Any) -> Tensor:
    """``labels`` if they are integer class indices, ``(b,)`` or per position, or ``(b, c)`` floating targets, else
    :class:`MultiMixError` naming what they are and the fix."""
    if isinstance(labels, Tensor) and ((labels.ndim >= 1 and labels.dtype in _INTEGER_DTYPES)
                                       or (labels.ndim == 2 and labels.is_floating_point())):
        return labels
    what = f"dtype {labels.dtype} and shape {tuple(labels.shape)}" if isinstance(labels, Tensor) else \
        type(labels).__name__
    raise MultiMixError(f"MultiMix needs (b,) integer class labels, (b, c) floating targets (probabilities or "
                        f"multi-hot) or integer labels per position ((b, H, W) masks, (b, T) tags), got {what}. "
                        "Return them from `MultiMixMixin.multimix_labels(batch)`.")


def per_position(labels: Tensor) -> bool:
    """Whether ``labels`` are integer labels per position (more than one per example)."""
    return not labels.is_floating_point() and labels.ndim > 1


def outside_classes(labels: Tensor, num_classes: int, keep: Optional[Tensor] = None) -> Tensor:
    """``(b,)`` booleans: the labels outside ``[0, num_classes)``, among the ``keep`` ones (not ignored) if given."""
    outside = labels.clamp(0, num_classes - 1) != labels
    return outside if keep is None else outside & keep


def kept(labels: Tensor, ignore_index: Optional[int]) -> Optional[Tensor]:
    """Booleans of ``labels``' shape, the labels that are not ``ignore_index``; ``None``: every one."""
    return labels != ignore_index if ignore_index is not None else None


def soft_outside(targets: Tensor, loss: str) -> Tensor:
    """``(b,)`` booleans: rows of ``(b, c)`` targets with a value outside ``[0, 1]`` or, for the cross-entropy, that do
    not sum to 1."""
    outside = (targets.clamp(0, 1) != targets).any(-1)
    return outside | ((targets.sum(-1) - 1).abs() > 1e-3) if loss == "cross_entropy" else outside


def labels_error(num_classes: Optional[int], where: str, head_path: Optional[str]) -> MultiMixError:
    """The error for labels neither in ``[0, num_classes)`` nor the ignore index, found ``where``."""
    return MultiMixError(
        f"MultiMix: labels outside [0, {num_classes}) {where}: the head {head_path!r} has {num_classes} outputs. Check "
        "the dataset's labels, or, if that is not your classifier, pass `MultiMix(head='dotted.path')`. If such a "
        "label marks examples your loss ignores, pass it as `MultiMix(ignore_index=...)` (the default is -100, "
        "PyTorch's)."
    )


def plain_loss(logits: Tensor, labels: Tensor, loss: str, ignore_index: Optional[int],
               label_smoothing: float = 0.0) -> Tensor:
    """The loss MultiMix replaces, in float32: ``F.cross_entropy`` with class indices (``ignore_index`` left out) or
    probabilities, or ``F.binary_cross_entropy_with_logits`` (mean) with the targets or ``one_hot(labels)``; targets
    smoothed as ``(1 - eps) t + eps / c`` (for the BCE as timm's recipes do)."""
    logits, num_classes = logits.float(), logits.shape[-1]
    if loss == "cross_entropy":
        ignore = ignore_index if ignore_index is not None else -100
        targets = labels.float() if labels.is_floating_point() else labels
        return F.cross_entropy(logits, targets, ignore_index=ignore, label_smoothing=label_smoothing)
    targets = example_targets(labels, num_classes)
    return F.binary_cross_entropy_with_logits(logits, smooth_(targets.clone(), label_smoothing, num_classes))


@dataclass(frozen=True)
class LossFit:
    """The user's loss as ``plain_loss(logits, labels, kind, label_smoothing=label_smoothing) + rest``."""

    label_smoothing: float  #: ``eps`` found in the user's loss
    rest: bool  #: whether ``rest`` (terms that do not depend on the logits) is not zero
    kind: str = "cross_entropy"  #: one of :data:`LOSSES`


def flat_positions(logits: Tensor, labels: Tensor, class_dim: int = -1) -> tuple[Tensor, Tensor]:
    """Labels per position and their logits as ``(b, P)`` and ``(b, c, P)`` (the classes at ``class_dim``); other
    labels and logits as they are."""
    if not per_position(labels):
        return logits, labels
    return logits.movedim(class_dim, 1).flatten(2), labels.flatten(1)


def explain_loss(user_loss: Tensor, logits: Tensor, labels: Tensor, ignore_index: Optional[int],
                 class_dim: int = -1, resize: bool = False) -> Optional[LossFit]:
    """The :class:`LossFit` of ``user_loss`` on ``logits`` (``(b, c)``, or per position with the classes at
    ``class_dim``, ``resize``: resized to the labels' size first; in the graph of ``user_loss``), or ``None`` when
    the loss is not one of :data:`LOSSES` (per position: the cross-entropy) of these logits and labels plus terms that
    do not involve them. Gradients are compared on ``logits`` as they are."""
    soft, raw, given = labels.is_floating_point(), logits, labels

    def view(t: Tensor) -> Tensor:  # what the loss reads: (b, c) or (b, c, P)
        return flat_positions(resized(t, given) if resize else t, given, class_dim)[0]

    logits, labels = view(raw), flat_positions(raw, labels, class_dim)[1] if per_position(labels) else labels
    valid = kept(labels, ignore_index) if not soft else None
    valid = valid if valid is not None else torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
    wrong = (labels.shape != logits.shape or bool((labels.clamp(0, 1) != labels).any())) if soft else \
        bool(outside_classes(labels, logits.shape[1], valid).any())
    if not (user_loss.requires_grad and raw.requires_grad) or not bool(valid.any()) or wrong:
        return None
    kinds = ("cross_entropy",) if per_position(labels) else LOSSES
    (found,) = torch.autograd.grad(user_loss, raw, retain_graph=True, allow_unused=True)
    if found is None:  # not in the graph of the loss (a compiled forward returns another tensor): compare values
        for kind in kinds:
            plain = float(plain_loss(logits.detach(), labels, kind, ignore_index))
            if abs(float(user_loss.detach()) - plain) <= 1e-4 * max(1.0, abs(plain)):
                return LossFit(0.0, False, kind)
        return None
    found = found.float()
    for kind in kinds:  # each loss is affine in eps: its gradient is g_0 + eps (g_1 - g_0)
        with torch.enable_grad():
            probe = raw.detach().float().requires_grad_(True)
            g_plain, g_uniform = (torch.autograd.grad(plain_loss(view(probe), labels, kind, ignore_index, eps),
                                                      probe)[0] for eps in (0.0, 1.0))
        direction = g_uniform - g_plain
        eps = float((found - g_plain).mul(direction).sum() / direction.pow(2).sum().clamp_min(1e-30))
        eps = eps if 1e-4 < eps < 1.0 else 0.0
        fitted = g_plain + eps * direction
        tolerance = (1e-2 if raw.dtype in (torch.float16, torch.bfloat16) else 1e-4) * float(fitted.norm()) + 1e-8
        if not float((found - fitted).norm()) > tolerance:  # NaN: not told apart here; the health check says
            eps = round(eps, 4)
            rest = float(user_loss.detach().float() - plain_loss(logits.detach(), labels, kind, ignore_index, eps))
            return LossFit(eps, abs(rest) > 1e-6 * max(1.0, float(user_loss.detach().abs())), kind)
    return None


def explain_ignoring(user_loss: Tensor, logits: Tensor, labels: Tensor, ignore_index: Optional[int],
                     class_dim: int = -1, resize: bool = False) -> tuple[Optional[LossFit], Optional[int]]:
    """:func:`explain_loss`, and the ignore index it used: ``ignore_index``, or, where that is the default -100 and
    the labels hold one value outside the classes (segmentation's 255), that value if the loss ignores it."""
    num_classes = flat_positions(logits, labels, class_dim)[0].shape[1]
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        raise MultiMixError(f"MultiMix(ignore_index={ignore_index}) is one of the {num_classes} classes of the logits: "
                            "pass the label your loss ignores, one no class has (e.g. -100 or 255).")
    fit = explain_loss(user_loss, logits, labels, ignore_index, class_dim, resize)
    if fit is not None or labels.is_floating_point() or ignore_index != -100:
        return fit, ignore_index
    others = torch.unique(labels[outside_classes(labels, num_classes, kept(labels, ignore_index))])
    if others.numel() != 1:
        return None, ignore_index
    fit = explain_loss(user_loss, logits, labels, int(others), class_dim, resize)
    return (fit, int(others)) if fit is not None else (None, ignore_index)


@dataclass(frozen=True)
class Targets:
    """What a fit's targets are and how the user's loss uses them, read once by :func:`read_targets`."""

    num_classes: int  #: the head's outputs
    ignore_index: Optional[int]  #: class indices with this label are left out (``None``: every label is a class)
    label_smoothing: float  #: of the mixed targets: ``MultiMix(label_smoothing=...)``, else the user's loss's
    loss: LossFit  #: the user's loss, explained
    soft: bool = False  #: ``(b, c)`` floating targets, else ``(b,)`` class indices
    positions: bool = False  #: integer labels per position, read as ``(b, P)``

    @property
    def kind(self) -> str:
        """``"positions"``, ``"multi_hot"`` (``(b, c)`` targets of the BCE) or ``"labels"`` (the others): the key of
        the type's default settings (:data:`~lightning_multimix.options.TYPE_DEFAULTS`)."""
        return "positions" if self.positions else "multi_hot" if self.soft and self.loss.kind == "bce" else "labels"

    def keep(self, labels: Tensor) -> Optional[Tensor]:
        """``(b,)`` booleans, the examples that may be mixed; ``None``: every one (per position: the positions
        ignored are left out by the loss)."""
        return None if self.soft or self.positions else kept(labels, self.ignore_index)

    def outside(self, labels: Tensor, keep: Optional[Tensor] = None) -> Tensor:
        """Booleans of ``labels``' shape, the labels neither a class nor ignored, or the rows of soft targets that
        are not targets of the loss (``keep``: :meth:`keep`'s, if at hand)."""
        if self.soft:
            return soft_outside(labels, self.loss.kind)
        if keep is None:
            keep = kept(labels, self.ignore_index)
        return outside_classes(labels, self.num_classes, keep)

    def error(self, where: str, head_path: Optional[str]) -> MultiMixError:
        """The error for :meth:`outside` labels found ``where``."""
        if not self.soft:
            return labels_error(self.num_classes, where, head_path)
        sums = " or rows that do not sum to 1 (probabilities of the cross-entropy)" if self.loss.kind == \
            "cross_entropy" else ""
        return MultiMixError(f"MultiMix: (b, c) targets with values outside [0, 1]{sums} {where}. Check the dataset's "
                             "targets, or return other ones from `MultiMixMixin.multimix_labels(batch)`.")

    def other_terms(self, user_loss: Tensor, logits: Tensor, labels: Tensor) -> Optional[Tensor]:
        """The user's loss less the loss MultiMix replaces (``None`` when that is all it is)."""
        if not self.loss.rest:
            return None
        return user_loss.float() - plain_loss(logits, labels, self.loss.kind, self.ignore_index,
                                              self.loss.label_smoothing)


def read_targets(user_loss: Tensor, logits: Tensor, labels: Tensor, ignore_index: Optional[int],
                 label_smoothing: float, head_path: str, class_dim: int = -1,
                 resize: bool = False) -> tuple[Targets, list[str]]:
    """On the first batch: :class:`Targets` from the labels and the user's loss (``logits``: as captured, the classes
    at ``class_dim``), and what to say once in the log; labels out of range, targets of another shape than the
    logits, or a loss MultiMix cannot carry, are errors saying the fix. With the default ignore index, a single label
    outside the classes that the user's loss ignores (segmentation's 255) becomes the ignore index."""
    positions, soft = per_position(labels), labels.is_floating_point()
    num_classes = flat_positions(logits, labels, class_dim)[0].shape[1]
    if soft and labels.shape[-1] != num_classes:
        raise MultiMixError(f"MultiMix read (b, c) targets of shape {tuple(labels.shape)}, but the head {head_path!r} "
                            f"gives {num_classes} outputs: one target per output is needed. Return matching targets "
                            "from `MultiMixMixin.multimix_labels(batch)`, or pass `MultiMix(head='dotted.path')`.")
    notes = []
    fit, found_ignore = explain_ignoring(user_loss, logits, labels, ignore_index, class_dim, resize)
    if found_ignore != ignore_index:
        ignore_index = found_ignore
        notes.append(f"MultiMix: your loss ignores the label {ignore_index}; so does MultiMix (pass "
                     f"`MultiMix(ignore_index={ignore_index})` to say so).")
    targets = Targets(num_classes, ignore_index, label_smoothing or (fit.label_smoothing if fit else 0.0),
                      fit or LossFit(0.0, False, "bce" if soft else "cross_entropy"), soft, positions)
    labels = flat_positions(logits, labels, class_dim)[1]
    if bool(targets.outside(labels).any()):
        raise targets.error("in the first training batch", head_path)
    if fit is None and positions:
        raise MultiMixError(
            f"MultiMix: your training_step's loss is not the per-position cross-entropy of the logits of {head_path!r} "
            "with the labels per position it read (plus terms that do not involve the logits). It carries "
            "`F.cross_entropy(logits, labels, ignore_index=..., label_smoothing=...)`, mean over the kept positions, "
            "and keeps your other terms, but it cannot carry a Dice or focal loss, class weights, or a sum instead of "
            f"a mean. If your loss reads other labels or logits, {LABELS_HOW}, or pass `MultiMix(head='dotted.path')` "
            "naming the module whose output your loss reads."
        )
    if fit is None:
        raise MultiMixError(
            f"MultiMix: your training_step's loss is not one MultiMix can carry on the head {head_path!r}'s logits and "
            f"the {'(b, c) targets' if soft else 'labels'} it read (plus terms that do not involve the logits). It "
            "carries `F.cross_entropy` with class indices or probabilities, and `F.binary_cross_entropy_with_logits` "
            "with the targets or `one_hot(labels)`, mean reduction, label smoothing included, and keeps your other "
            "terms, but it cannot carry class weights or `pos_weight`, a focal or margin loss, a regulariser on the "
            f"logits, or a sum instead of a mean. If those are not the labels your loss uses, {LABELS_HOW}."
        )
    if fit.label_smoothing and label_smoothing and abs(fit.label_smoothing - label_smoothing) > 1e-3:
        raise MultiMixError(f"MultiMix(label_smoothing={label_smoothing}) but your loss smooths its labels by "
                            f"{fit.label_smoothing}: set one of them.")
    if fit.label_smoothing and not label_smoothing:
        notes.append(f"MultiMix: your loss smooths its labels by {fit.label_smoothing}; the mixed targets are "
                     "smoothed alike.")
    if fit.rest:
        notes.append("MultiMix: your loss adds terms to the loss of the head's logits (a regulariser, an auxiliary "
                     "task); they keep training: the loss optimised is the MultiMix loss plus your loss minus that "
                     "loss.")
    if fit.kind == "bce" or soft:
        notes.append(f"MultiMix: your loss is the {'binary cross-entropy' if fit.kind == 'bce' else 'cross-entropy'} "
                     f"of {'(b, c) targets' if soft else 'one-hot labels'}; the mixed loss is the same loss of the "
                     "mixed logits and mixed targets.")
    return targets, notes


def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot targets ``(b, c)`` from integer labels ``(b,)``; a label outside ``[0, c)`` gives an all-zero row.

    Example:
        >>> one_hot(torch.tensor([2, 0]), 3)
        tensor([[0., 0., 1.],
                [1., 0., 0.]])
    """
    return (labels.unsqueeze(-1) == torch.arange(num_classes, device=labels.device)).to(dtype)


def mixed_targets(labels: Tensor, weights: Tensor, num_classes: int, scale: float = 1.0) -> Tensor:
    """``scale * T.T @ weights``, the ``(c, n)`` mixed targets of ``(m, c)`` targets ``T``, or of ``one_hot(labels)``
    without forming it: one ``index_add_`` of the rows of ``(m, n)`` weights by label. A label out of range adds to a
    class in range (the callback counts those; a left-out row has weight 0)."""
    if labels.is_floating_point():
        return (labels.to(weights.dtype).T @ weights).mul_(scale)
    zeros = weights.new_zeros(num_classes, weights.shape[1])
    return zeros.index_add_(0, labels.clamp(0, num_classes - 1), weights, alpha=scale)


def example_targets(labels: Tensor, num_classes: int) -> Tensor:
    """Per-example float32 targets ``(m, c)``: the ``(m, c)`` targets, or ``one_hot(labels)``."""
    return labels.float() if labels.is_floating_point() else one_hot(labels, num_classes)


def smooth_(targets: Tensor, label_smoothing: float, num_classes: int, mass: float = 1.0) -> Tensor:
    """Label smoothing of targets, in place: ``(1 - eps) t + eps * mass / c`` for targets of total ``mass`` per example.

    Example:
        >>> smooth_(torch.tensor([[1.0, 0.0]]), 0.2, 2)
        tensor([[0.9000, 0.1000]])
    """
    if not label_smoothing:
        return targets
    return targets.mul_(1.0 - label_smoothing).add_(label_smoothing * mass / num_classes)
