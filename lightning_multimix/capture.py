"""Forward hooks that record what flows through a model during a training step (torch only, no Lightning).

A :class:`Capture` is armed during the user's ``training_step`` only, so the callback's own calls to the head are never
recorded. Its hooks ignore every module but their own, and a deep copy or a pickle of the model turns them into no-ops:
``copy.deepcopy(model)`` copies none of the callback's machinery; :meth:`Capture.remove` leaves the module as it was.
Captures only record; what they recorded is checked by their users.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from collections.abc import Mapping
from typing import Any, Optional

from torch import Tensor, nn

from lightning_multimix.feature_maps import read_feature_map
from lightning_multimix.interpolation import is_affine

_ORDER = itertools.count()  # the order in which captured modules first ran, across captures


def _inert(*args: Any, **kwargs: Any) -> None:
    """What a capture's hook becomes in a pickled model: nothing."""


def _inert_hook() -> Any:
    return _inert


class _Hook:
    """A forward (pre-)hook calling its capture while the capture lives; it ignores other modules (a deep copy of the
    model shares it), deep-copies to itself and pickles to a no-op."""

    def __init__(self, capture: "Capture", pre: bool) -> None:
        self.capture, self.pre = weakref.ref(capture), pre

    def __call__(self, module: nn.Module, args: tuple, extra: Any) -> None:
        capture = self.capture()
        if capture is not None and capture.armed and module is capture.module:
            capture.record_input(args, extra) if self.pre else capture.record_output(extra)

    def __deepcopy__(self, memo: dict) -> "_Hook":
        return self

    def __reduce__(self) -> tuple:
        return _inert_hook, ()


class Capture:
    """Record the first input (and positional/keyword arguments) and output of ``module`` while armed, and count its
    calls. ``clone_input=True`` keeps a copy of the first positional input, safe from in-place layers inside it."""

    def __init__(self, module: nn.Module, clone_input: bool = False) -> None:
        self.module, self.clone_input, self.armed = module, clone_input, False
        self.reset()
        self._handles = self._install()

    def _install(self) -> tuple:
        return (self.module.register_forward_pre_hook(_Hook(self, pre=True), with_kwargs=True),
                self.module.register_forward_hook(_Hook(self, pre=False)))

    def record_input(self, args: tuple, kwargs: dict) -> None:
        self.calls += 1
        if self.calls == 1:
            self.args, self.kwargs, self.order = args, kwargs, next(_ORDER)
            first = args[0] if args and isinstance(args[0], Tensor) else None
            # an in-place layer inside the module (EfficientNet's Dropout(inplace=True)) would overwrite the input
            self.input = first.clone() if first is not None and self.clone_input else first

    def record_output(self, output: Any) -> None:
        if self.calls == 1 and self.output is None:
            self.output = output

    def reset(self) -> None:
        self.calls, self.order, self.input, self.output, self.args, self.kwargs = 0, -1, None, None, (), {}

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


class _CapturingMethod:
    """Stands in for a method of a module while a :class:`MethodCapture` lives; copies and pickles get the method."""

    def __init__(self, capture: "MethodCapture", original: Any) -> None:
        self.capture, self.original = capture, original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.capture.armed:
            self.capture.record_input(args, kwargs)
        output = self.original(*args, **kwargs)
        if self.capture.armed:
            self.capture.record_output(output)
        return output

    def __deepcopy__(self, memo: dict) -> Any:
        return copy.deepcopy(self.original, memo)

    def __reduce__(self) -> tuple:
        return getattr, (self.capture.module, self.capture.name)


