"""Locating the classifier head (whose input is the penultimate embedding) and dense mode's feature map in a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_multimix.errors import MultiMixError
from lightning_multimix.feature_maps import TimmPositionHead

POOLING_TYPES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AvgPool1d)


def resolve_module(root: nn.Module, path: str) -> nn.Module:
    """The submodule of ``root`` at dotted ``path``; ``ValueError`` listing the ``nn.Linear`` modules if none.

    Example:
        >>> resolve_module(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 4)), "2")
        Linear(in_features=3, out_features=4, bias=True)
    """
    try:
        module = root.get_submodule(path)
    except AttributeError:
        linears = [name for name, m in root.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"No submodule {path!r} in {type(root).__name__}. Pass the dotted path of the classifier head; the model's "
            f"nn.Linear modules are {linears}."
        ) from None
    return module


def find_head(model: nn.Module) -> Optional[str]:
    """Dotted path of the last ``nn.Linear`` registered in ``model``, or ``None`` if it has none.

    Example:
        >>> find_head(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 4)))
        '2'
    """
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = name
    return found


def is_affine(module: nn.Module) -> bool:
    """Whether ``module`` is known to be affine (so interpolating its outputs equals running it on interpolations).

    Example:
        >>> is_affine(nn.Linear(2, 3)), is_affine(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
        (True, False)
    """
    return isinstance(module, nn.Linear)


def classifier_block(model: nn.Module, head_path: str) -> str:
    """Dense mode's module taking the pooled embedding: the ``nn.Sequential`` ending with the head if it has more
    layers, no pooling and no buffers (batch norm), e.g. EfficientNet's ``Dropout + Linear``; else the head.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> net.classifier = nn.Sequential(nn.Dropout(), nn.Linear(4, 2))
        >>> classifier_block(net, "classifier.1")
        'classifier'
    """
    if "." not in head_path:
        return head_path
    parent_path = head_path.rsplit(".", 1)[0]
    parent = model.get_submodule(parent_path)
    if (
        isinstance(parent, nn.Sequential)
        and len(parent) > 1
        and parent[-1] is model.get_submodule(head_path)
        and not any(isinstance(m, POOLING_TYPES) for m in parent.modules())
        and next(parent.buffers(), None) is None  # batch norm: its statistics belong to the real batch
    ):
        return parent_path
    return head_path


def find_pooling(model: nn.Module, head_path: str) -> Optional[str]:
    """Dotted path of the average-pooling module that feeds the head: the last one registered before the head.

    Example:
        >>> find_pooling(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)), "3")
        '1'
    """
    found = None
    for name, module in model.named_modules():
        if name == head_path:
            break
        if isinstance(module, POOLING_TYPES):
            found = name
    return found


def is_torchvision_vit(model: nn.Module) -> bool:
    """Whether ``model`` is torchvision's ``VisionTransformer`` (checked by name: torchvision is optional)."""
    return type(model).__name__ == "VisionTransformer" and hasattr(model, "encoder") and hasattr(model, "heads")


def path_of(root: nn.Module, module: nn.Module, where: str) -> str:
    """The dotted path of ``module`` inside ``root``; ``where`` names what returned it, for the error.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 4))
        >>> path_of(net, net[2], "multimix_head()")
        '2'
    """
    for name, candidate in root.named_modules():
        if candidate is module:
            return name
    raise MultiMixError(f"`{where}` returned a module that is not a submodule of {type(root).__name__}.")


def declared_head(model: nn.Module, head: Optional[str] = None) -> Optional[str]:
    """The declared head's path: ``head`` (checked), else the mixin's, else a timm ``get_classifier()``; else ``None``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 4))
        >>> declared_head(net, "2"), declared_head(net)
        ('2', None)
    """
    if head is not None:
        resolve_module(model, head)
        return head
    declared = model.multimix_head() if hasattr(model, "multimix_head") else None
    if declared is not None:
        return path_of(model, declared, "multimix_head()")
    for name, module in model.named_modules():  # outermost first
        if callable(getattr(module, "get_classifier", None)) and callable(getattr(module, "forward_head", None)):
            classifier = module.get_classifier()  # timm's own account of its head
            if isinstance(classifier, nn.Module) and not isinstance(classifier, nn.Identity):
                return path_of(model, classifier, f"{type(module).__name__}.get_classifier()")
    return None


def declared_feature_map(model: nn.Module, feature_map: Optional[str] = None) -> Optional[str]:
    """The feature map's declared dotted path (``feature_map``, else the mixin's), checked to exist; else ``None``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> declared_feature_map(net, "0"), declared_feature_map(net)
        ('0', None)
    """
    if feature_map is not None:
        resolve_module(model, feature_map)
        return feature_map
    declared = model.multimix_feature_map() if hasattr(model, "multimix_feature_map") else None
    return path_of(model, declared, "multimix_feature_map()") if declared is not None else None


def is_timm_model(module: nn.Module) -> bool:
    """Whether ``module`` speaks timm's model API (``forward_features``, ``forward_head``, ``get_classifier``)."""
    return all(callable(getattr(module, name, None)) for name in ("forward_features", "forward_head", "get_classifier"))


