"""The data sets by name, and the Lightning ``DataModule`` used by ``examples/train.py``."""

from __future__ import annotations

from typing import Literal, Optional

import lightning.pytorch as L
from torch.utils.data import DataLoader

from lightning_multimix.demo.data.cifar import CIFAR_LAYOUT, load_cifar
from lightning_multimix.demo.data.fashion_mnist import load_fashion_mnist
from lightning_multimix.demo.data.idx import PathLike
from lightning_multimix.demo.data.images import ImageSet

DATASETS = ("fashion_mnist", "cifar10", "cifar100")


def load_dataset(name: str, data_dir: Optional[PathLike] = None, *, verify_checksums: bool = True
                 ) -> tuple[ImageSet, ImageSet]:
    """``(train, test)`` of ``name`` in :data:`DATASETS`; ``data_dir=None`` only for the embedded Fashion-MNIST."""
    if name == "fashion_mnist":
        return load_fashion_mnist(data_dir)
    if name in CIFAR_LAYOUT:
        if data_dir is None:
            raise ValueError(f"{name}: pass data_dir, the directory holding '{CIFAR_LAYOUT[name][0]}/' (this package "
                             "ships only a Fashion-MNIST subset and never downloads data).")
        return load_cifar(data_dir, name, verify_checksums=verify_checksums)  # type: ignore[arg-type]
    raise ValueError(f"Unknown dataset {name!r}; expected one of {DATASETS}.")


class ImageDataModule(L.LightningDataModule):
    """Fashion-MNIST (embedded subset or full) or CIFAR-10/100 from disk, for ``Trainer.fit``/``test``.

    Validation and test both use the data set's test split (as in the mixup papers, which report the test accuracy
    of the last epoch); there is no model selection on it.

    Args:
        dataset: ``"fashion_mnist"``, ``"cifar10"`` or ``"cifar100"``.
        data_dir: see :func:`load_fashion_mnist` (``None``: the embedded subset) and :func:`load_cifar` (required).
        batch_size: training and evaluation batch size; training drops the last incomplete batch (MultiMix needs
            at least two examples, and equal batches keep its cost constant).
        num_workers: ``DataLoader`` workers.
        augment: random crop (padding 4) + horizontal flip on the training set; ``None``: on for CIFAR, off for
            Fashion-MNIST.
        verify_checksums: CIFAR only; see :func:`load_cifar`.

    Example:
        >>> dm = ImageDataModule("fashion_mnist", batch_size=64)
        >>> dm.num_classes, dm.in_channels
        (10, 1)
        >>> dm.setup("fit")
        >>> images, labels = next(iter(dm.train_dataloader()))
        >>> tuple(images.shape), labels.dtype
        ((64, 1, 28, 28), torch.int64)
    """

    def __init__(
        self,
        dataset: Literal["fashion_mnist", "cifar10", "cifar100"] = "fashion_mnist",
        data_dir: Optional[str] = None,
        batch_size: int = 128,
        num_workers: int = 0,
        augment: Optional[bool] = None,
        verify_checksums: bool = True,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"ImageDataModule: dataset={dataset!r}; expected one of {DATASETS}.")
        if dataset != "fashion_mnist" and data_dir is None:
            raise ValueError(f"ImageDataModule: dataset={dataset!r} needs data_dir, the directory holding "
                             f"'{CIFAR_LAYOUT[dataset][0]}/'.")
        if not isinstance(batch_size, int) or batch_size < 2:
            raise ValueError(f"ImageDataModule: batch_size={batch_size!r}; expected an int >= 2.")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"ImageDataModule: num_workers={num_workers!r}; expected an int >= 0.")
        self.save_hyperparameters()
        self.dataset, self.data_dir, self.batch_size, self.num_workers = dataset, data_dir, batch_size, num_workers
        self.augment = dataset != "fashion_mnist" if augment is None else augment
        self.verify_checksums = verify_checksums
        self.train_set: Optional[ImageSet] = None
        self.test_set: Optional[ImageSet] = None

    @property
    def num_classes(self) -> int:
        return 100 if self.dataset == "cifar100" else 10

    @property
    def in_channels(self) -> int:
        return 1 if self.dataset == "fashion_mnist" else 3

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is None:
            train, test = load_dataset(self.dataset, self.data_dir, verify_checksums=self.verify_checksums)
            self.train_set, self.test_set = train.with_augment(self.augment), test

    def _loader(self, data: Optional[ImageSet], train: bool) -> DataLoader:
        if data is None:
            raise RuntimeError("ImageDataModule: call setup() first (the Trainer does).")
        return DataLoader(data, batch_size=self.batch_size, shuffle=train, drop_last=train,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
