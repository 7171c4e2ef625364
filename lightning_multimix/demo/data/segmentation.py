"""Segmentation of Fashion-MNIST composites: the 2x2 composites of :mod:`~lightning_multimix.demo.data.composites`
with a class per pixel.

:func:`make_segmentation_composites` makes the composites of :func:`~lightning_multimix.demo.data.make_composites`
(one :func:`~lightning_multimix.demo.data.composites.draw_composites`: the same items in the same cells for the same
split, ``count`` and ``seed``) and labels each pixel (:func:`composite_masks`): the class of the item whose cell it
is in where that item's pixel is foreground, a raw intensity above :data:`FOREGROUND_THRESHOLD` (25 of 255, a tenth
of the range: the garment without the faint halo around it), and background elsewhere (dark pixels and empty cells).
Background is the last class, index ``len(split.classes)``: 10 for Fashion-MNIST, so the items keep their
Fashion-MNIST indices; 11 classes in all. Background covers about three quarters of a composite.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_multimix.demo.data.composites import GRID, ITEM_PROBABILITY, draw_composites
from lightning_multimix.demo.data.images import ImageSet

#: a pixel of an item is foreground where its raw intensity (0..255, any channel) is above this
FOREGROUND_THRESHOLD = 25
#: the name of the background class, the last one
BACKGROUND_NAME = "background"


@dataclass(frozen=True, eq=False)
class SegmentationSet(Dataset):
    """Images and per-pixel masks in memory; item ``i`` is ``(normalised float image (C, H, W), mask (H, W) int64)``.

    Args:
        images: ``(N, C, H, W)`` ``uint8`` pixels.
        masks: ``(N, H, W)`` ``int64`` class indices in ``[0, len(classes))``, the last class being the background.
        classes: the class names, background last.
        cells: ``(N, GRID * GRID)`` int64, the class of the item in each cell (row-major), -1 for an empty cell.
        sources: ``(N, GRID * GRID)`` int64, the index of each cell's item in the split it came from, -1 if empty.
        mean, std: per-channel normalisation of the pixel values scaled to ``[0, 1]``.
    """

    images: Tensor
    masks: Tensor
    classes: tuple[str, ...]
    cells: Tensor
    sources: Tensor
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"SegmentationSet: images must be (N, C, H, W) uint8, got {self.images.dtype} "
                             f"{tuple(self.images.shape)}.")
        n, _, height, width = self.images.shape
        if self.masks.shape != (n, height, width) or self.masks.dtype != torch.int64:
            raise ValueError(f"SegmentationSet: masks must be ({n}, {height}, {width}) int64, got {self.masks.dtype} "
                             f"{tuple(self.masks.shape)}.")
        if self.masks.numel() and (int(self.masks.min()) < 0 or int(self.masks.max()) >= len(self.classes)):
            raise ValueError(f"SegmentationSet: masks must lie in [0, {len(self.classes)}) (one per class name), got "
                             f"[{int(self.masks.min())}, {int(self.masks.max())}].")
        object.__setattr__(self, "_mean", torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1))
        object.__setattr__(self, "_std", torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1))

    def __len__(self) -> int:
        return self.masks.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return (self.images[index].float() / 255.0 - self._mean) / self._std, self.masks[index]

    @property
    def num_classes(self) -> int:
        """The classes of the masks, background included."""
        return len(self.classes)

    @property
    def background(self) -> int:
        """The index of the background class: the last one."""
        return len(self.classes) - 1

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    def subset(self, indices: Union[Tensor, range, list[int]]) -> "SegmentationSet":
        """The examples at ``indices``, in that order."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return dataclasses.replace(self, images=self.images[indices], masks=self.masks[indices],
                                   cells=self.cells[indices], sources=self.sources[indices])


def composite_masks(images: Tensor, cells: Tensor, background: int, threshold: int = FOREGROUND_THRESHOLD) -> Tensor:
    """``(N, H, W)`` int64 masks of ``(N, C, H, W)`` uint8 composites whose ``GRID x GRID`` cells hold items of the
    classes ``cells`` (``(N, GRID * GRID)``, row-major, -1 for an empty cell): a cell's class where a pixel is above
    ``threshold`` in any channel, ``background`` elsewhere.

    Example:
        >>> images = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
        >>> images[0, 0, 0, 0], images[0, 0, 3, 3], images[0, 0, 0, 3] = 200, 30, 10
        >>> composite_masks(images, torch.tensor([[1, 2, -1, 7]]), background=10)
        tensor([[[ 1, 10, 10, 10],
                 [10, 10, 10, 10],
                 [10, 10, 10, 10],
                 [10, 10, 10,  7]]])
    """
    count, _, height, width = images.shape
    per_pixel = cells.view(count, GRID, GRID).repeat_interleave(height // GRID, 1).repeat_interleave(width // GRID, 2)
    foreground = (images > threshold).any(1) & (per_pixel >= 0)
    return torch.where(foreground, per_pixel, background)


def make_segmentation_composites(split: ImageSet, count: int, seed: int,
                                 item_probability: float = ITEM_PROBABILITY,
                                 threshold: int = FOREGROUND_THRESHOLD) -> SegmentationSet:
    """``count`` 2x2 composites of the images of ``split`` with their masks (see the module's docstring): the images,
    ``cells`` and ``sources`` of ``make_composites(split, count, seed, item_probability)``, bit for bit.

    Example:
        >>> from lightning_multimix.demo.data import load_fashion_mnist
        >>> train, _ = load_fashion_mnist()
        >>> data = make_segmentation_composites(train, 100, seed=0)
        >>> tuple(data.images.shape), tuple(data.masks.shape), data.num_classes, data.classes[data.background]
        ((100, 1, 56, 56), (100, 56, 56), 11, 'background')
    """
    images, cells, sources = draw_composites(split, count, seed, item_probability)
    masks = composite_masks(images, cells, background=split.num_classes, threshold=threshold)
    return SegmentationSet(images, masks, (*split.classes, BACKGROUND_NAME), cells, sources, split.mean, split.std)
