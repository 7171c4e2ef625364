"""Multi-label Fashion-MNIST: 2x2 composites of items, each labelled with the set of classes it shows.

:func:`make_composites` builds, from one split of an :class:`ImageSet` of 28x28 images (e.g. the Fashion-MNIST subset
shipped in the package), ``count`` images of 56x56 pixels: a 2x2 grid of 28x28 cells, each cell holding an item with
probability ``item_probability`` (0.5 by default) independently of the others, conditioned on at least one item per
image (an image drawn with four empty cells is drawn again), and empty cells black (pixel 0). The items are distinct
images of the split, drawn without replacement in a random order, so no item appears twice and training composites
(from the training split) never share an item with test composites (from the test split). The targets are the
multi-hot set of the classes present: ``(count, 10)`` float32, 1 for each class shown at least once. With
``item_probability=0.5`` an image holds 2.13 items on average (1 to 4) and about 2 distinct classes, so each class is
present in about a fifth of the images (the chance level of the average precision).

Everything is drawn from ``torch.Generator().manual_seed(seed)`` (:func:`draw_composites`, shared with the
segmentation masks of :mod:`lightning_multimix.demo.data.segmentation`): the same split, ``count``, ``seed`` and
``item_probability`` give the same composites, bit for bit, on any machine.

:meth:`MultiLabelSet.with_label_noise` makes noisy annotations, as partial labelling does: each present label is
dropped with probability ``drop`` and each absent label added with probability ``add``, independently (an image may
then have no label at all).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_multimix.demo.data.images import ImageSet

#: cells per side of a composite, and the default probability that a cell holds an item
GRID, ITEM_PROBABILITY = 2, 0.5


@dataclass(frozen=True, eq=False)
class MultiLabelSet(Dataset):
    """Images and multi-hot targets in memory; item ``i`` is ``(normalised float image (C, H, W), targets (K,))``.

    Args:
        images: ``(N, C, H, W)`` ``uint8`` pixels.
        targets: ``(N, K)`` float32 targets in ``[0, 1]`` (multi-hot; noisy after :meth:`with_label_noise`).
        classes: the ``K`` class names.
        cells: ``(N, GRID * GRID)`` int64, the class of the item in each cell (row-major), -1 for an empty cell.
        sources: ``(N, GRID * GRID)`` int64, the index of each cell's item in the split it came from, -1 if empty.
        mean, std: per-channel normalisation of the pixel values scaled to ``[0, 1]``.
    """

    images: Tensor
    targets: Tensor
    classes: tuple[str, ...]
    cells: Tensor
    sources: Tensor
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"MultiLabelSet: images must be (N, C, H, W) uint8, got {self.images.dtype} "
                             f"{tuple(self.images.shape)}.")
        if self.targets.shape != (self.images.shape[0], len(self.classes)) or self.targets.dtype != torch.float32:
            raise ValueError(f"MultiLabelSet: targets must be ({self.images.shape[0]}, {len(self.classes)}) float32, "
                             f"got {self.targets.dtype} {tuple(self.targets.shape)}.")
        object.__setattr__(self, "_mean", torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1))
        object.__setattr__(self, "_std", torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1))

    def __len__(self) -> int:
        return self.targets.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return (self.images[index].float() / 255.0 - self._mean) / self._std, self.targets[index]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    def subset(self, indices: Union[Tensor, range, list[int]]) -> "MultiLabelSet":
        """The examples at ``indices``, in that order."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return dataclasses.replace(self, images=self.images[indices], targets=self.targets[indices],
                                   cells=self.cells[indices], sources=self.sources[indices])

    def with_label_noise(self, drop: float, add: float, seed: int = 0) -> "MultiLabelSet":
        """A copy with noisy annotations: each present label (target > 0.5) dropped with probability ``drop``, each
        absent label added with probability ``add``, independently; the images (and ``cells``) are unchanged. The
        same ``seed`` gives the same noise.

        Example:
            >>> cells = torch.zeros(1000, 4, dtype=torch.long)
            >>> clean = MultiLabelSet(torch.zeros(1000, 1, 2, 2, dtype=torch.uint8),
            ...                       torch.eye(10)[torch.arange(1000) % 10], tuple("abcdefghij"), cells, cells)
            >>> noisy = clean.with_label_noise(0.3, 0.05, seed=0).targets
            >>> round(float(noisy[clean.targets == 1].mean()), 1), round(float(noisy[clean.targets == 0].mean()), 2)
            (0.7, 0.05)
        """
        for name, value in (("drop", drop), ("add", add)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"MultiLabelSet.with_label_noise: {name}={value!r}; expected a value in [0, 1].")
        draws = torch.rand(self.targets.shape, generator=torch.Generator().manual_seed(seed))
        present = self.targets > 0.5
        targets = torch.where(present, draws >= drop, draws < add).float()
        return dataclasses.replace(self, targets=targets)


