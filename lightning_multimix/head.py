"""Where the classifier head is (and dense mode's feature map), decided in one place (torch only, no Lightning).

In this order: 1. **declared**, ``MultiMix(head=...)`` or ``MultiMixMixin.multimix_head()`` (:func:`declared`);
2. **timm**'s account of its head, ``get_classifier()`` (:func:`timm_head`); 3. **found** on the first training batch
(:class:`HeadProbe`): the ``nn.Linear`` whose output the model returns, else the last that ran; 4. a found head is
**checked against the user's loss** (:func:`check_found_head`). :func:`head_plan` makes the :class:`HeadPlan` (dense
mode's feature map, logit space); every batch checks what the head received and gave (:func:`head_tensors`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

from torch import Tensor, nn

from lightning_multimix.capture import Capture, Captures, Where, ancestors, capture_for, located_tensors, tensor_at
from lightning_multimix.errors import MultiMixError
from lightning_multimix.feature_maps import TimmPositionHead
from lightning_multimix.interpolation import is_affine
from lightning_multimix.positions import class_dims, resizable
from lightning_multimix.targets import LABELS_HOW, explain_ignoring, explain_loss, kept, outside_classes, soft_outside

HOW_HEAD = ("Pass `MultiMix(head='dotted.path')` naming the classifier head, or add `MultiMixMixin` and override "
            "`multimix_head()`.")
POOLING_TYPES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AvgPool1d)
Source = Literal["declared", "timm", "returned", "last", "read"]
SOURCES: dict[str, str] = {"declared": "declared", "timm": "the timm model's get_classifier()",
                           "returned": "the nn.Linear whose output the model returns",
                           "last": "the last nn.Linear that ran (no nn.Linear output is returned as it is)",
                           "read": "the module whose output your loss reads"}


def declared(model: nn.Module, path: Optional[str], hook: str, what: str = "the classifier head") -> Optional[str]:
    """A module the user declared: ``path`` (checked to exist), else what ``MultiMixMixin.<hook>()`` returns (checked
    to be in the model), else ``None``. A path or module not in the model is an error listing its ``nn.Linear`` ones."""
    module = getattr(model, hook)() if path is None and hasattr(model, hook) else None
    if module is not None:
        path = next((name for name, m in model.named_modules() if m is module), None)
        if path is None:
            raise MultiMixError(f"`{hook}()` returned a module that is not a submodule of {type(model).__name__}.")
    try:
        model.get_submodule(path) if path is not None else None
    except AttributeError:
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise MultiMixError(f"No submodule {path!r} in {type(model).__name__}. Pass the dotted path of {what}; the "
                            f"model's nn.Linear modules are {linears}.") from None
    return path


def is_timm_model(module: nn.Module) -> bool:
    """Whether ``module`` speaks timm's model API (``forward_features``, ``forward_head``, ``get_classifier``)."""
    return all(callable(getattr(module, name, None)) for name in ("forward_features", "forward_head", "get_classifier"))


def timm_head(model: nn.Module) -> Optional[str]:
    """The head of the outermost timm model in ``model``, from its ``get_classifier()``; ``None`` if there is none."""
    for module in model.modules():  # outermost first
        if is_timm_model(module):
            classifier = module.get_classifier()
            if isinstance(classifier, nn.Module) and not isinstance(classifier, nn.Identity):
                return next(name for name, m in model.named_modules() if m is classifier)
    return None


