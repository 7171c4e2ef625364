"""Forward hooks that record what flows through one module during a training step (torch only, no Lightning).

A :class:`Capture` is armed for the duration of the user's ``training_step`` and disarmed before the callback computes
its loss, so the callback's own calls to the head are never recorded. Hooks are removed with :meth:`Capture.remove`,
which leaves the module exactly as it was (and picklable).
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn


class Capture:
    """Record the first input and output of ``module`` while armed, and count its calls.

    Example:
        >>> import torch
        >>> head = torch.nn.Linear(3, 2)
        >>> capture = Capture(head)
        >>> with capture:
        ...     _ = head(torch.randn(4, 3))
        >>> capture.calls, tuple(capture.input.shape), tuple(capture.output.shape)
        (1, (4, 3), (4, 2))
        >>> capture.remove()
    """

    def __init__(self, module: nn.Module, record_kwargs: bool = False) -> None:
        self.module = module
        self.armed = False
        self.calls = 0
        self.input: Optional[Tensor] = None
        self.output: Any = None
        self.args: tuple = ()
        self.kwargs: dict = {}
        self._handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self.armed:
            return
        self.calls += 1
        if self.calls == 1:
            self.args, self.kwargs = args, kwargs
            self.input = args[0] if args and isinstance(args[0], Tensor) else None
            self.output = output

    def reset(self) -> None:
        self.calls, self.input, self.output, self.args, self.kwargs = 0, None, None, (), {}

    def __enter__(self) -> "Capture":
        self.reset()
        self.armed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self.armed = False

    def remove(self) -> None:
        self.armed = False
        self._handle.remove()
        self.reset()
