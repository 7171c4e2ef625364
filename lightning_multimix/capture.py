"""Forward hooks that record what flows through one module during a training step (torch only, no Lightning).

A :class:`Capture` is armed for the duration of the user's ``training_step`` and disarmed before the callback computes
its loss, so the callback's own calls to the head are never recorded. Hooks are removed with :meth:`Capture.remove`,
which leaves the module exactly as it was (and picklable).
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn


class Capture:
    """Record the first input (and positional/keyword arguments) and output of ``module`` while armed, and count its
    calls. ``clone_input=True`` keeps a copy of the first positional input, safe from in-place layers inside the module.

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

    def __init__(self, module: nn.Module, clone_input: bool = False) -> None:
        self.module = module
        self.clone_input = clone_input
        self.armed = False
        self.calls = 0
        self.input: Optional[Tensor] = None
        self.output: Any = None
        self.args: tuple = ()
        self.kwargs: dict = {}
        self._handles = (
            module.register_forward_pre_hook(self._record_input, with_kwargs=True),
            module.register_forward_hook(self._record_output),
        )

    def _record_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.armed:
            return
        self.calls += 1
        if self.calls == 1:
            self.args, self.kwargs = args, kwargs
            first = args[0] if args and isinstance(args[0], Tensor) else None
            # an in-place layer inside the module (EfficientNet's Dropout(inplace=True)) would overwrite the input
            self.input = first.clone() if first is not None and self.clone_input else first

    def _record_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.armed and self.calls == 1 and self.output is None:
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
        for handle in self._handles:
            handle.remove()
        self.reset()
