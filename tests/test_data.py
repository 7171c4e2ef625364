"""The idx reader/writer, the embedded Fashion-MNIST subset, the CIFAR loader and the data module.

Fake data files are built here byte by byte (``struct``, ``gzip``, ``pickle``), independently of the package's own
writers, so that reader and writer cannot share a mistake.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_multimix.demo import data as D
from lightning_multimix.demo.data import (
    EMBEDDED_DIR,
    DataFormatError,
    ImageDataModule,
    ImageSet,
    load_cifar,
    load_fashion_mnist,
    random_crop_flip,
    read_idx,
    write_idx,
)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
EMBEDDED_SHA256 = {
    "train-images-idx3-ubyte.gz": "fb5d76be9a26fa809a3b13c18f7191e33c2115c6e377baf29656711358a51b1d",
    "train-labels-idx1-ubyte.gz": "4cc57b2814542612de157ac954fec39e17b40ac7cc646602198dc0f4c7c97fc9",
    "t10k-images-idx3-ubyte.gz": "f63b5f3a005caedab708d16a900babd905c8331b1cd2188b91245c032cfe6acd",
    "t10k-labels-idx1-ubyte.gz": "09f5dc909c8586184bae0fbde44202a1b007bf6f2bd2bc952652fa22dc323f95",
}


def idx_bytes(type_code: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    """An idx file by hand: 0, 0, type code, ndim, big-endian uint32 dims, payload."""
    return bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload


def write_fake_fashion(root: Path, labels_train: list[int], labels_test: list[int], gz: bool = True) -> None:
    """Fashion-MNIST files whose image ``i`` is filled with the value ``i % 256``."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, labels in (("train", labels_train), ("t10k", labels_test)):
        n = len(labels)
        images = bytes(i % 256 for i in range(n) for _ in range(28 * 28))
        files = {f"{prefix}-images-idx3-ubyte": idx_bytes(0x08, (n, 28, 28), images),
                 f"{prefix}-labels-idx1-ubyte": idx_bytes(0x08, (n,), bytes(labels))}
        for name, content in files.items():
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(content))
            else:
                (root / name).write_bytes(content)


def write_fake_cifar_batch(path: Path, images: np.ndarray, labels: list[int], label_key: str) -> None:
    """A CIFAR "python version" batch: a pickled dict with 'data' (N, 3072) uint8 rows (R, G, B planes) and labels."""
    with path.open("wb") as f:
        pickle.dump({"batch_label": "fake", label_key: labels, "data": images.reshape(len(labels), -1),
                     "filenames": [f"{i}.png" for i in range(len(labels))]}, f, protocol=2)


def write_fake_cifar(root: Path, name: str, n_train: int = 10, n_test: int = 4, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    num_classes = 10 if name == "cifar10" else 100
    train_x = rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8)
    test_x = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    train_y = [int(i % num_classes) for i in range(n_train)]
    test_y = [int((3 * i) % num_classes) for i in range(n_test)]
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for k, part in enumerate(np.array_split(np.arange(n_train), 5), 1):
            write_fake_cifar_batch(folder / f"data_batch_{k}", train_x[part], [train_y[i] for i in part], "labels")
        write_fake_cifar_batch(folder / "test_batch", test_x, test_y, "labels")
        with (folder / "batches.meta").open("wb") as f:
            pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": 2}, f, protocol=2)
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        write_fake_cifar_batch(folder / "train", train_x, train_y, "fine_labels")
        write_fake_cifar_batch(folder / "test", test_x, test_y, "fine_labels")
        with (folder / "meta").open("wb") as f:
            pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": []}, f, protocol=2)
    return train_x, train_y, test_x, test_y


# ---------------------------------------------------------------------------------------------------- idx


@pytest.mark.parametrize("compressed", [False, True])
def test_read_idx_hand_built_file(tmp_path: Path, compressed: bool) -> None:
    values = [[1, 2, 3], [250, 0, 7]]
    content = idx_bytes(0x08, (2, 3), bytes(v for row in values for v in row))
    path = tmp_path / "x-idx2-ubyte"
    path.write_bytes(gzip.compress(content) if compressed else content)
    out = read_idx(path)
    assert out.dtype == torch.uint8
    assert out.tolist() == values


