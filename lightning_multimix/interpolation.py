"""Interpolation, ``weights.T @ values`` for ``(m, n)`` weights, shared by embeddings, logits and targets, and when it
commutes with a head."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import Tensor


def full_precision(tensor: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``tensor``'s device, so interpolations stay float32 (in 16 bits weights no longer sum to one)."""
    device = tensor.device.type
    try:
        enabled = torch.is_autocast_enabled(device)
    except RuntimeError:  # a device type autocast does not know (meta): nothing to turn off
        return contextlib.nullcontext()
    return torch.autocast(device, enabled=False) if enabled else contextlib.nullcontext()


def is_affine(module: Any) -> bool:
    """Whether ``module`` is known to be affine (an ``nn.Linear``), so that interpolating its outputs equals running it
    on the interpolations (weights that sum to one): the test that allows logit space."""
    return isinstance(module, torch.nn.Linear)


def interpolate(values: Tensor, weights: Tensor) -> Tensor:
    r"""``out[k] = sum_i weights[i, k] * values[i]``, ``(m, *s)`` to ``(n, *s)``, in ``weights``' dtype (float32).

    Example:
        >>> interpolate(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.25, 1.0], [0.75, 0.0]]))
        tensor([[0.2500, 1.5000],
                [1.0000, 0.0000]])
    """
    if values.shape[0] != weights.shape[0]:
        raise ValueError(f"`values` has {values.shape[0]} rows but `weights` has {weights.shape[0]}: weights must be "
                         "(m, n) for m rows.")
    flat = (values if values.ndim == 2 else values.reshape(values.shape[0], -1)).to(weights.dtype)
    with full_precision(values):
        mixed = weights.T @ flat
    return mixed if values.ndim == 2 else mixed.view(weights.shape[1], *values.shape[1:])


def mix_with_partner(values: Tensor, lam: Tensor, partner: Tensor) -> Tensor:
    r"""Mixup, ``lam * values[i] + (1 - lam) * values[partner[i]]`` in ``values``' dtype; ``lam`` is 0-dim.

    Example:
        >>> mix_with_partner(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor(0.75), torch.tensor([1, 0]))
        tensor([[0.7500, 0.2500],
                [0.2500, 0.7500]])
    """
    if not values.is_floating_point():
        raise ValueError(f"mixup interpolates floating-point values, got dtype {values.dtype}.")
    if partner.shape != values.shape[:1]:
        raise ValueError(f"`partner` {tuple(partner.shape)} must hold one index per row of `values` "
                         f"{tuple(values.shape)}.")
    return torch.lerp(values.index_select(0, partner), values, lam.to(values.dtype))


def runnable_head(head: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """The head the interpolations run through: one with buffers (batch norm) runs on copies of them, so that
    interpolations leave its running statistics as the real batch left them."""
    if next(head.buffers(), None) is None:
        return head
    return lambda x: torch.func.functional_call(head, {n: b.clone() for n, b in head.named_buffers()}, (x,))
