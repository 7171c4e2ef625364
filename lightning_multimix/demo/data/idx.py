"""The idx format of (Fashion-)MNIST: read and write, plain or gzip-compressed, validated."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

PathLike = Union[str, os.PathLike]

# idx type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


class DataFormatError(ValueError):
    """A data file exists but is not what it should be (truncated, wrong magic number, wrong shape, ...)."""


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
