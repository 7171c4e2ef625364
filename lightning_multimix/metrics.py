r"""Embedding alignment and uniformity (Wang and Isola, 2020) over pairs ``i != j`` of L2-normalised embeddings, as
functions and as torchmetrics ``Metric`` s over everything seen on all processes (padded duplicates count too)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_multimix.targets import outside_classes

_BLOCK_ELEMENTS = 1 << 22  # entries of one block of the pairwise matrix (32 MiB in float64)


def _check_embeddings(embeddings: Tensor, where: str) -> None:
    if not isinstance(embeddings, Tensor) or embeddings.ndim != 2 or not embeddings.is_floating_point():
        shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
        raise ValueError(f"{where}: embeddings must be a floating (N, d) tensor, got {shape}.")


def _check_labels(labels: Tensor, n: int, num_classes: Optional[int], where: str) -> None:
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.shape[0] != n or labels.is_floating_point():
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"{where}: labels must be integer class indices of shape ({n},), got {shape}.")
    classes = num_classes if num_classes is not None else int(labels.max()) + 1 if labels.numel() else 1
    if bool(outside_classes(labels, classes).any()):
        raise ValueError(f"{where}: labels must lie in [0, {num_classes}), got [{int(labels.min())}, "
                         f"{int(labels.max())}].")


def _wide(device: torch.device) -> torch.dtype:
    """float64 for the arithmetic, except on Apple's MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


def _normalize(embeddings: Tensor) -> Tensor:
    return F.normalize(embeddings.detach().to(_wide(embeddings.device)), dim=1)