class HeadProbe(Captures):
    """Captures on every head candidate of ``model`` for the first training step, then :meth:`choose` the head;
    ``dense``: also on classifier blocks, feature-map candidates and the declared ``feature_maps`` paths."""

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
                self.maps.setdefault(spec[0], capture_for(model, spec))
        self.captures = [*self.linears.values(), *self.ancestors.values(), *self.blocks.values(), *self.maps.values()]

    def choose(self) -> tuple[str, Source]:
        """``(path, source)``: the ``nn.Linear`` whose output the model returns (alone, in a tuple, list, dict or as
        ``logits``), else the last that ran; :class:`MultiMixError` if none ran or several are returned."""
        ran = {path: c for path, c in self.linears.items() if c.calls > 0}
        if not ran:
            raise MultiMixError(f"MultiMix found no classifier head in {type(self.model).__name__}: no nn.Linear ran "
                                f"in its training step. {HOW_HEAD}")
        outermost = next((c for c in self.ancestors.values() if c.calls > 0), None)
        returned = [t for _, t in located_tensors(outermost.output)] if outermost is not None else []
        matches = [path for path, c in ran.items() if any(c.output is t for t in returned)]
        if len(matches) > 1:
            raise MultiMixError(
                f"MultiMix cannot tell the classifier head of {type(self.model).__name__}: its forward returns the "
                f"outputs of {len(matches)} nn.Linear modules, {matches}. {HOW_HEAD}"
            )
        if matches:
            return matches[0], "returned"
        return max(ran, key=lambda path: ran[path].order), "last"

    def linear_outputs(self) -> dict[str, Tensor]:
        """The ``(b, c)`` output of every ``nn.Linear`` that ran, by dotted path (the candidates for the head)."""
        return {path: c.output for path, c in self.linears.items()
                if c.calls > 0 and isinstance(c.output, Tensor) and c.output.ndim == 2}

    def recorded(self, head_path: str, feature_path: Optional[str]) -> tuple[Capture, Any, dict[str, Capture]]:
        """This batch's captures of the chosen head (or dense classifier block), feature map and head's ancestors."""
        head = self.linears.get(head_path) or self.blocks[head_path]
        if feature_path is not None and feature_path not in self.maps:  # a declared map the probe did not record
            raise MultiMixError(f"Dense MultiMix: the feature map {feature_path!r} was not recorded on the first "
                                "batch.")
        inputs = {path: self.ancestors[path] for path in ancestors(head_path) if path in self.ancestors}
        return head, self.maps.get(feature_path), inputs


class LogitsProbe(Captures):
    """Captures on every module of ``model`` for the first step with labels per position: :meth:`choose` the module
    whose output holds the per-position logits that the user's loss reads (``paths``: only those modules)."""

    def __init__(self, model: nn.Module, paths: Optional[tuple[str, ...]] = None) -> None:
        self.model = model
        self.modules = {name: Capture(m) for name, m in model.named_modules() if paths is None or name in paths}
        self.captures = list(self.modules.values())

    def choose(self, user_loss: Tensor, labels: Tensor, ignore_index: Optional[int]) -> tuple[str, Where, int, bool]:
        """``(path, where, class_dim, resize)``: the innermost module that ran once with an output of logits that fit
        the labels (or, ``resize``, of masks' logits at another size) and explain the user's loss (per-position
        cross-entropy); else an error naming the fix."""
        seen, fits, refused = {}, {}, None
        for path in sorted(self.modules, key=lambda p: -len(p.split(".")) if p else 0):  # innermost first
            capture = self.modules[path]
            for where, tensor in located_tensors(capture.output) if capture.calls == 1 else ():
                resize = resizable(tuple(tensor.shape), tuple(labels.shape))
                for dim in (1,) if resize else class_dims(tuple(tensor.shape), tuple(labels.shape)):
                    if id(tensor) in seen or not tensor.is_floating_point() or tensor.shape[dim] < 2:
                        continue
                    seen[id(tensor)] = f"{path!r} {tuple(tensor.shape)}"
                    try:  # an ignore index that is one of these logits' classes: the outermost's error is told
                        if explain_ignoring(user_loss, tensor, labels, ignore_index, dim, resize)[0] is not None:
                            fits[id(tensor)] = (path, where, dim, resize)
                    except MultiMixError as error:
                        refused = error
        fits = {k: fit for k, fit in fits.items() if not fit[3]} or fits  # resized only if nothing fits as it is
        if not fits and refused is not None:
            raise refused
        if len(fits) == 1:
            return next(iter(fits.values()))
        which = f"several of them, {[f[0] for f in fits.values()]}: name one" if fits else "none of them"
        raise MultiMixError(
            f"MultiMix read labels per position of shape {tuple(labels.shape)}; it mixes the per-position logits your "
            f"loss reads ((b, c, H, W) for (b, H, W) masks, (b, T, c) for (b, T) tags), the output of a module. Those "
            f"of such shapes: {', '.join(seen.values()) or 'none'}; the cross-entropy of {which} explains your loss. "
            "MultiMix carries `F.cross_entropy(logits, labels, ignore_index=..., label_smoothing=...)` plus terms "
            "without the logits; not a Dice or focal loss, class weights, or a sum. Return the logits from a module "
            "(upsampling included), or pass `MultiMix(head='dotted.path')` naming that module."
        )