@pytest.mark.parametrize(
    ("code", "fmt", "dtype", "values"),
    [(0x09, "b", torch.int8, [-3, 5]), (0x0B, "h", torch.int16, [-300, 7000]), (0x0C, "i", torch.int32, [-70000, 9]),
     (0x0D, "f", torch.float32, [1.5, -2.25]), (0x0E, "d", torch.float64, [3.125, -1e300])],
)
def test_read_idx_big_endian_types(tmp_path: Path, code: int, fmt: str, dtype: torch.dtype, values: list) -> None:
    path = tmp_path / "t.idx"
    path.write_bytes(idx_bytes(code, (len(values),), struct.pack(f">{len(values)}{fmt}", *values)))
    out = read_idx(path)
    assert out.dtype == dtype and out.tolist() == values


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32, torch.float64])
def test_write_idx_round_trip_and_header(tmp_path: Path, dtype: torch.dtype) -> None:
    tensor = (torch.arange(24).reshape(2, 3, 4) - (0 if dtype == torch.uint8 else 5)).to(dtype)
    write_idx(tmp_path / "a.gz", tensor)
    write_idx(tmp_path / "a", tensor)
    assert torch.equal(read_idx(tmp_path / "a.gz"), tensor)
    raw = (tmp_path / "a").read_bytes()
    assert raw[:16] == bytes([0, 0, {torch.uint8: 8, torch.int8: 9, torch.int16: 11, torch.int32: 12,
                                     torch.float32: 13, torch.float64: 14}[dtype], 3]) + struct.pack(">3I", 2, 3, 4)
    assert gzip.decompress((tmp_path / "a.gz").read_bytes()) == raw
    write_idx(tmp_path / "b.gz", tensor)  # no time stamp: identical bytes
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


def test_write_idx_rejects_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="int64"):
        write_idx(tmp_path / "x", torch.zeros(3, dtype=torch.int64))


def test_read_idx_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope-idx1-ubyte"):
        read_idx(tmp_path / "nope-idx1-ubyte")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x00\x00\x08", "magic number"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic number"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "magic number"),
        (b"\x00\x00\x08\x02" + struct.pack(">I", 2), "dimensions"),
        (idx_bytes(0x08, (2, 3), bytes(5)), "truncated"),
        (idx_bytes(0x08, (2, 3), bytes(7)), "truncated or corrupt"),
        (b"", "magic number"),
    ],
)
def test_read_idx_corrupt_files_name_path_and_problem(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "bad-idx-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_truncated_gzip(tmp_path: Path) -> None:
    good = gzip.compress(idx_bytes(0x08, (100,), bytes(range(100))))
    path = tmp_path / "labels-idx1-ubyte.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataFormatError, match="gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------------- Fashion-MNIST


def test_embedded_subset_is_balanced_and_shaped() -> None:
    train, test = load_fashion_mnist()
    assert (len(train), len(test)) == (10_000, 2_000)
    assert train.class_counts() == [1000] * 10 and test.class_counts() == [200] * 10
    assert train.images.shape == (10_000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.classes[0] == "T-shirt/top"
    # pixel statistics of the subset are close to those of the full training set used for normalisation
    pixels = train.images.double() / 255
    assert abs(pixels.mean().item() - D.FASHION_MNIST_MEAN[0]) < 0.005
    assert abs(pixels.std().item() - D.FASHION_MNIST_STD[0]) < 0.005
    # no duplicate images between the two splits' first rows: the splits differ
    assert not torch.equal(train.images[:10], test.images[:10])


def test_embedded_files_checksums_size_and_license() -> None:
    total = 0
    for name, digest in EMBEDDED_SHA256.items():
        content = (EMBEDDED_DIR / name).read_bytes()
        total += len(content)
        assert hashlib.sha256(content).hexdigest() == digest, name
    assert total < 5.3e6  # about 5 MB
    license_text = (EMBEDDED_DIR / "LICENSE").read_text()
    assert "MIT" in license_text and "Zalando SE" in license_text
    readme = (EMBEDDED_DIR / "README.md").read_text()
    assert "zalandoresearch/fashion-mnist" in readme
    assert all(digest in readme for digest in EMBEDDED_SHA256.values())


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(),
                    reason="full Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_embedded_subset_matches_first_images_per_class_of_full_set() -> None:
    def raw(name: str, offset: int) -> np.ndarray:
        return np.frombuffer(gzip.decompress((DEBIAN_DIR / name).read_bytes()), dtype=np.uint8, offset=offset)

    train, test = load_fashion_mnist()
    for subset, prefix, per_class in ((train, "train", 1000), (test, "t10k", 200)):
        labels = raw(f"{prefix}-labels-idx1-ubyte.gz", 8)
        images = raw(f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        chosen = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
        assert np.array_equal(subset.labels.numpy(), labels[chosen])
        assert np.array_equal(subset.images[:, 0].numpy(), images[chosen])


@pytest.mark.parametrize("layout", ["flat_gz", "flat_raw", "torchvision"])
def test_load_fashion_mnist_from_directory(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    write_fake_fashion(root, [3, 1, 4, 1, 5], [9, 2], gz=layout != "flat_raw")
    train, test = load_fashion_mnist(tmp_path)
    assert train.labels.tolist() == [3, 1, 4, 1, 5] and test.labels.tolist() == [9, 2]
    assert train.images[:, 0, 5, 7].tolist() == [0, 1, 2, 3, 4]
    image, label = train[2]
    expected = (2 / 255 - D.FASHION_MNIST_MEAN[0]) / D.FASHION_MNIST_STD[0]
    assert image.shape == (1, 28, 28) and label.item() == 4
    assert torch.allclose(image, torch.full((1, 28, 28), expected))


def test_load_fashion_mnist_missing_file_names_path(tmp_path: Path) -> None:
    write_fake_fashion(tmp_path, [1, 2], [3])
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(tmp_path)
    assert str(tmp_path / "t10k-labels-idx1-ubyte.gz") in str(info.value)
    assert "data_dir=None" in str(info.value)


def test_load_fashion_mnist_mismatched_labels(tmp_path: Path) -> None:
    write_fake_fashion(tmp_path, [1, 2, 3], [3])
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(0x08, (2,), bytes([1, 2]))))
    with pytest.raises(DataFormatError, match="train-labels-idx1-ubyte.gz"):
        load_fashion_mnist(tmp_path)


def test_load_fashion_mnist_wrong_image_size(tmp_path: Path) -> None:
    write_fake_fashion(tmp_path, [1], [3])
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(0x08, (1, 32, 32), bytes(1024))))
    with pytest.raises(DataFormatError, match=r"\(N, 28, 28\)"):
        load_fashion_mnist(tmp_path)


