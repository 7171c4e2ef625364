"""How the user's training loss relates to the cross-entropy that MultiMix replaces (torch only, no Lightning).

MultiMix replaces the cross-entropy of the head's logits with the labels, and only that. On the first mixed batch the
user's loss ``U`` is compared with it through gradients with respect to the logits (by value where the logits are
not in the graph of ``U``, as with a compiled forward): ``U`` is explained by a head when
``dU/dlogits`` equals the gradient of ``F.cross_entropy(logits, labels, label_smoothing=eps)`` for some ``eps`` in
``[0, 1)``. Then ``U - CE_eps`` does not depend on the logits: it is made of other terms (a regulariser, an auxiliary
task), which keep training beside the MultiMix loss, and ``eps`` is carried into the mixed targets. A loss that
depends on the logits in another way (class weights, a focal or margin loss, a sum instead of a mean, other labels) is
not explained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossFit:
    """The user's loss as ``F.cross_entropy(logits, labels, label_smoothing=label_smoothing) + rest``."""

    label_smoothing: float  #: ``eps`` found in the user's loss
    rest: bool  #: whether ``rest`` (terms that do not depend on the logits) is not zero


def plain_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: Optional[int], label_smoothing: float = 0.0
                        ) -> Tensor:
    """``F.cross_entropy`` of the head's logits in float32, with the ignore index when there is one."""
    ignore = ignore_index if ignore_index is not None else -100
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore, label_smoothing=label_smoothing)


def in_range(labels: Tensor, num_classes: int, ignore_index: Optional[int]) -> bool:
    """Whether every label is a class of ``num_classes`` or the ignore index (a host read: first batch only)."""
    ignored = labels == ignore_index if ignore_index is not None else torch.zeros_like(labels, dtype=torch.bool)
    return bool(((labels >= 0) & (labels < num_classes) | ignored).all())


def explain_loss(user_loss: Tensor, logits: Tensor, labels: Tensor, ignore_index: Optional[int]) -> Optional[LossFit]:
    """The :class:`LossFit` of ``user_loss`` on ``logits`` (``(b, c)``, in the graph of ``user_loss``), or ``None``
    when the loss is not a cross-entropy of these logits with these labels plus terms that do not involve them.

    Example:
        >>> logits, labels = torch.randn(6, 4, requires_grad=True), torch.tensor([0, 1, 2, 3, 0, 1])
        >>> explain_loss(F.cross_entropy(logits, labels, label_smoothing=0.1) + 0.5, logits, labels, None)
        LossFit(label_smoothing=0.1, rest=True)
        >>> explain_loss(F.cross_entropy(logits, labels, weight=torch.rand(4)), logits, labels, None) is None
        True
    """
    valid = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
    if not (user_loss.requires_grad and logits.requires_grad) or not in_range(labels, logits.shape[-1], ignore_index) \
            or not bool(valid.any()):
        return None
    (found,) = torch.autograd.grad(user_loss, logits, retain_graph=True, allow_unused=True)
    if found is None:  # not in the graph of the loss (a compiled forward returns another tensor): compare values
        plain = float(plain_cross_entropy(logits.detach(), labels, ignore_index))
        return LossFit(0.0, False) if abs(float(user_loss.detach()) - plain) <= 1e-4 * max(1.0, abs(plain)) else None
    with torch.enable_grad():
        probe = logits.detach().float().requires_grad_(True)
        plain = plain_cross_entropy(probe, labels, ignore_index)
        (g_plain,) = torch.autograd.grad(plain, probe)
        log_probs = probe.log_softmax(-1)
        uniform = -(log_probs.mean(-1) * valid).sum() / valid.sum()  # what label smoothing mixes in
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
    rest = float(user_loss.detach().float() - plain_cross_entropy(logits.detach(), labels, ignore_index, eps))
    return LossFit(eps, abs(rest) > 1e-6 * max(1.0, float(user_loss.detach().abs())))