class MethodCapture(Capture):
    """Records the output of ``module.<name>()`` (timm's ``forward_features``) while armed; :meth:`remove` undoes it."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.name = name
        super().__init__(module)

    def _install(self) -> tuple:
        self.module.__dict__[self.name] = _CapturingMethod(self, getattr(self.module, self.name))
        return ()

    def remove(self) -> None:
        if isinstance(self.module.__dict__.get(self.name), _CapturingMethod):
            del self.module.__dict__[self.name]
        super().remove()


class Captures:
    """Captures armed, disarmed and removed together (``captures``)."""

    captures: list

    def __enter__(self) -> "Captures":
        for capture in self.captures:
            capture.__enter__()  # arming cannot fail: no capture to undo
        return self

    def __exit__(self, *exc: Any) -> None:
        for capture in self.captures:
            capture.__exit__()

    def remove(self) -> None:
        for capture in self.captures:
            capture.remove()


class StepCapture(Captures):
    """The captures of one model for a training step: the head's input and output, the feature map (dense mode:
    ``feature_spec = (path, kind)``) and, with ``inputs=True``, the arguments of every module on the way from the model
    down to the head (the teacher re-runs the outermost one that was called)."""

    def __init__(self, head_path: str, head: Capture, feature_spec: Optional[tuple[str, str]] = None,
                 features: Optional[Any] = None, inputs: Optional[dict[str, Capture]] = None) -> None:
        self.head_path, self.head = head_path, head
        self.feature_spec, self.features = feature_spec, features
        self.inputs = inputs or {}  # path -> capture, outermost first
        self.first_token = False  # a "tokens" feature map whose head reads the first token (found on the first batch)
        self.captures = [head, *([features] if features is not None else []), *self.inputs.values()]

    @classmethod
    def of(cls, model: nn.Module, head_path: str, feature_spec: Optional[tuple[str, str]] = None,
           inputs: bool = False) -> "StepCapture":
        """New captures on ``model`` for the head at ``head_path`` (and the feature map, and the inputs)."""
        features = capture_for(model, feature_spec) if feature_spec is not None else None
        head = model.get_submodule(head_path)
        # a copy of the head's input guards against an in-place layer inside the head; an affine map has none
        return cls(head_path, Capture(head, clone_input=not is_affine(head)), feature_spec, features,
                   {path: Capture(model.get_submodule(path)) for path in ancestors(head_path)} if inputs else None)

    def feature_map(self, embeddings: Tensor, verify: bool) -> tuple[Tensor, Optional[Tensor]]:
        """The captured feature map as ``(b, r, d)``, and its ``(b, r)`` padding mask (``None``: no padding); with
        ``verify`` (the first batch), checked against the head's input (:mod:`lightning_multimix.feature_maps`)."""
        assert self.features is not None and self.feature_spec is not None
        features, mask, self.first_token = read_feature_map(self.features, self.feature_spec, embeddings, verify,
                                                            self.first_token)
        return features, mask

    def model_inputs(self) -> Optional[tuple[str, tuple, dict]]:
        """``(path, args, kwargs)`` of the outermost module on the way to the head that the step called, if any."""
        for path, capture in self.inputs.items():
            if capture.calls > 0:
                return path, capture.args, capture.kwargs
        return None


class CallOrder:
    """While entered, the order in which the modules of ``model`` first run, by module identity (a forward pre-hook
    on each: a global one would make ``torch.compile`` warn)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> "CallOrder":
        self.first: dict[int, int] = {}
        self._handles = [m.register_forward_pre_hook(self._record) for m in self.model.modules()]
        return self

    def _record(self, module: nn.Module, args: Any) -> None:
        self.first.setdefault(id(module), len(self.first))

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()


def ran_before(model: nn.Module, entry: str, order: CallOrder) -> Optional[str]:
    """A module that ran before ``entry`` (the module the teacher re-runs) outside it and outside its ancestors,
    such as a backbone whose output the step handed to the head's block: then re-running ``entry`` alone is not the
    model's forward. ``None`` when there is none."""
    parts = entry.split(".") if entry else []
    start = order.first.get(id(model.get_submodule(entry)), -1)
    for depth in range(len(parts)):
        parent = ".".join(parts[:depth])
        for name, child in model.get_submodule(parent).named_children():
            if name != parts[depth] and order.first.get(id(child), start) < start:
                return f"{parent}.{name}" if parent else name
    return None


def capture_for(model: nn.Module, spec: tuple[str, str]) -> Any:
    """The capture that records the feature map of ``spec`` (``(path, kind)``) in ``model``."""
    owner = model.get_submodule(spec[0])
    return MethodCapture(owner, "forward_features") if spec[1] == "timm" else Capture(owner)


def ancestors(path: str) -> list[str]:
    """The dotted paths from the model (``""``) down to, not including, ``path``: outermost first."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts))]


Where = Optional[Any]  #: where a tensor is in a module's output: ``None`` (the output), an index, a key or attribute


def located_tensors(output: Any) -> list[tuple[Where, Tensor]]:
    """The tensors in a module's output and where: itself, in a tuple, list or dict, or a model output's ``logits``."""
    if isinstance(output, Tensor):
        return [(None, output)]
    if isinstance(output, Mapping):
        return [(k, v) for k, v in output.items() if isinstance(v, Tensor)]
    if isinstance(output, (tuple, list)):
        return [(i, v) for i, v in enumerate(output) if isinstance(v, Tensor)]
    logits = getattr(output, "logits", None)
    return [("logits", logits)] if isinstance(logits, Tensor) else []


def tensor_at(output: Any, where: Where) -> Any:
    """What is at ``where`` in a module's output (:func:`located_tensors`), or ``None``."""
    if where is None:
        return output
    if isinstance(output, (Mapping, tuple, list)):
        return output[where] if (where in output if isinstance(output, Mapping) else where < len(output)) else None
    return getattr(output, where, None)
