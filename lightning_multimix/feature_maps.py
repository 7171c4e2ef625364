"""Dense mode's feature map: read as ``(b, r, d)``, checked against the head's input; a timm head per position."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from lightning_multimix.errors import MultiMixError

HOW_MAP = ("Pass `Dense(feature_map='dotted.path')` naming the module whose output is the feature map, or override "
           "`MultiMixMixin.multimix_feature_map()`.")


class TimmPositionHead:
    """A timm model's ``forward_head`` on each ``(N, d)`` row, given as a one-position CNN map or all-equal tokens."""

    def __init__(self, model: nn.Module, tokens: bool) -> None:
        self.model, self.tokens, self.prefix = model, tokens, _prefix_tokens(model)

    def __call__(self, rows: Tensor) -> Tensor:
        if self.tokens:
            return self.model.forward_head(rows.unsqueeze(1).expand(-1, self.prefix + 1, -1))
        return self.model.forward_head(rows[:, :, None, None])


def read_feature_map(capture: Any, spec: tuple[str, str], embeddings: Tensor, verify: bool,
                     first_token: bool = False) -> tuple[Tensor, Optional[Tensor], bool]:
    """``(features (b, r, d), mask (b, r) or None, first_token)`` from ``capture`` for a spec kind (``"input"``,
    ``"output"``, ``"vit"``, ``"timm"``, ``"tokens"``). With ``verify`` (first batch) the map's mean, class or first
    token must equal ``embeddings``, else :class:`MultiMixError`; pass ``first_token`` back on later batches."""
    path, kind = spec
    raw = capture.input if kind == "input" else capture.output
    mask = None
    if kind in ("output", "tokens") and not isinstance(raw, Tensor) and hasattr(raw, "last_hidden_state"):
        mask = capture.kwargs.get("attention_mask")
        if mask is None and len(capture.args) > 1 and isinstance(capture.args[1], Tensor):
            mask = capture.args[1]  # a Hugging Face encoder's second positional argument
        raw = raw.last_hidden_state
    if capture.calls < 1 or not isinstance(raw, Tensor) or raw.ndim not in (3, 4):
        shape = tuple(raw.shape) if isinstance(raw, Tensor) else type(raw).__name__
        raise MultiMixError(f"Dense MultiMix expected a (b, d, h, w) or (b, r, d) feature map from {path!r}, got "
                            f"{shape} ({capture.calls} calls). {HOW_MAP}")
    if kind == "timm":  # the head pools itself: nothing to check
        summary = None
        features = raw[:, _prefix_tokens(capture.module):] if raw.ndim == 3 else raw.flatten(2).transpose(1, 2)
    elif kind == "vit":
        summary, features = raw[:, 0], raw[:, 1:]
    else:
        # a pooling's input is channels-first, (b, d, h, w) or (b, d, l); a declared 3-d map is (b, r, d) tokens
        features = raw.flatten(2).transpose(1, 2) if raw.ndim == 4 or kind == "input" else raw
        mask = mask.bool() if mask is not None else None
        kept = mask.to(features.dtype).unsqueeze(-1) if mask is not None else None  # the mean skips padding
        summary = features.mean(1) if kept is None else (features * kept).sum(1) / kept.sum(1).clamp_min(1.0)
    if verify:
        first_token = _verify(path, kind, features, summary, embeddings, raw)
    if first_token:  # the head reads the first token: the others are mixed
        features, mask = raw[:, 1:], (mask[:, 1:] if mask is not None else None)
    return features, mask, first_token


def _verify(path: str, kind: str, features: Tensor, summary: Optional[Tensor], embeddings: Tensor,
            raw: Tensor) -> bool:
    """Raise unless the map feeds the head; return whether a ``"tokens"`` head reads the first token."""
    for name, tensor in (("feature map", features), ("head's input", embeddings)):
        if not bool(tensor.detach().isfinite().all()):
            raise MultiMixError(f"Dense MultiMix: the {name} of the first training batch holds NaN or inf, so it "
                                "cannot be checked against the head; look at the inputs and the model (learning "
                                "rate, precision).")
    if summary is None or _close(summary, embeddings):
        return False
    if kind == "tokens" and _close(raw[:, 0], embeddings):
        return True
    if kind == "tokens":
        raise MultiMixError("Dense MultiMix: the classifier head reads neither the mean of the token states of "
                            f"{path!r} nor its first token (a pooler output, e.g. BERT's tanh(W h_CLS), or dropout "
                            "in between), so no per-token interpolation matches what it reads. Dense mode needs a "
                            "head on the mean of the token states (or on a token): use MultiMix without `dense`, or "
                            "give the model such a head.")
    what = "its class token" if kind == "vit" else "its mean over positions"
    raise MultiMixError(f"Dense MultiMix: the feature map from {path!r} ({tuple(features.shape)} as (b, r, d)) does "
                        f"not match the head's input {tuple(embeddings.shape)} through {what}, so it is not the map "
                        f"that feeds the head. {HOW_MAP} If the map is right but layers (dropout, an MLP) sit "
                        "between the pooling and the head, name as head the module that takes the pooled embedding, "
                        "e.g. `MultiMix(head='model.classifier')`.")


def _prefix_tokens(model: nn.Module) -> int:
    return int(getattr(model, "num_prefix_tokens", 0) or 0)


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal up to the precision of the dtypes involved (bf16 autocast included)."""
    if a.shape != b.shape:
        return False
    a, b = a.detach().float(), b.detach().float()
    return bool(((a - b).norm() <= 2e-2 * b.norm() + 1e-4).item())