def hugging_face_encoder(module: nn.Module) -> Optional[str]:
    """A Hugging Face model's encoder attribute (``base_model_prefix``), ``""`` if it is the encoder, else ``None``."""
    prefix = getattr(module, "base_model_prefix", None)
    if not isinstance(prefix, str) or not hasattr(module, "config"):
        return None
    return prefix if isinstance(getattr(module, prefix, None), nn.Module) else ""


def feature_map_candidates(model: nn.Module) -> list[tuple[str, str]]:
    """Every ``(path, kind)`` a feature map could be read from: timm, Hugging Face, torchvision ViT, average pooling."""
    found = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if is_timm_model(module):
            found.append((name, "timm"))
        elif hugging_face_encoder(module) is not None:
            encoder = hugging_face_encoder(module)
            path = prefix + encoder if encoder else name
            if (path, "tokens") not in found:
                found.append((path, "tokens"))
        elif is_torchvision_vit(module):
            found.append((prefix + "encoder", "vit"))
        elif isinstance(module, POOLING_TYPES):
            found.append((name, "input"))
    return found


def resolve_feature_map(model: nn.Module, head_path: str, feature_map: Optional[str] = None) -> tuple[str, str]:
    """``(path, kind)`` of dense mode's feature map: declared; else from the timm, Hugging Face or torchvision ViT
    model holding the head; else the input of the average pooling feeding it (:class:`MultiMixError` if none).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> resolve_feature_map(net, "3")
        ('1', 'input')
    """
    declared = declared_feature_map(model, feature_map)
    if declared is not None:
        return declared, "output"
    for path, kind in feature_map_candidates(model):
        owner = path if kind == "timm" else path.rsplit(".", 1)[0] if "." in path else ""
        inside = head_path.startswith(f"{owner}.") if owner else True  # the head belongs to the map's model
        if kind == "vit":
            inside = head_path.startswith(f"{owner}.heads" if owner else "heads")
        if kind == "tokens":
            inside = inside and not head_path.startswith(f"{path}.")  # and is not inside the encoder itself
        if kind in ("timm", "tokens", "vit") and inside:
            return path, kind
    pooling = find_pooling(model, head_path)
    if pooling is None:
        raise MultiMixError(
            f"Dense MultiMix found no average pooling feeding the head {head_path!r}. Pass "
            "`Dense(feature_map='dotted.path')` naming the module whose output is the feature map, or override "
            "`MultiMixMixin.multimix_feature_map()`."
        )
    return pooling, "input"


@dataclass(frozen=True)
class HeadPlan:
    """What a fit resolved: the head, dense mode's feature map, logit space or not, and a timm per-position head."""

    head_path: str
    how: str  #: ``"declared"``, or how the first batch found it
    feature_spec: Optional[tuple[str, str]] = None
    logit_space: bool = False
    position_head: Optional[Callable[[Tensor], Tensor]] = None

    def describe(self) -> str:
        space = "logit space (exact for an affine head)" if self.logit_space else "embedding space"
        where = f", feature map from {self.feature_spec[0]!r}" if self.feature_spec else ""
        found = "" if self.how == "declared" else f" ({self.how})"
        return f"MultiMix: head {self.head_path!r}{found}{where}; interpolating in {space}."


def head_plan(model: nn.Module, path: str, how: str, dense: Any, logit_space: str) -> HeadPlan:
    """The :class:`HeadPlan` of the head at ``path``; with ``dense`` options, a found head becomes its classifier block.

    Example:
        >>> head_plan(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 4)), "2", "declared", None, "auto")
        HeadPlan(head_path='2', how='declared', feature_spec=None, logit_space=True, position_head=None)
    """
    if how != "declared" and dense is not None:
        path = classifier_block(model, path)
    in_logit_space = logit_space == "always" or (logit_space == "auto" and is_affine(model.get_submodule(path)))
    if dense is None:
        return HeadPlan(path, how, None, in_logit_space)
    spec = resolve_feature_map(model, path, dense.feature_map)
    if spec[1] != "timm":
        return HeadPlan(path, how, spec, in_logit_space)
    owner = model.get_submodule(spec[0])  # the head at every position: the timm model's own forward_head
    position_head = TimmPositionHead(owner, hasattr(owner, "num_prefix_tokens"))
    return HeadPlan(path, how, spec, logit_space == "always", position_head)


class BufferSafeHead:
    """Runs ``head`` on copies of its buffers, so interpolations leave batch-norm running statistics untouched.

    Example:
        >>> head = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        >>> _ = BufferSafeHead(head)(torch.randn(8, 3))
        >>> head[1].running_mean
        tensor([0., 0., 0., 0.])
    """

    def __init__(self, head: nn.Module) -> None:
        self.head = head

    def __call__(self, x: Tensor) -> Tensor:
        buffers = {name: b.clone() for name, b in self.head.named_buffers()}
        return torch.func.functional_call(self.head, buffers, (x,))
