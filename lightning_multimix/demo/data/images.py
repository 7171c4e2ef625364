"""What the loaders return: :class:`ImageSet`, a map-style ``Dataset`` of ``(image, label)``, and its helpers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset


@dataclass(frozen=True, eq=False)
class ImageSet(Dataset):
    """Images and integer labels in memory; item ``i`` is ``(normalised float image (C, H, W), label)``.

    Args:
        images: ``(N, C, H, W)`` ``uint8`` pixels.
        labels: ``(N,)`` ``int64`` class indices in ``[0, len(classes))``.
        classes: class names.
        mean, std: per-channel normalisation of the pixel values scaled to ``[0, 1]``.
        augment: training augmentation: random crop with 4 pixels of zero padding and random horizontal flip (the
            usual CIFAR augmentation), drawn from torch's global RNG (seed it, e.g. with ``L.seed_everything``).

    Example:
        >>> data = ImageSet(torch.full((4, 1, 2, 2), 255, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), ("a", "b"),
        ...                 mean=(0.5,), std=(0.5,))
        >>> image, label = data[1]
        >>> image.shape, image.max().item(), label.item(), len(data), data.num_classes
        (torch.Size([1, 2, 2]), 1.0, 1, 4, 2)
    """

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    augment: bool = False

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"ImageSet: images must be (N, C, H, W) uint8, got {images.dtype} {tuple(images.shape)}.")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.dtype != torch.int64:
            raise ValueError(f"ImageSet: labels must be ({images.shape[0]},) int64 to match the images, got "
                             f"{labels.dtype} {tuple(labels.shape)}.")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(self.classes)):
            raise ValueError(f"ImageSet: labels must lie in [0, {len(self.classes)}) (one per class name), got "
                             f"[{int(labels.min())}, {int(labels.max())}].")
        channels = images.shape[1]
        if len(self.mean) not in (1, channels) or len(self.std) not in (1, channels):
            raise ValueError(f"ImageSet: mean and std need 1 or {channels} values, got {self.mean} and {self.std}.")
        # normalisation constants, broadcast over (C, H, W)
        object.__setattr__(self, "_mean", torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1))
        object.__setattr__(self, "_std", torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1))

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = (self.images[index].float() / 255.0 - self._mean) / self._std
        if self.augment:
            image = random_crop_flip(image)
        return image, self.labels[index]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    def class_counts(self) -> list[int]:
        """Number of examples of each class."""
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def subset(self, indices: Union[Tensor, list[int]]) -> "ImageSet":
        """The examples at ``indices``, in that order."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return dataclasses.replace(self, images=self.images[indices], labels=self.labels[indices])

    def balanced_subset(self, per_class: int) -> "ImageSet":
        """The first ``per_class`` examples of each class (in the order of the data set), kept in that order.

        Example:
            >>> labels = torch.tensor([0, 1, 1, 0, 1, 0])
            >>> data = ImageSet(torch.zeros(6, 1, 1, 1, dtype=torch.uint8), labels, ("a", "b"))
            >>> data.balanced_subset(2).labels
            tensor([0, 1, 1, 0])
        """
        return self.subset(balanced_indices(self.labels, per_class, self.num_classes))

    def with_augment(self, augment: bool) -> "ImageSet":
        return dataclasses.replace(self, augment=augment)

    def with_label_noise(self, fraction: float, seed: int = 0) -> "ImageSet":
        """A copy in which ``round(fraction * N)`` examples, chosen at random, have a label drawn uniformly from all
        classes (so about ``1 / C`` of them keep their true label): symmetric label noise, for the noisy-label
        scenario. The same ``seed`` gives the same noise.

        Example:
            >>> data = ImageSet(torch.zeros(100, 1, 1, 1, dtype=torch.uint8), torch.arange(100) % 10,
            ...                 tuple("abcdefghij"))
            >>> noisy = data.with_label_noise(0.4, seed=0)
            >>> 0.4 * (1 - 1 / 10) - 0.15 < float((noisy.labels != data.labels).float().mean()) <= 0.4
            True
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"ImageSet.with_label_noise: fraction={fraction!r}; expected a value in [0, 1].")
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(self), generator=generator)[: round(fraction * len(self))]
        labels = self.labels.clone()
        labels[chosen] = torch.randint(0, self.num_classes, (chosen.numel(),), generator=generator)
        return dataclasses.replace(self, labels=labels)


def balanced_indices(labels: Tensor, per_class: int, num_classes: Optional[int] = None) -> Tensor:
    """Sorted indices of the first ``per_class`` examples of each class; raises if a class has fewer.

    Example:
        >>> balanced_indices(torch.tensor([2, 0, 0, 1, 2, 1, 0]), 1)
        tensor([0, 1, 3])
    """
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    chosen = []
    for c in range(num_classes):
        found = torch.nonzero(labels == c).flatten()
        if found.numel() < per_class:
            raise ValueError(
                f"balanced_indices: class {c} has {found.numel()} examples, fewer than per_class={per_class}."
            )
        chosen.append(found[:per_class])
    return torch.cat(chosen).sort().values


def random_crop_flip(image: Tensor, padding: int = 4) -> Tensor:
    """Random crop of a ``(C, H, W)`` image after zero padding by ``padding``, then a random horizontal flip.

    Example:
        >>> random_crop_flip(torch.ones(3, 8, 8)).shape
        torch.Size([3, 8, 8])
    """
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (padding, padding, padding, padding))
    top, left = torch.randint(0, 2 * padding + 1, (2,)).tolist()
    image = padded[:, top:top + h, left:left + w]
    if torch.rand(()) < 0.5:
        image = image.flip(-1)
    return image
