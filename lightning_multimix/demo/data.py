"""Datasets without downloads: a Fashion-MNIST subset shipped in the package, full Fashion-MNIST and CIFAR from disk.

* :func:`read_idx` / :func:`write_idx`: the idx format of (Fashion-)MNIST, plain or gzip-compressed, validated.
* :func:`load_fashion_mnist`: ``data_dir=None`` gives the embedded class-balanced subset (10,000 training and 2,000
  test images, 1,000 and 200 per class; see ``data_files/README.md``); a directory gives the full data set from the
  standard file names.
* :func:`load_cifar`: CIFAR-10/100 from the "python version" batches on disk, through torchvision's
  ``datasets.CIFAR10/100(root, download=False)`` (which checks the files' md5), or with our own reader when
  ``verify_checksums=False`` (for files that are not byte-identical to the official release, e.g. test fixtures).
* :class:`ImageSet`: what the loaders return, a map-style ``Dataset`` of ``(image, label)``;
  :class:`ImageDataModule`: the Lightning wrapper used by ``examples/train.py``.

Nothing here downloads anything. The readers need only numpy and torch; torchvision is imported only by
``load_cifar(..., verify_checksums=True)``.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

PathLike = Union[str, os.PathLike]

#: Directory of the embedded Fashion-MNIST subset (idx.gz files with the standard names, LICENSE, README.md).
EMBEDDED_DIR = Path(__file__).resolve().parent / "data_files"

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
#: The CIFAR normalisation of AlignMixup's code (github.com/shashankvkt/AlignMixup_CVPR22, cifar10_100/main.py),
#: which uses the same values for CIFAR-10 and CIFAR-100.
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)

CIFAR_LAYOUT = {
    # name: (folder under root, training batches, test batch, meta file, key of the labels, key of the class names)
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
                "labels", "label_names"),
    "cifar100": ("cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names"),
}
DATASETS = ("fashion_mnist", "cifar10", "cifar100")

# idx type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


class DataFormatError(ValueError):
    """A data file exists but is not what it should be (truncated, wrong magic number, wrong shape, ...)."""


# ---------------------------------------------------------------------------------------------------- the idx format


def read_idx(path: PathLike) -> Tensor:
    """Read an idx file (the (Fashion-)MNIST format), gzip-compressed or not, into a tensor of its dtype and shape.

    The header is validated: two zero bytes, a known type code, the number of dimensions, then one big-endian
    ``uint32`` per dimension; the payload must have exactly the size the dimensions say.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataFormatError: the file is not a valid idx(.gz) file; the message names the path and what is wrong.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte.gz")
        >>> write_idx(path, torch.tensor([3, 1, 4], dtype=torch.uint8))
        >>> read_idx(path)
        tensor([3, 1, 4], dtype=torch.uint8)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file not found: '{path}'.")
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataFormatError(
                f"'{path}' is not a valid gzip file ({err}); the file is corrupt or truncated."
            ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFormatError(
            f"'{path}' is not an idx file: its magic number is {raw[:4].hex() or 'missing'}, expected 0000 followed "
            f"by a type code in {{{', '.join(f'{c:02x}' for c in _IDX_DTYPES)}}} and the number of dimensions."
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataFormatError(f"'{path}': idx header says {ndim} dimensions but the file ends at byte {len(raw)}.")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataFormatError(
            f"'{path}': the idx header gives shape {dims} of {dtype.name}, i.e. {expected} bytes of data, but the file "
            f"holds {len(raw) - header}; the file is truncated or corrupt."
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def write_idx(path: PathLike, tensor: Tensor, *, compress: Optional[bool] = None, level: int = 9) -> None:
    """Write ``tensor`` as an idx file; gzip-compressed when ``compress`` (default: when ``path`` ends in ``.gz``).

    The gzip header carries no time stamp, so equal tensors give byte-identical files.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "images-idx3-ubyte")
        >>> write_idx(path, torch.zeros(2, 3, 3, dtype=torch.uint8))
        >>> open(path, "rb").read(16).hex()
        '00000803000000020000000300000003'
    """
    array = tensor.detach().cpu().numpy()
    native = array.dtype.newbyteorder("=")
    if native not in _IDX_CODES:
        raise ValueError(f"write_idx: dtype {tensor.dtype} has no idx type code; use uint8, int8, int16, int32, "
                         "float32 or float64.")
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"write_idx: need a tensor with 1 to 255 dimensions, got shape {tuple(tensor.shape)}.")
    code = _IDX_CODES[native]
    payload = (bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
               + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes())
    path = Path(path)
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        payload = gzip.compress(payload, compresslevel=level, mtime=0)
    path.write_bytes(payload)


# ---------------------------------------------------------------------------------------------------- the data set


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


# ---------------------------------------------------------------------------------------------------- Fashion-MNIST


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


# ---------------------------------------------------------------------------------------------------- CIFAR


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches only: dicts, lists, strings, bytes and numpy arrays; refuses any other class."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR batch")


def _read_cifar_pickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file not found: '{path}'.")
    try:
        with path.open("rb") as f:
            content = _CifarUnpickler(f, encoding="latin1").load()
    except Exception as err:  # pickle raises many types on bad input
        raise DataFormatError(f"'{path}' is not a CIFAR python batch ({type(err).__name__}: {err}).") from None
    if not isinstance(content, dict):
        raise DataFormatError(f"'{path}' is not a CIFAR python batch: it holds a {type(content).__name__}, not a dict.")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, list[int]]:
    content = _read_cifar_pickle(path)
    if "data" not in content or label_key not in content:
        raise DataFormatError(f"'{path}' is not a CIFAR batch: it has keys {sorted(content)}, expected 'data' and "
                              f"{label_key!r}.")
    data, labels = np.asarray(content["data"]), list(content[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != len(labels):
        raise DataFormatError(f"'{path}': 'data' must be (N, 3072) uint8 with one label per row, got "
                              f"{data.shape} {data.dtype} and {len(labels)} labels.")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_error(name: str, folder: Path, missing: Path) -> FileNotFoundError:
    archive = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}[name]
    return FileNotFoundError(
        f"{name.upper()} file not found: '{missing}'. Download {archive} (the 'python version') from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it in '{folder.parent}', so that '{folder}' holds "
        "its batch files; this package never downloads data."
    )


def load_cifar(root: PathLike, name: Literal["cifar10", "cifar100"] = "cifar10", *,
               verify_checksums: bool = True) -> tuple[ImageSet, ImageSet]:
    """CIFAR-10 or CIFAR-100 (fine labels) as ``(train, test)`` :class:`ImageSet` s of 32x32 RGB images.

    Args:
        root: the directory holding ``cifar-10-batches-py/`` or ``cifar-100-python/`` (the extracted "python
            version" archives; torchvision's ``root``).
        name: ``"cifar10"`` or ``"cifar100"``.
        verify_checksums: ``True``: read through torchvision's ``datasets.CIFAR10/100(root, download=False)``,
            which checks each file's md5 against the official release. ``False``: read the same pickle batches with
            this module's reader (no torchvision, no md5), for copies that differ from the release byte for byte.
            Either way the batches are validated and the result is the same for the official files.

    Raises:
        FileNotFoundError: a file is missing; the message names it and says where to put the files.
        DataFormatError: a file is corrupt, or fails the md5 check; the message names it.

    The training set is returned without augmentation; use ``train.with_augment(True)`` for crop + flip.
    """
    if name not in CIFAR_LAYOUT:
        raise ValueError(f"load_cifar: name={name!r}; expected one of {tuple(CIFAR_LAYOUT)}.")
    folder_name, train_files, test_file, meta_file, label_key, names_key = CIFAR_LAYOUT[name]
    folder = Path(root) / folder_name
    for file in (*train_files, test_file, meta_file):
        if not (folder / file).is_file():
            raise _cifar_error(name, folder, folder / file)
    meta = _read_cifar_pickle(folder / meta_file)
    if names_key not in meta:
        raise DataFormatError(f"'{folder / meta_file}' has no {names_key!r} (keys {sorted(meta)}).")
    classes = tuple(str(c) for c in meta[names_key])

    if verify_checksums:
        splits = _load_cifar_torchvision(root, name, folder)
    else:
        splits = []
        for files in (train_files, (test_file,)):
            batches = [_cifar_batch(folder / f, label_key) for f in files]
            splits.append((np.concatenate([b[0] for b in batches]), [y for b in batches for y in b[1]]))
    out = []
    for (images, labels), files in zip(splits, (train_files, (test_file,))):
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise DataFormatError(f"'{folder / files[0]}': labels outside [0, {len(classes)}).")
        out.append(ImageSet(torch.from_numpy(np.ascontiguousarray(images)), labels, classes, CIFAR_MEAN, CIFAR_STD))
    return out[0], out[1]


def _load_cifar_torchvision(root: PathLike, name: str, folder: Path) -> list[tuple[np.ndarray, list[int]]]:
    try:
        from torchvision import datasets
    except ImportError as err:
        raise ImportError("load_cifar(verify_checksums=True) reads CIFAR through torchvision: "
                          "`pip install lightning-multimix[demo]`, or pass verify_checksums=False.") from err
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    splits = []
    for train in (True, False):
        try:
            dataset = cls(str(root), train=train, download=False)
        except RuntimeError as err:
            raise DataFormatError(
                f"torchvision rejected the {name.upper()} files in '{folder}' ({err}): a file is corrupt or is not "
                "the official release (its md5 differs). Re-extract the official archive there, or pass "
                "verify_checksums=False to read files that differ from the release on purpose."
            ) from None
        # torchvision stores (N, 32, 32, 3) HWC
        splits.append((np.asarray(dataset.data).transpose(0, 3, 1, 2), list(dataset.targets)))
    return splits


def write_cifar(root: PathLike, name: Literal["cifar10", "cifar100"], train: tuple[Tensor, Tensor],
                test: tuple[Tensor, Tensor], classes: Optional[list[str]] = None) -> Path:
    """Write images ``(N, 3, 32, 32)`` uint8 and labels as CIFAR "python version" batches under ``root``.

    The files have the official layout and pickle format (so both readers of :func:`load_cifar` accept them with
    ``verify_checksums=False``) but not the official md5s. For tests and small experiments. Returns the folder.
    """
    folder_name, train_files, test_file, meta_file, label_key, names_key = CIFAR_LAYOUT[name]
    folder = Path(root) / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    num_classes = 10 if name == "cifar10" else 100
    classes = classes if classes is not None else [f"class_{i}" for i in range(num_classes)]
    chunks = torch.arange(train[0].shape[0]).tensor_split(len(train_files))
    for file, index in zip(train_files, chunks):
        _write_cifar_batch(folder / file, train[0][index], train[1][index], label_key)
    _write_cifar_batch(folder / test_file, test[0], test[1], label_key)
    with (folder / meta_file).open("wb") as f:
        pickle.dump({names_key: list(classes)}, f, protocol=2)
    return folder


def _write_cifar_batch(path: Path, images: Tensor, labels: Tensor, label_key: str) -> None:
    batch = {"batch_label": path.name, label_key: [int(y) for y in labels],
             "data": images.to(torch.uint8).reshape(images.shape[0], -1).numpy(), "filenames": []}
    with path.open("wb") as f:
        pickle.dump(batch, f, protocol=2)


# ---------------------------------------------------------------------------------------------------- Lightning


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