def test_load_fashion_mnist_label_out_of_range(tmp_path: Path) -> None:
    write_fake_fashion(tmp_path, [1, 10], [3])
    with pytest.raises(DataFormatError, match=r"\[0, 10\)"):
        load_fashion_mnist(tmp_path)


def test_write_fashion_mnist_subset_takes_first_per_class_in_order(tmp_path: Path) -> None:
    write_fake_fashion(tmp_path / "full", [0, 1, 0, 2, 1, 0, 2, 2, 1] + list(range(3, 10)) * 2, [2, 0, 1, 0] +
                       list(range(3, 10)))
    D.write_fashion_mnist_subset(tmp_path / "full", tmp_path / "sub", train_per_class=2, test_per_class=1)
    train, test = load_fashion_mnist(tmp_path / "sub")
    # first two of classes 0, 1, 2 are at positions 0, 2 / 1, 4 / 3, 6; of classes 3..9 at 9..22
    assert train.images[:, 0, 0, 0].tolist()[:6] == [0, 1, 2, 3, 4, 6]
    assert train.class_counts() == [2] * 10 and test.class_counts() == [1] * 10
    assert test.images[:, 0, 0, 0].tolist()[:3] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------- ImageSet


def test_imageset_validation() -> None:
    images = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(images.float(), torch.zeros(3, dtype=torch.long), ("a",))
    with pytest.raises(ValueError, match="int64"):
        ImageSet(images, torch.zeros(2, dtype=torch.long), ("a",))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        ImageSet(images, torch.tensor([0, 1, 2]), ("a", "b"))
    with pytest.raises(ValueError, match="mean and std"):
        ImageSet(images, torch.zeros(3, dtype=torch.long), ("a",), mean=(0.1, 0.2), std=(1.0,))


def test_balanced_subset_too_few() -> None:
    data = ImageSet(torch.zeros(3, 1, 1, 1, dtype=torch.uint8), torch.tensor([0, 0, 1]), ("a", "b"))
    with pytest.raises(ValueError, match="class 1 has 1 examples"):
        data.balanced_subset(2)


def test_random_crop_flip_is_a_padded_crop_or_its_mirror() -> None:
    torch.manual_seed(0)
    image = torch.arange(1.0, 3 * 6 * 6 + 1).reshape(3, 6, 6)
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
    candidates = [padded[:, t:t + 6, s:s + 6] for t in range(9) for s in range(9)]
    candidates += [c.flip(-1) for c in candidates]
    seen_flip = seen_shift = False
    for _ in range(30):
        out = random_crop_flip(image)
        assert any(torch.equal(out, c) for c in candidates)
        seen_flip |= torch.equal(out, image.flip(-1)) or not any(torch.equal(out, c) for c in candidates[:81])
        seen_shift |= not (torch.equal(out, image) or torch.equal(out, image.flip(-1)))
    assert seen_flip and seen_shift