def position_logits(capture: Capture, path: str, where: Where, class_dim: int, resize: bool, labels: Tensor) -> Tensor:
    """The per-position logits captured in a step, checked: the module ran once and they fit the labels."""
    logits = tensor_at(capture.output, where) if capture.calls == 1 else None
    shapes = (tuple(logits.shape), tuple(labels.shape)) if isinstance(logits, Tensor) else None
    if shapes is None or not (resizable(*shapes) if resize else class_dim in class_dims(*shapes)):
        got = tuple(logits.shape) if isinstance(logits, Tensor) else f"{capture.calls} call(s)"
        raise MultiMixError(f"MultiMix: the per-position logits of {path!r} ({got}) do not fit this batch's labels "
                            f"{tuple(labels.shape)}: keep (b, c, H, W) or (b, T, c) logits, from one call.")
    return logits


def check_found_head(chosen: str, source: Source, outputs: dict[str, Tensor], user_loss: Tensor, labels: Tensor,
                     ignore_index: Optional[int]) -> None:
    """A found head must explain the user's loss (``outputs``: the ``(b, c)`` output of every ``nn.Linear`` that ran):
    else an error that lists the candidates, unless the labels are out of range (the labels' check then says so)."""
    if chosen not in outputs or explain_ignoring(user_loss, outputs[chosen], labels, ignore_index)[0] is not None:
        return  # a head of the wrong shape: `head_tensors` says so
    fits = [path for path, logits in outputs.items()
            if logits.shape[-1] >= 2 and explain_loss(user_loss, logits, labels, ignore_index) is not None]
    soft, classes = labels.is_floating_point(), outputs[chosen].shape[-1]
    if not fits and (labels.shape[-1] != classes or bool(soft_outside(labels, "bce").any()) if soft else
                     bool(outside_classes(labels, classes, kept(labels, ignore_index)).any())):
        return  # targets that are not the loss's: the first batch's check of the targets says so
    seen = ", ".join(f"{path!r} {tuple(out.shape)}" for path, out in outputs.items())
    hint = (f"Your loss is the cross-entropy of {fits[0]!r} (or its BCE): pass `MultiMix(head={fits[0]!r})`."
            if len(fits) == 1 else f"It is the cross-entropy of several of them, {fits}: name the head." if fits else
            "No nn.Linear that ran explains it. Your loss may depend on the logits beyond a cross-entropy or BCE of "
            "them (class weights or `pos_weight`, a focal or margin loss, a regulariser on the logits, a sum instead "
            f"of a mean), which MultiMix cannot carry; or use other labels than MultiMix read ({LABELS_HOW}); or come "
            "from a classifier that is not an nn.Module (`F.linear` with a parameter: it must be wrapped in a module, "
            "and named).")
    raise MultiMixError(
        f"MultiMix found the head {chosen!r} ({SOURCES[source]}), but your training_step's loss is not the "
        "cross-entropy of its logits with the batch's labels, nor their BCE-with-logits (plus terms that do not "
        f"involve them), so it would train the wrong thing. The nn.Linear modules that ran: {seen}. {hint} Or pass "
        "`MultiMix(head='dotted.path')` / override `MultiMixMixin.multimix_head()`."
    )


