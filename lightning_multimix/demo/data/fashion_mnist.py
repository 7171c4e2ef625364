"""Fashion-MNIST: the class-balanced subset shipped in the package (``data_files/``), or the full set from disk."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from lightning_multimix.demo.data.idx import DataFormatError, PathLike, read_idx, write_idx
from lightning_multimix.demo.data.images import ImageSet

#: Directory of the embedded Fashion-MNIST subset (idx.gz files with the standard names, LICENSE, README.md).
EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "data_files"

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: The standard file names of Fashion-MNIST (and MNIST): ``split -> (images, labels)``.
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
#: Mean and standard deviation of the pixel values (in [0, 1]) of the full Fashion-MNIST training set.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)


def load_fashion_mnist(data_dir: Optional[PathLike] = None) -> tuple[ImageSet, ImageSet]:
    """Fashion-MNIST as ``(train, test)`` :class:`ImageSet` s of 28x28 grayscale images in 10 classes.

    Args:
        data_dir: ``None``: the subset shipped in this package (10,000 training and 2,000 test images, the first
            1,000 and 200 of each class in file order; see ``lightning_multimix/demo/data_files/README.md``). A
            directory: the full data set, read from the standard file names (``train-images-idx3-ubyte.gz``,
            ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``, each also
            accepted without ``.gz``) in that directory or in its ``FashionMNIST/raw`` (torchvision's layout).

    Raises:
        FileNotFoundError: a file is missing; the message names the path and where to get the files.
        DataFormatError: a file is corrupt or images and labels do not match; the message names the path.

    Example:
        >>> train, test = load_fashion_mnist()
        >>> len(train), len(test), tuple(train.images.shape[1:]), train.classes[9]
        (10000, 2000, (1, 28, 28), 'Ankle boot')
        >>> set(train.class_counts()), set(test.class_counts())
        ({1000}, {200})
    """
    root = EMBEDDED_DIR if data_dir is None else Path(data_dir)
    if data_dir is not None and not (root / FASHION_MNIST_FILES["train"][0]).exists() \
            and not (root / FASHION_MNIST_FILES["train"][0][:-3]).exists() and (root / "FashionMNIST" / "raw").is_dir():
        root = root / "FashionMNIST" / "raw"
    splits = []
    for split, (image_name, label_name) in FASHION_MNIST_FILES.items():
        image_path, label_path = _find_idx(root, image_name), _find_idx(root, label_name)
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.dtype != torch.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != (28, 28):
            raise DataFormatError(f"'{image_path}': expected (N, 28, 28) uint8 Fashion-MNIST images, got "
                                  f"{tuple(images.shape)} {images.dtype}.")
        if labels.dtype != torch.uint8 or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataFormatError(f"'{label_path}': expected ({images.shape[0]},) uint8 labels matching "
                                  f"'{image_path}', got {tuple(labels.shape)} {labels.dtype}.")
        if labels.numel() and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataFormatError(f"'{label_path}': labels must lie in [0, 10), found {int(labels.max())}.")
        splits.append(ImageSet(images.unsqueeze(1), labels.long(), FASHION_MNIST_CLASSES,
                               FASHION_MNIST_MEAN, FASHION_MNIST_STD))
    return splits[0], splits[1]


def _find_idx(root: Path, name: str) -> Path:
    for candidate in (root / name, root / name[: -len(".gz")]):
        if candidate.is_file():
            return candidate
    if root == EMBEDDED_DIR:
        raise FileNotFoundError(f"The embedded Fashion-MNIST file '{root / name}' is missing: the package is "
                                "installed incompletely. Reinstall it (`pip install -e .` keeps `data_files/`).")
    raise FileNotFoundError(
        f"Fashion-MNIST file not found: '{root / name}' (nor without .gz). Put the four standard files "
        f"({', '.join(n for pair in FASHION_MNIST_FILES.values() for n in pair)}) in '{root}' (from "
        "https://github.com/zalandoresearch/fashion-mnist, or Debian's `dataset-fashion-mnist`, which installs them "
        "in /usr/share/datasets/fashion-mnist), or pass data_dir=None for the subset shipped in the package."
    )


def write_fashion_mnist_subset(source_dir: PathLike, out_dir: PathLike, train_per_class: int = 1000,
                               test_per_class: int = 200) -> None:
    """Write the class-balanced subset of the Fashion-MNIST files in ``source_dir`` to ``out_dir`` (standard names).

    This is how ``data_files/`` was made: ``write_fashion_mnist_subset("/usr/share/datasets/fashion-mnist",
    "lightning_multimix/demo/data_files")`` (the first ``train_per_class`` / ``test_per_class`` images of each class in
    file order, kept in file order, gzip level 9 without time stamp).
    """
    train, test = load_fashion_mnist(source_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, data, per_class in (("train", train, train_per_class), ("test", test, test_per_class)):
        subset = data.balanced_subset(per_class)
        image_name, label_name = FASHION_MNIST_FILES[split]
        write_idx(out / image_name, subset.images[:, 0])
        write_idx(out / label_name, subset.labels.to(torch.uint8))
