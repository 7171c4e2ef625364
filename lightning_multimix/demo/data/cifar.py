"""CIFAR-10/100 from the "python version" batches on disk (never downloaded), and writing such batches."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from torch import Tensor

from lightning_multimix.demo.data.idx import DataFormatError, PathLike
from lightning_multimix.demo.data.images import ImageSet

#: The CIFAR normalisation of AlignMixup's code (github.com/shashankvkt/AlignMixup_CVPR22, cifar10_100/main.py),
#: which uses the same values for CIFAR-10 and CIFAR-100.
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)

CIFAR_LAYOUT = {
    # name: (folder under root, training batches, test batch, meta file, key of the labels, key of the class names)
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
                "labels", "label_names"),
    "cifar100": ("cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names"),
}


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
