"""Finding the classifier head from what the first training step runs, when nothing names it (torch only)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Optional

from torch import Tensor, nn

from lightning_multimix.capture import HOW_HEAD, Capture, StepCapture, ancestors, capture_for
from lightning_multimix.errors import MultiMixError
from lightning_multimix.heads import classifier_block, feature_map_candidates


class HeadProbe:
    """Captures on every head candidate of ``model`` for the first training step, then :meth:`choose` the head;
    ``dense``: also on classifier blocks, feature-map candidates and the declared ``feature_maps`` paths.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> with HeadProbe(net) as probe:
        ...     _ = net(torch.randn(5, 3))
        >>> probe.choose()
        '2'
        >>> probe.remove()
    """

    def __init__(self, model: nn.Module, dense: bool = False, feature_maps: tuple[str, ...] = ()) -> None:
        self.model = model
        linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        self.linears = {path: Capture(model.get_submodule(path)) for path in linears}
        outer = sorted({p for path in linears for p in ancestors(path)}, key=lambda p: (p.count("."), len(p), p))
        self.ancestors = {path: Capture(model.get_submodule(path)) for path in outer}
        self.blocks: dict[str, Capture] = {}
        self.maps: dict[str, Any] = {}
        if dense:
            for path in linears:
                block = classifier_block(model, path)
                if block != path:
                    self.blocks[block] = Capture(model.get_submodule(block), clone_input=True)
            for spec in [*feature_map_candidates(model), *((path, "output") for path in feature_maps)]:
                if spec[0] not in self.maps:
                    self.maps[spec[0]] = capture_for(model, spec)
        self.how = ""

    def _all(self) -> list[Any]:
        return [*self.linears.values(), *self.ancestors.values(), *self.blocks.values(), *self.maps.values()]

    def __enter__(self) -> "HeadProbe":
        self._stack = contextlib.ExitStack()
        for capture in self._all():
            self._stack.enter_context(capture)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def remove(self) -> None:
        for capture in self._all():
            capture.remove()

    def choose(self) -> str:
        """The ``nn.Linear`` whose output the model returns (alone, in a tuple, list, dict or as ``logits``), else the
        last that ran; :class:`MultiMixError` if none ran or several are returned (``(logits, aux)``)."""
        ran = {path: c for path, c in self.linears.items() if c.calls > 0}
        if not ran:
            raise MultiMixError(f"MultiMix found no classifier head in {type(self.model).__name__}: no nn.Linear ran "
                                f"in its training step. {HOW_HEAD}")
        outermost = next((c for c in self.ancestors.values() if c.calls > 0), None)
        returned = _tensors_in(outermost.output) if outermost is not None else []
        matches = [path for path, c in ran.items() if any(c.output is t for t in returned)]
        if len(matches) > 1:
            raise MultiMixError(
                f"MultiMix cannot tell the classifier head of {type(self.model).__name__}: its forward returns the "
                f"outputs of {len(matches)} nn.Linear modules, {matches}. {HOW_HEAD}"
            )
        if matches:
            self.how = "the nn.Linear whose output the model returns"
            return matches[0]
        self.how = "the last nn.Linear that ran (no nn.Linear output is returned as it is)"
        return max(ran, key=lambda path: ran[path].order)

    def linear_outputs(self) -> dict[str, Tensor]:
        """The ``(b, c)`` output of every ``nn.Linear`` that ran, by dotted path (the candidates for the head)."""
        return {path: c.output for path, c in self.linears.items()
                if c.calls > 0 and isinstance(c.output, Tensor) and c.output.ndim == 2}

    def step_capture(self, head_path: str, feature_spec: Optional[tuple[str, str]]) -> StepCapture:
        """The step's captures of the chosen head (or dense classifier block) and feature map, from the probe's."""
        head = self.linears.get(head_path) or self.blocks[head_path]
        features = None
        if feature_spec is not None:
            path = feature_spec[0]
            if path not in self.maps:  # a declared map: not a candidate the probe recorded
                raise MultiMixError(f"Dense MultiMix: the feature map {path!r} was not recorded on the first batch.")
            features = self.maps[path]
        inputs = {path: self.ancestors[path] for path in ancestors(head_path) if path in self.ancestors}
        return StepCapture(head_path, head, feature_spec, features, inputs)


def _tensors_in(output: Any) -> list[Tensor]:
    """The tensors in a module's output: itself, in a tuple, list or dict, or a model output's ``logits``."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [v for v in output.values() if isinstance(v, Tensor)]
    if isinstance(output, (tuple, list)):
        return [v for v in output if isinstance(v, Tensor)]
    logits = getattr(output, "logits", None)
    return [logits] if isinstance(logits, Tensor) else []
