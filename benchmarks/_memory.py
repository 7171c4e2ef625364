"""Peak bytes of tensors allocated inside a region of code, on any device, without an allocator hook.

CUDA has ``torch.cuda.max_memory_allocated``; the CPU allocator keeps no such statistic. :class:`LiveTensorBytes` is a
``TorchDispatchMode`` that sees every operator below autograd (forward, backward and optimizer kernels alike), records
the storage of every *new* tensor an operator returns (outputs that alias an input, such as views and in-place
results, are skipped using the operator's schema), and tracks how many of those bytes are alive at once through weak
references to the storages. Its ``peak`` is the peak of live bytes allocated inside the region, which is what an
allocator's peak statistic would report above the region's starting point (allocator rounding and kernel-internal
workspaces aside).

It adds Python work to every operator, so never time code while it is active.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Track the peak of live bytes of tensors created while the mode is active.

    Example:
        >>> with LiveTensorBytes() as tracker:
        ...     a = torch.zeros(1000)          # 4000 bytes
        ...     b = a + 1                      # 4000 more, both alive
        ...     del a, b
        ...     c = torch.zeros(10)
        >>> tracker.peak >= 8000, tracker.current == 40
        (True, True)
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        for key in [key for key, (ref, _) in self._live.items() if ref.expired()]:
            self.current -= self._live.pop(key)[1]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self._sweep()
        returns = func._schema.returns
        outputs = out if isinstance(out, (tuple, list)) and len(returns) > 1 else (out,)
        for schema_return, value in zip(returns, outputs):
            if schema_return.alias_info is not None:
                continue  # a view or an in-place result: no new storage
            for tensor in tree_leaves(value):
                if not isinstance(tensor, torch.Tensor):
                    continue
                storage = tensor.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata in self._live:
                    continue
                nbytes = storage.nbytes()
                self._live[ref.cdata] = (ref, nbytes)
                self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out
