"""What a fit's targets are, decided once on the first batch, and the rules that build them (torch only).

:func:`read_targets` reads the labels and the user's loss ``U`` into :class:`Targets`, which flows down to the
objective. ``U`` is explained when ``dU/dlogits`` equals the gradient of ``F.cross_entropy(logits, labels,
label_smoothing=eps)`` for some ``eps`` in ``[0, 1)`` (compared by value where the logits are not in the graph of
``U``, as with a compiled forward): ``U - CE_eps`` then does not involve the logits (a regulariser, an auxiliary task:
kept beside the MultiMix loss) and ``eps`` is carried into the mixed targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_multimix.errors import MultiMixError

LABELS_HOW = ("return them from `MultiMixMixin.multimix_labels(batch)` (MultiMix reads `batch[1]` or a 'label'/"
              "'labels'/'target'/'targets'/'y' key)")
_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def class_indices(labels: Any) -> Tensor:
    """``labels`` if they are an integer ``(b,)`` tensor, else :class:`MultiMixError` (one-hot or soft targets too)."""
    if not isinstance(labels, Tensor) or labels.dtype not in _INTEGER_DTYPES or labels.ndim != 1:
        what = f"dtype {labels.dtype} and shape {tuple(labels.shape)}" if isinstance(labels, Tensor) else \
            type(labels).__name__
        raise MultiMixError(f"MultiMix needs integer class labels of shape (b,), got {what} (one-hot or soft targets "
                            "are not supported). Return class indices from `MultiMixMixin.multimix_labels(batch)`.")
    return labels


def outside_classes(labels: Tensor, num_classes: int, keep: Optional[Tensor] = None) -> Tensor:
    """``(b,)`` booleans: the labels outside ``[0, num_classes)``, among the ``keep`` ones (not ignored) if given."""
    outside = labels.clamp(0, num_classes - 1) != labels
    return outside if keep is None else outside & keep


def kept(labels: Tensor, ignore_index: Optional[int]) -> Optional[Tensor]:
    """``(b,)`` booleans, the examples that may be mixed (label not ``ignore_index``); ``None``: every one."""
    return labels != ignore_index if ignore_index is not None else None


def labels_error(num_classes: Optional[int], where: str, head_path: Optional[str]) -> MultiMixError:
    """The error for labels neither in ``[0, num_classes)`` nor the ignore index, found ``where``."""
    return MultiMixError(
        f"MultiMix: labels outside [0, {num_classes}) {where}: the head {head_path!r} has {num_classes} outputs. Check "
        "the dataset's labels, or, if that is not your classifier, pass `MultiMix(head='dotted.path')`. If such a "
        "label marks examples your loss ignores, pass it as `MultiMix(ignore_index=...)` (the default is -100, "
        "PyTorch's)."
    )


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: Optional[int], label_smoothing: float = 0.0) -> Tensor:
    """``F.cross_entropy`` of ``(b, c)`` logits in float32, leaving out ``ignore_index`` (``-100`` when ``None``)."""
    ignore = ignore_index if ignore_index is not None else -100
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore, label_smoothing=label_smoothing)


@dataclass(frozen=True)
class LossFit:
    """The user's loss as ``F.cross_entropy(logits, labels, label_smoothing=label_smoothing) + rest``."""

    label_smoothing: float  #: ``eps`` found in the user's loss
    rest: bool  #: whether ``rest`` (terms that do not depend on the logits) is not zero


def explain_loss(user_loss: Tensor, logits: Tensor, labels: Tensor, ignore_index: Optional[int]) -> Optional[LossFit]:
    """The :class:`LossFit` of ``user_loss`` on ``logits`` (``(b, c)``, in the graph of ``user_loss``), or ``None``
    when the loss is not a cross-entropy of these logits with these labels plus terms that do not involve them."""
    valid = kept(labels, ignore_index)
    valid = valid if valid is not None else torch.ones_like(labels, dtype=torch.bool)
    if not (user_loss.requires_grad and logits.requires_grad) or not bool(valid.any()) \
            or bool(outside_classes(labels, logits.shape[-1], valid).any()):
        return None
    (found,) = torch.autograd.grad(user_loss, logits, retain_graph=True, allow_unused=True)
    if found is None:  # not in the graph of the loss (a compiled forward returns another tensor): compare values
        plain = float(cross_entropy(logits.detach(), labels, ignore_index))
        return LossFit(0.0, False) if abs(float(user_loss.detach()) - plain) <= 1e-4 * max(1.0, abs(plain)) else None
    with torch.enable_grad():
        probe = logits.detach().float().requires_grad_(True)
        (g_plain,) = torch.autograd.grad(cross_entropy(probe, labels, ignore_index), probe)
        uniform = -(probe.log_softmax(-1).mean(-1) * valid).sum() / valid.sum()  # what label smoothing mixes in
        (g_uniform,) = torch.autograd.grad(uniform, probe)
    found = found.float()
    direction = g_uniform - g_plain
    eps = float((found - g_plain).mul(direction).sum() / direction.pow(2).sum().clamp_min(1e-30))
    eps = eps if 1e-4 < eps < 1.0 else 0.0
    fitted = g_plain + eps * direction
    tolerance = (1e-2 if logits.dtype in (torch.float16, torch.bfloat16) else 1e-4) * float(fitted.norm()) + 1e-8
    if float((found - fitted).norm()) > tolerance:
        return None
    eps = round(eps, 4)
    rest = float(user_loss.detach().float() - cross_entropy(logits.detach(), labels, ignore_index, eps))
    return LossFit(eps, abs(rest) > 1e-6 * max(1.0, float(user_loss.detach().abs())))