def _alignment_update(embeddings: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class count, vector sum and sum of squared norms of the normalised embeddings."""
    u = _normalize(embeddings)
    labels = labels.long()
    counts = torch.bincount(labels, minlength=num_classes).to(u.dtype)
    sums = torch.zeros(num_classes, u.shape[1], dtype=u.dtype, device=u.device).index_add_(0, labels, u)
    squares = torch.zeros(num_classes, dtype=u.dtype, device=u.device).index_add_(0, labels, (u * u).sum(1))
    return counts, sums, squares


def _alignment_compute(counts: Tensor, sums: Tensor, squares: Tensor) -> Tensor:
    wide = _wide(counts.device)
    counts, sums, squares = counts.to(wide), sums.to(wide), squares.to(wide)
    # within a class, sum_{i<j} ||u_i - u_j||^2 = n q - ||s||^2: exact all pairs from the sums
    pair_sums = (counts * squares - (sums * sums).sum(1)).clamp_min(0.0)
    pairs = (counts * (counts - 1) / 2).sum()
    if pairs == 0:
        return torch.tensor(float("nan"), device=counts.device)
    return (pair_sums.sum() / pairs).float()


def embedding_alignment(embeddings: Tensor, labels: Tensor) -> Tensor:
    """Mean squared distance of L2-normalised ``(N, d)`` embeddings over same-class pairs ``i != j`` (NaN if none).

    Example:
        >>> # (1, 0) and (0, 1) share class 0: ||(1, -1)||^2 = 2; (-1, 0) is alone in class 1
        >>> embedding_alignment(torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]]), torch.tensor([0, 0, 1]))
        tensor(2.)
    """
    _check_embeddings(embeddings, "embedding_alignment")
    _check_labels(labels, embeddings.shape[0], None, "embedding_alignment")
    num_classes = int(labels.max()) + 1 if labels.numel() else 1
    return _alignment_compute(*_alignment_update(embeddings, labels, num_classes))


def _uniformity_compute(u: Tensor, t: float) -> Tensor:
    """``log mean_{i != j} exp(-t ||u_i - u_j||^2)`` of the (already normalised) rows of ``u``, in row blocks."""
    n = u.shape[0]
    if n < 2:
        return torch.tensor(float("nan"), device=u.device)
    u = u.to(_wide(u.device))
    squares = (u * u).sum(1)
    rows = max(1, _BLOCK_ELEMENTS // n)
    total = torch.zeros((), dtype=u.dtype, device=u.device)
    for start in range(0, n, rows):
        block = u[start:start + rows]
        distances = (squares[start:start + rows, None] + squares[None, :] - 2.0 * block @ u.T).clamp_min(0.0)
        kernel = torch.exp(-t * distances)
        diagonal = torch.arange(block.shape[0], device=u.device)
        kernel[diagonal, diagonal + start] = 0.0  # pairs i != j only
        total = total + kernel.sum()
    return (torch.log(total) - math.log(n * (n - 1))).float()


def embedding_uniformity(embeddings: Tensor, t: float = 2.0) -> Tensor:
    """``log mean exp(-t ||u_i - u_j||^2)`` over pairs ``i != j`` of L2-normalised ``(N, d)`` rows (NaN if ``N < 2``).

    Example:
        >>> # squared distances 2, 4, 2 between (1, 0), (0, 1), (-1, 0): log((2 e^-4 + e^-8) / 3)
        >>> round(embedding_uniformity(torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])).item(), 4)
        -4.3963
    """
    _check_embeddings(embeddings, "embedding_uniformity")
    _check_t(t)
    return _uniformity_compute(_normalize(embeddings), t)


def _check_t(t: float) -> None:
    if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
        raise ValueError(f"uniformity: t={t!r}; expected a finite value > 0 (Wang and Isola use t=2).")


class EmbeddingAlignment(Metric):
    """:func:`embedding_alignment` from per-class sums in constant memory; labels in ``[0, num_classes)``.

    Example:
        >>> metric = EmbeddingAlignment(num_classes=2, embedding_dim=2)
        >>> metric.update(torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
        >>> metric.update(torch.tensor([[0.0, 3.0], [-1.0, 0.0]]), torch.tensor([0, 1]))
        >>> metric.compute()  # the pair (1, 0), (0, 1) spans two batches
        tensor(2.)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    counts: Tensor
    sums: Tensor
    squares: Tensor

    def __init__(self, num_classes: int, embedding_dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name, value in (("num_classes", num_classes), ("embedding_dim", embedding_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EmbeddingAlignment: {name}={value!r}; expected an int >= 1.")
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        # float32 states live on any device; each batch's sums are formed in float64 where it exists
        self.add_state("counts", torch.zeros(num_classes), dist_reduce_fx="sum")
        self.add_state("sums", torch.zeros(num_classes, embedding_dim), dist_reduce_fx="sum")
        self.add_state("squares", torch.zeros(num_classes), dist_reduce_fx="sum")

    def update(self, embeddings: Tensor, labels: Tensor) -> None:
        _check_embeddings(embeddings, "EmbeddingAlignment")
        if embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"EmbeddingAlignment: embeddings have {embeddings.shape[1]} dimensions, the metric was "
                             f"built with embedding_dim={self.embedding_dim}.")
        _check_labels(labels, embeddings.shape[0], self.num_classes, "EmbeddingAlignment")
        for state, batch in zip((self.counts, self.sums, self.squares),
                                _alignment_update(embeddings, labels, self.num_classes)):
            state += batch.to(state.dtype)

    def compute(self) -> Tensor:
        return _alignment_compute(self.counts, self.sums, self.squares)


class EmbeddingUniformity(Metric):
    """:func:`embedding_uniformity`; keeps every normalised embedding until ``compute`` (``O(N^2 d)`` time).

    Example:
        >>> metric = EmbeddingUniformity()
        >>> metric.update(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
        >>> metric.update(torch.tensor([[-1.0, 0.0]]))
        >>> round(metric.compute().item(), 4) == round(math.log((2 * math.exp(-4) + math.exp(-8)) / 3), 4)
        True
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    embeddings: list[Tensor]

    def __init__(self, t: float = 2.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_t(t)
        self.t = float(t)
        self.add_state("embeddings", [], dist_reduce_fx="cat")

    def update(self, embeddings: Tensor) -> None:
        _check_embeddings(embeddings, "EmbeddingUniformity")
        self.embeddings.append(_normalize(embeddings).float())

    def compute(self) -> Tensor:
        if isinstance(self.embeddings, list) and not self.embeddings:
            return torch.tensor(float("nan"), device=self.device)
        return _uniformity_compute(dim_zero_cat(self.embeddings), self.t)