def head_tensors(head: Capture, head_path: str) -> tuple[Tensor, Tensor]:
    """``(embeddings (b, d), logits (b, c))`` the head recorded in a step, checked: it ran exactly once, on the
    embeddings alone, 2-d in and out, with at least two classes."""
    if head.calls != 1:
        raise MultiMixError(f"MultiMix expects the head {head_path!r} to run exactly once per training step, on the "
                            f"penultimate embeddings; it ran {head.calls} times. {HOW_HEAD}")
    if len(head.args) > 1 or head.kwargs:
        raise MultiMixError(
            f"The head {head_path!r} is called with more than the embeddings ({len(head.args)} positional arguments, "
            f"keyword arguments {sorted(head.kwargs)}), such as the labels of a margin head; MultiMix runs the head on "
            f"interpolated embeddings alone. Name as head a module that maps embeddings to logits. {HOW_HEAD}"
        )
    embeddings, logits = head.input, head.output
    shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (embeddings, logits)]
    if not (isinstance(embeddings, Tensor) and isinstance(logits, Tensor) and embeddings.ndim == logits.ndim == 2):
        raise MultiMixError(f"The head {head_path!r} maps {shapes[0]} to {shapes[1]}; MultiMix needs a classifier "
                            f"head mapping (b, d) embeddings to (b, c) logits. {HOW_HEAD}")
    if logits.shape[-1] < 2 or embeddings.shape[0] != logits.shape[0]:
        raise MultiMixError(f"The head {head_path!r} maps {shapes[0]} to {shapes[1]}; a classifier head gives one "
                            f"output per class (at least 2) for every example. {HOW_HEAD}")
    return embeddings, logits


def classifier_block(model: nn.Module, head_path: str) -> str:
    """Dense mode's module taking the pooled embedding: the ``nn.Sequential`` ending with the head if it has more
    layers, no pooling and no buffers (batch norm), e.g. EfficientNet's ``Dropout + Linear``; else the head."""
    if "." not in head_path:
        return head_path
    parent_path = head_path.rsplit(".", 1)[0]
    parent = model.get_submodule(parent_path)
    if (isinstance(parent, nn.Sequential) and len(parent) > 1 and parent[-1] is model.get_submodule(head_path)
            and not any(isinstance(m, POOLING_TYPES) for m in parent.modules())
            and next(parent.buffers(), None) is None):  # batch norm: its statistics belong to the real batch
        return parent_path
    return head_path


def _hugging_face_encoder(module: nn.Module) -> Optional[str]:
    """A Hugging Face model's encoder attribute (``base_model_prefix``), ``""`` if it is the encoder, else ``None``."""
    prefix = getattr(module, "base_model_prefix", None)
    if not isinstance(prefix, str) or not hasattr(module, "config"):
        return None
    return prefix if isinstance(getattr(module, prefix, None), nn.Module) else ""


def feature_map_candidates(model: nn.Module) -> list[tuple[str, str]]:
    """Every ``(path, kind)`` a feature map could be read from: timm, Hugging Face, torchvision ViT, average pooling."""
    found = []
    # torchvision's VisionTransformer, if torchvision built one: torchvision is optional, never imported here
    vit = getattr(sys.modules.get("torchvision.models.vision_transformer"), "VisionTransformer", None)
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        encoder = _hugging_face_encoder(module)
        if is_timm_model(module):
            found.append((name, "timm"))
        elif encoder is not None:
            path = prefix + encoder if encoder else name
            if (path, "tokens") not in found:
                found.append((path, "tokens"))
        elif vit is not None and isinstance(module, vit):
            found.append((prefix + "encoder", "vit"))
        elif isinstance(module, POOLING_TYPES):
            found.append((name, "input"))
    return found