@dataclass(frozen=True)
class Targets:
    """What a fit's targets are and how the user's loss uses them, read once by :func:`read_targets`."""

    num_classes: int  #: the head's outputs
    ignore_index: Optional[int]  #: examples with this label are left out (``None``: every label must be a class)
    label_smoothing: float  #: of the mixed targets: ``MultiMix(label_smoothing=...)``, else the user's loss's
    loss: LossFit  #: the user's loss, explained

    def keep(self, labels: Tensor) -> Optional[Tensor]:
        """``(b,)`` booleans, the examples that may be mixed; ``None``: every one."""
        return kept(labels, self.ignore_index)

    def outside(self, labels: Tensor, keep: Optional[Tensor] = None) -> Tensor:
        """``(b,)`` booleans, the labels neither a class nor ignored (``keep``: :meth:`keep`'s, if at hand)."""
        return outside_classes(labels, self.num_classes, keep if keep is not None else self.keep(labels))

    def other_terms(self, user_loss: Tensor, logits: Tensor, labels: Tensor) -> Optional[Tensor]:
        """The user's loss less the cross-entropy MultiMix replaces (``None`` when that is all it is)."""
        if not self.loss.rest:
            return None
        return user_loss.float() - cross_entropy(logits, labels, self.ignore_index, self.loss.label_smoothing)


def read_targets(user_loss: Tensor, logits: Tensor, labels: Tensor, ignore_index: Optional[int],
                 label_smoothing: float, head_path: str) -> tuple[Targets, list[str]]:
    """On the first batch: :class:`Targets` from the labels and the user's loss, and what to say once in the log;
    labels out of range, or a loss MultiMix cannot carry, are errors saying the fix."""
    num_classes = logits.shape[-1]
    if bool(outside_classes(labels, num_classes, kept(labels, ignore_index)).any()):
        raise labels_error(num_classes, "in the first training batch", head_path)
    fit = explain_loss(user_loss, logits, labels, ignore_index)
    if fit is None:
        raise MultiMixError(
            f"MultiMix: your training_step's loss is not the cross-entropy of the head {head_path!r}'s logits with the "
            "labels MultiMix read (plus terms that do not involve the logits). MultiMix replaces that cross-entropy "
            "and keeps your other terms, but it cannot carry class weights, a focal or margin loss, a regulariser on "
            f"the logits, or a sum instead of a mean. If those are not the labels your loss uses, {LABELS_HOW}; label "
            "smoothing is carried (or pass `MultiMix(label_smoothing=...)`)."
        )
    if fit.label_smoothing and label_smoothing and abs(fit.label_smoothing - label_smoothing) > 1e-3:
        raise MultiMixError(f"MultiMix(label_smoothing={label_smoothing}) but your loss smooths its labels by "
                            f"{fit.label_smoothing}: set one of them.")
    notes = [f"MultiMix: your loss smooths its labels by {fit.label_smoothing}; the mixed targets are smoothed "
             "alike."] if fit.label_smoothing and not label_smoothing else []
    if fit.rest:
        notes.append("MultiMix: your loss adds terms to the cross-entropy of the head's logits (a regulariser, an "
                     "auxiliary task); they keep training: the loss optimised is the MultiMix loss plus your loss "
                     "minus its cross-entropy.")
    return Targets(num_classes, ignore_index, label_smoothing or fit.label_smoothing, fit), notes


def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot targets ``(b, c)`` from integer labels ``(b,)``; a label outside ``[0, c)`` gives an all-zero row.

    Example:
        >>> one_hot(torch.tensor([2, 0]), 3)
        tensor([[0., 0., 1.],
                [1., 0., 0.]])
    """
    return (labels.unsqueeze(-1) == torch.arange(num_classes, device=labels.device)).to(dtype)


def mixed_one_hot(labels: Tensor, weights: Tensor, num_classes: int, scale: float = 1.0) -> Tensor:
    """``scale * one_hot(labels).T @ weights``, the ``(c, n)`` mixed targets, without forming the one-hot targets: one
    ``index_add_`` of the rows of ``(m, n)`` weights by label. A label out of range adds to a class in range (the
    callback counts those; a left-out row has weight 0)."""
    zeros = weights.new_zeros(num_classes, weights.shape[1])
    return zeros.index_add_(0, labels.clamp(0, num_classes - 1), weights, alpha=scale)


def smooth_(targets: Tensor, label_smoothing: float, num_classes: int, mass: float = 1.0) -> Tensor:
    """Label smoothing of targets, in place: ``(1 - eps) t + eps * mass / c`` for targets of total ``mass`` per example.

    Example:
        >>> smooth_(torch.tensor([[1.0, 0.0]]), 0.2, 2)
        tensor([[0.9000, 0.1000]])
    """
    if not label_smoothing:
        return targets
    return targets.mul_(1.0 - label_smoothing).add_(label_smoothing * mass / num_classes)