def draw_composites(split: ImageSet, count: int, seed: int, item_probability: float = ITEM_PROBABILITY
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """The draw behind every composite task: ``(images (count, C, 2H, 2W) uint8, cells, sources)``, ``cells`` and
    ``sources`` as in :class:`MultiLabelSet` (see the module's docstring); deterministic in ``seed``. The multi-label
    targets (:func:`make_composites`) and the segmentation masks
    (:func:`~lightning_multimix.demo.data.segmentation.make_segmentation_composites`) are both made from it, so the
    two tasks see the same items in the same cells for the same split, ``count`` and ``seed``."""
    if not 0.0 < item_probability <= 1.0:
        raise ValueError(f"make_composites: item_probability={item_probability!r}; expected a value in (0, 1].")
    generator = torch.Generator().manual_seed(seed)
    occupied = torch.rand(count, GRID * GRID, generator=generator) < item_probability
    empty = ~occupied.any(1)
    while empty.any():  # at least one item per image: draw the empty ones again
        occupied[empty] = torch.rand(int(empty.sum()), GRID * GRID, generator=generator) < item_probability
        empty = ~occupied.any(1)
    items = int(occupied.sum())
    if items > len(split):
        raise ValueError(f"make_composites: {count} composites need {items} distinct items, the split has only "
                         f"{len(split)}; ask for fewer composites.")
    sources = torch.full((count, GRID * GRID), -1, dtype=torch.long)
    sources[occupied] = torch.randperm(len(split), generator=generator)[:items]
    cells = torch.where(occupied, split.labels[sources.clamp(min=0)], -1)
    size = split.images.shape[-1]
    images = torch.zeros(count, split.in_channels, GRID * size, GRID * size, dtype=torch.uint8)
    for cell in range(GRID * GRID):
        row, column = divmod(cell, GRID)
        where = occupied[:, cell]
        images[where, :, row * size:(row + 1) * size, column * size:(column + 1) * size] = \
            split.images[sources[where, cell]]
    return images, cells, sources


def make_composites(split: ImageSet, count: int, seed: int, item_probability: float = ITEM_PROBABILITY
                    ) -> MultiLabelSet:
    """``count`` 2x2 composites of the images of ``split`` (see the module's docstring); deterministic in ``seed``.

    Example:
        >>> from lightning_multimix.demo.data import load_fashion_mnist
        >>> train, _ = load_fashion_mnist()
        >>> data = make_composites(train, 100, seed=0)
        >>> tuple(data.images.shape), tuple(data.targets.shape), bool((data.targets.sum(1) >= 1).all())
        ((100, 1, 56, 56), (100, 10), True)
    """
    images, cells, sources = draw_composites(split, count, seed, item_probability)
    occupied = cells >= 0
    targets = torch.zeros(count, split.num_classes)
    targets[torch.arange(count).repeat_interleave(GRID * GRID)[occupied.flatten()], cells[occupied]] = 1.0
    return MultiLabelSet(images, targets, split.classes, cells, sources, split.mean, split.std)
