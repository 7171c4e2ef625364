"""Datasets without downloads: a Fashion-MNIST subset shipped in the package, full Fashion-MNIST and CIFAR from disk.

* :func:`read_idx` / :func:`write_idx`: the idx format of (Fashion-)MNIST, plain or gzip-compressed, validated.
* :func:`load_fashion_mnist`: ``data_dir=None`` gives the embedded class-balanced subset (10,000 training and 2,000
  test images, 1,000 and 200 per class; see ``data_files/README.md``); a directory gives the full data set from the
  standard file names.
* :func:`load_cifar`: CIFAR-10/100 from the "python version" batches on disk, through torchvision's
  ``datasets.CIFAR10/100(root, download=False)`` (which checks the files' md5), or with our own reader when
  ``verify_checksums=False`` (for files that are not byte-identical to the official release, e.g. test fixtures).
* :func:`make_composites`: multi-label 2x2 composites of Fashion-MNIST items (:class:`MultiLabelSet`, multi-hot
  targets), for the demo's ``--task multilabel``; :func:`make_segmentation_composites`: the same composites with a
  class per pixel (:class:`SegmentationSet`, background the last class), for ``--task segment``.
* :class:`ImageSet`: what the loaders return, a map-style ``Dataset`` of ``(image, label)``;
  :class:`ImageDataModule`: the Lightning wrapper used by ``examples/train.py``.

Nothing here downloads anything. The readers need only numpy and torch; torchvision is imported only by
``load_cifar(..., verify_checksums=True)``.
"""

from lightning_multimix.demo.data.cifar import CIFAR_LAYOUT, CIFAR_MEAN, CIFAR_STD, load_cifar, write_cifar
from lightning_multimix.demo.data.composites import MultiLabelSet, draw_composites, make_composites
from lightning_multimix.demo.data.datamodule import DATASETS, ImageDataModule, load_dataset
from lightning_multimix.demo.data.fashion_mnist import (
    EMBEDDED_DIR,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist,
    write_fashion_mnist_subset,
)
from lightning_multimix.demo.data.idx import DataFormatError, PathLike, read_idx, write_idx
from lightning_multimix.demo.data.images import ImageSet, balanced_indices, random_crop_flip
from lightning_multimix.demo.data.segmentation import (FOREGROUND_THRESHOLD, SegmentationSet, composite_masks,
                                                       make_segmentation_composites)

__all__ = [
    "CIFAR_LAYOUT", "CIFAR_MEAN", "CIFAR_STD", "DATASETS", "EMBEDDED_DIR", "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "FOREGROUND_THRESHOLD", "DataFormatError",
    "ImageDataModule", "ImageSet", "MultiLabelSet", "PathLike", "SegmentationSet", "balanced_indices",
    "composite_masks", "draw_composites", "load_cifar", "load_dataset", "load_fashion_mnist", "make_composites",
    "make_segmentation_composites", "random_crop_flip", "read_idx", "write_cifar", "write_fashion_mnist_subset",
    "write_idx",
]
