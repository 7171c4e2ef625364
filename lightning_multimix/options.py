"""Options of MultiMix's optional modes (off when ``None``) and the check of all its arguments (``ValueError``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

from lightning_multimix.dense import ATTENTION_KINDS
from lightning_multimix.objective import DISTILL_TARGETS

MODES = ("multimix", "pairs")
OTHER_BATCHES = ("input_mixup", "pairs", "own_loss")
LOGIT_SPACES = ("auto", "always", "never")


def check(ok: bool, owner: str, name: str, value: Any, expected: str) -> None:
    """Raise ``ValueError`` naming the bad value and what is expected, unless ``ok``."""
    if not ok:
        raise ValueError(f"{owner}: invalid `{name}={value!r}`; expected {expected}.")


def check_int(owner: str, name: str, value: Any, minimum: int, expected: str) -> None:
    check(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, owner, name, value, expected)


def check_float(owner: str, name: str, value: Any, low: float, high: float, expected: str,
                low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    check(ok, owner, name, value, expected)


@dataclass(frozen=True)
class Dense:
    r"""Dense MultiMix (:mod:`lightning_multimix.dense`): the feature map interpolated at every position (or token).

    Args:
        attention: ``"cam"`` (own-label class activation map), ``"softmax"`` (of the same scores) or ``"uniform"``.
        feature_map: dotted path of the module outputting the map, ``(b, d, h, w)`` or ``(b, r, d)``; ``None``:
            detected. Its mean over positions (a ViT's class token) must equal the head's input on the first batch.

    Example:
        >>> from lightning_multimix import MultiMix
        >>> MultiMix(dense=Dense(attention="softmax")).dense
        Dense(attention='softmax', feature_map=None)
    """

    attention: Literal["cam", "softmax", "uniform"] = "cam"
    feature_map: Optional[str] = None

    def __post_init__(self) -> None:
        check(self.attention in ATTENTION_KINDS, "Dense", "attention", self.attention, f"one of {ATTENTION_KINDS}")
        check(self.feature_map is None or (isinstance(self.feature_map, str) and bool(self.feature_map)), "Dense",
              "feature_map", self.feature_map, "None or the dotted path of a submodule, e.g. 'backbone.layer4'")


@dataclass(frozen=True)
class SelfDistillation:
    r"""Self-distillation: an EMA teacher's predictions on the student's (mixed) inputs enter the targets at ``beta``.

    Args:
        weight, temperature: ``beta``'s final value (``0``: as without distillation, but the teacher runs) and ``T``.
        targets: ``"probs"``: ``((1 - beta) Y + beta softmax(teacher_logits / T)) Lambda``; ``"logits"``: the
            teacher's prediction on its interpolated embeddings, ``softmax(g_T(Z_T Lambda) / T)`` (not with ``Dense``).
        warmup_steps: optimizer steps of ``beta``'s linear ramp-up: ``weight * min(1, global_step / warmup_steps)``.
        ema_decay: the teacher's EMA decay, applied at every optimizer step.
        ema_warmup: warm the decay up as ``min(ema_decay, (1 + t) / (10 + t))`` after update ``t``.
        validate_with_teacher: run validation and test on the teacher's weights (swapped in, then back).

    Example:
        >>> from lightning_multimix import MultiMix
        >>> MultiMix(distill=SelfDistillation(weight=0.3)).distill.weight
        0.3
    """

    weight: float = 0.5
    targets: Literal["probs", "logits"] = "probs"
    temperature: float = 1.0
    warmup_steps: int = 1000
    ema_decay: float = 0.999
    ema_warmup: bool = True
    validate_with_teacher: bool = False

    def __post_init__(self) -> None:
        owner = "SelfDistillation"
        check_float(owner, "weight", self.weight, 0.0, 1.0, "a value in [0, 1]")
        check(self.targets in DISTILL_TARGETS, owner, "targets", self.targets, f"one of {DISTILL_TARGETS}")
        check_float(owner, "temperature", self.temperature, 0.0, math.inf, "a finite value > 0", low_open=True)
        check_int(owner, "warmup_steps", self.warmup_steps, 0, "an int >= 0")
        check_float(owner, "ema_decay", self.ema_decay, 0.0, 1.0, "a value in [0, 1], e.g. 0.999")
        check(isinstance(self.ema_warmup, bool), owner, "ema_warmup", self.ema_warmup, "True or False")
        check(isinstance(self.validate_with_teacher, bool), owner, "validate_with_teacher",
              self.validate_with_teacher, "True or False")

    def beta(self, global_step: int) -> float:
        """The teacher's weight in the targets at ``global_step``.

        Example:
            >>> SelfDistillation(weight=0.5, warmup_steps=100).beta(50)
            0.25
        """
        if self.warmup_steps == 0:
            return self.weight
        return self.weight * min(1.0, global_step / self.warmup_steps)


def validate_multimix(n_tuples: Optional[int], alpha: float, mode: str, tuple_size: Optional[int],
                      probability: float, other_batches: Optional[str], mixup_alpha: Optional[float],
                      clean_loss_weight: float, label_smoothing: float, ignore_index: Optional[int],
                      head: Optional[str], logit_space: str, dense: Optional[Dense],
                      distill: Optional[SelfDistillation], sync_batch: bool, seed: Optional[int],
                      check_every_n_steps: int) -> None:
    """Raise ``ValueError`` on a bad or inapplicable argument of :class:`~lightning_multimix.MultiMix`."""
    owner = "MultiMix"
    check(mode in MODES, owner, "mode", mode, f"one of {MODES}")
    if n_tuples is not None:
        check_int(owner, "n_tuples", n_tuples, 1, "the number of interpolated examples per batch, e.g. 1000")
    check_float(owner, "alpha", alpha, 0.0, math.inf, "a finite value > 0, e.g. alpha=1.0", low_open=True)
    if tuple_size is not None:
        check_int(owner, "tuple_size", tuple_size, 2, "None (the whole batch) or an int >= 2")
    check_float(owner, "probability", probability, 0.0, 1.0, "a probability in [0, 1]")
    check(other_batches is None or other_batches in OTHER_BATCHES, owner, "other_batches", other_batches,
          f"None or one of {OTHER_BATCHES}")
    if mixup_alpha is not None:
        check_float(owner, "mixup_alpha", mixup_alpha, 0.0, math.inf, "None or a finite value > 0, e.g. 1.0",
                    low_open=True)
    check_float(owner, "clean_loss_weight", clean_loss_weight, 0.0, math.inf, "a finite value >= 0")
    check_float(owner, "label_smoothing", label_smoothing, 0.0, 1.0, "a value in [0, 1)")
    check(label_smoothing < 1.0, owner, "label_smoothing", label_smoothing, "a value in [0, 1)")
    check(head is None or (isinstance(head, str) and bool(head)), owner, "head", head, "None or a dotted path")
    check(logit_space in LOGIT_SPACES, owner, "logit_space", logit_space, f"one of {LOGIT_SPACES}")
    check(seed is None or (isinstance(seed, int) and not isinstance(seed, bool)), owner, "seed", seed, "None or an int")
    check(ignore_index is None or (isinstance(ignore_index, int) and not isinstance(ignore_index, bool)
                                   and ignore_index < 0), owner, "ignore_index", ignore_index,
          "None or a negative int (a label no class has), e.g. -100")
    check(isinstance(sync_batch, bool), owner, "sync_batch", sync_batch, "True or False")
    check_int(owner, "check_every_n_steps", check_every_n_steps, 1, "an int >= 1")
    for name, value, cls in (("dense", dense, Dense), ("distill", distill, SelfDistillation)):
        if value is not None and not isinstance(value, cls):
            raise ValueError(f"MultiMix: `{name}={value!r}`; pass None (off) or a `{cls.__name__}(...)` with its "
                             f"options, e.g. `MultiMix({name}={cls.__name__}())`.")
    not_applying = []
    if mode == "pairs":
        not_applying += [f"`{n}={v!r}` (mode='pairs' mixes pairs: n = b)" for n, v in
                         (("n_tuples", n_tuples), ("tuple_size", tuple_size)) if v is not None]
        if other_batches == "pairs":
            not_applying.append("`other_batches='pairs'` with mode='pairs' (that is probability=1.0)")
    if probability == 1.0:
        not_applying += [f"`{n}={v!r}` (probability=1.0: every batch is mixed by {mode!r})" for n, v in
                         (("other_batches", other_batches), ("mixup_alpha", mixup_alpha)) if v is not None]
    elif probability == 0.0:
        if other_batches == "own_loss":
            raise ValueError("MultiMix: `probability=0.0` with `other_batches='own_loss'` mixes no batch at all. "
                             "Remove the callback for plain training, or set probability > 0.")
        not_applying += [f"`{n}={v!r}` (probability=0.0: no batch is mixed by {mode!r})" for n, v in
                         (("n_tuples", n_tuples), ("tuple_size", tuple_size), ("dense", dense)) if v is not None]
    if probability < 1.0 and other_batches == "own_loss" and mixup_alpha is not None:
        not_applying.append(f"`mixup_alpha={mixup_alpha!r}` (other_batches='own_loss' does not mix them)")
    if dense is not None and distill is not None and distill.targets == "logits":
        not_applying.append("`SelfDistillation(targets='logits')` with `Dense` (dense takes targets='probs': the "
                            "teacher's per-example predictions are the targets every position inherits)")
    if not_applying:
        raise ValueError("MultiMix: options that do not apply: " + "; ".join(not_applying) + ". Leave them unset.")