def resolve_feature_map(model: nn.Module, head_path: str, feature_map: Optional[str] = None) -> tuple[str, str]:
    """``(path, kind)`` of dense mode's feature map: declared; else from the timm, Hugging Face or torchvision ViT
    model holding the head; else the input of the last average pooling registered before the head."""
    named = declared(model, feature_map, "multimix_feature_map", "the feature map")
    if named is not None:
        return named, "output"
    for path, kind in feature_map_candidates(model):
        owner = path if kind == "timm" else path.rsplit(".", 1)[0] if "." in path else ""
        inside = head_path.startswith(f"{owner}.") if owner else True  # the head belongs to the map's model
        if kind == "vit":
            inside = head_path.startswith(f"{owner}.heads" if owner else "heads")
        if kind == "tokens":
            inside = inside and not head_path.startswith(f"{path}.")  # and is not inside the encoder itself
        if kind in ("timm", "tokens", "vit") and inside:
            return path, kind
    pooling = None
    for name, module in model.named_modules():
        if name == head_path:
            break
        if isinstance(module, POOLING_TYPES):
            pooling = name
    if pooling is None:
        raise MultiMixError(
            f"Dense MultiMix found no average pooling feeding the head {head_path!r}. Pass "
            "`Dense(feature_map='dotted.path')` naming the module whose output is the feature map, or override "
            "`MultiMixMixin.multimix_feature_map()`."
        )
    return pooling, "input"


@dataclass(frozen=True)
class HeadPlan:
    """What a fit decided: the head, how, dense mode's feature map, logit space or not, and a timm per-position head."""

    head_path: str
    source: Source
    feature_spec: Optional[tuple[str, str]] = None
    logit_space: bool = False
    position_head: Optional[Callable[[Tensor], Tensor]] = None
    positions: Optional[tuple[Where, int, bool]] = None  #: labels per position: where the logits are, class dim, resize

    def describe(self) -> str:
        if self.positions is not None:
            return (f"MultiMix: labels per position ({'masks' if self.positions[1] == 1 else 'tags'}): mixing the "
                    f"logits of {repr(self.head_path) if self.head_path else 'your forward'} at every position.")
        space = "logit space (exact for an affine head)" if self.logit_space else "embedding space"
        where = f", feature map from {self.feature_spec[0]!r}" if self.feature_spec else ""
        found = "" if self.source == "declared" else f" ({SOURCES[self.source]})"
        return f"MultiMix: head {self.head_path!r}{found}{where}; interpolating in {space}."


def head_plan(model: nn.Module, path: str, source: Source, dense: Any, logit_space: str) -> HeadPlan:
    """The :class:`HeadPlan` of the head at ``path``; with ``dense``, a found head becomes its classifier block."""
    if source in ("returned", "last") and dense is not None:
        path = classifier_block(model, path)
    in_logit_space = logit_space == "always" or (logit_space == "auto" and is_affine(model.get_submodule(path)))
    if dense is None:
        return HeadPlan(path, source, None, in_logit_space)
    spec = resolve_feature_map(model, path, dense.feature_map)
    if spec[1] != "timm":
        return HeadPlan(path, source, spec, in_logit_space)
    owner = model.get_submodule(spec[0])  # the head at every position: the timm model's own forward_head
    position_head = TimmPositionHead(owner, hasattr(owner, "num_prefix_tokens"))
    return HeadPlan(path, source, spec, logit_space == "always", position_head)


def plan_before_fit(model: nn.Module, head: Optional[str], dense: Any, logit_space: str) -> Optional[HeadPlan]:
    """At ``setup``: the plan of a declared head, else of a timm model's; ``None``: the first batch finds it. A
    declared feature map that does not exist fails here, before any training."""
    if dense is not None:
        declared(model, dense.feature_map, "multimix_feature_map", "the feature map")
    path = declared(model, head, "multimix_head")
    if path is not None:
        return head_plan(model, path, "declared", dense, logit_space)
    path = timm_head(model)
    return head_plan(model, path, "timm", dense, logit_space) if path is not None else None