# ---------------------------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_load_cifar_own_reader(tmp_path: Path, name: str) -> None:
    train_x, train_y, test_x, test_y = write_fake_cifar(tmp_path, name)
    train, test = load_cifar(tmp_path, name, verify_checksums=False)
    assert train.images.shape == (10, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert np.array_equal(train.images.numpy(), train_x) and np.array_equal(test.images.numpy(), test_x)
    assert train.labels.tolist() == train_y and test.labels.tolist() == test_y
    assert train.num_classes == (10 if name == "cifar10" else 100)
    assert train.classes[1] == ("c1" if name == "cifar10" else "f1")
    # the row layout of a CIFAR batch: 1024 red values (row-major), then green, then blue
    row = train_x[0].reshape(-1)
    assert train.images[0, 1, 2, 5].item() == row[1024 + 2 * 32 + 5]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_load_cifar_through_torchvision_matches_own_reader(tmp_path: Path, name: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cifar_module = pytest.importorskip("torchvision.datasets.cifar")
    write_fake_cifar(tmp_path, name)
    # The fake files cannot have the official md5s that torchvision checks (of the batches in `_check_integrity`,
    # of the meta file in `_load_meta`, both through `cifar.check_integrity`); bypass only that md5 check, so that
    # the rest of torchvision's reading (and our conversion of its HWC arrays) is tested for real.
    monkeypatch.setattr(cifar_module, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    via_torchvision = load_cifar(tmp_path, name, verify_checksums=True)
    own = load_cifar(tmp_path, name, verify_checksums=False)
    for a, b in zip(via_torchvision, own):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.classes == b.classes


def test_load_cifar_checksum_failure_is_clear(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    write_fake_cifar(tmp_path, "cifar10")
    with pytest.raises(DataFormatError, match="verify_checksums=False") as info:
        load_cifar(tmp_path, "cifar10", verify_checksums=True)
    assert str(tmp_path / "cifar-10-batches-py") in str(info.value)


@pytest.mark.parametrize("verify", [True, False])
def test_load_cifar_missing_names_path_and_where_to_get_it(tmp_path: Path, verify: bool) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_cifar(tmp_path, "cifar100", verify_checksums=verify)
    message = str(info.value)
    assert str(tmp_path / "cifar-100-python") in message and "cs.toronto.edu" in message
    assert "cifar-100-python.tar.gz" in message


def test_load_cifar_corrupt_batch(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path, "cifar10")
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(DataFormatError, match="data_batch_3"):
        load_cifar(tmp_path, "cifar10", verify_checksums=False)


def test_load_cifar_refuses_pickles_that_run_code(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path, "cifar10")

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, ("echo pwned",))

    with (tmp_path / "cifar-10-batches-py" / "test_batch").open("wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(DataFormatError, match="refusing to load"):
        load_cifar(tmp_path, "cifar10", verify_checksums=False)


def test_write_cifar_is_readable(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    D.write_cifar(tmp_path, "cifar10", (images, labels), (images[:2], labels[:2]))
    train, test = load_cifar(tmp_path, "cifar10", verify_checksums=False)
    assert torch.equal(train.images, images) and torch.equal(train.labels, labels)
    assert torch.equal(test.images, images[:2])


# ---------------------------------------------------------------------------------------------------- data module


def test_data_module_fashion_embedded() -> None:
    dm = ImageDataModule("fashion_mnist", batch_size=256)
    assert (dm.num_classes, dm.in_channels, dm.augment) == (10, 1, False)
    dm.setup("fit")
    train_loader, test_loader = dm.train_dataloader(), dm.test_dataloader()
    assert len(train_loader) == 10_000 // 256  # the last incomplete batch is dropped
    assert len(test_loader) == -(-2000 // 256)
    images, labels = next(iter(test_loader))
    assert images.shape == (256, 1, 28, 28) and labels.dtype == torch.int64


def test_data_module_cifar(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path, "cifar100", n_train=8)
    dm = ImageDataModule("cifar100", data_dir=str(tmp_path), batch_size=4, verify_checksums=False)
    assert (dm.num_classes, dm.in_channels, dm.augment) == (100, 3, True)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32)
    assert dm.train_set.augment and not dm.test_set.augment


def test_data_module_argument_errors() -> None:
    with pytest.raises(ValueError, match="needs data_dir"):
        ImageDataModule("cifar10")
    with pytest.raises(ValueError, match="expected one of"):
        ImageDataModule("mnist")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        ImageDataModule(batch_size=1)
