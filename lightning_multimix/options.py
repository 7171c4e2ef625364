"""Every option of MultiMix, declared once: its type, default, check and meaning.

:class:`MultiMixOptions`, :class:`Dense` and :class:`SelfDistillation` are frozen dataclasses that check themselves
(``ValueError`` naming the value and what is expected). The callback's signature, its docstring and the README's table
of options are generated from them (:func:`signature_of`, :func:`args_doc`, :func:`options_table`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import textwrap
import typing
from typing import Any, Callable, ClassVar, Literal, Optional

from lightning_multimix.errors import MultiMixError

ATTENTION_KINDS = ("cam", "softmax", "uniform")
DISTILL_TARGETS = ("probs", "logits")
MODES = ("multimix", "pairs")
OTHER_BATCHES = ("input_mixup", "pairs", "own_loss")
LOGIT_SPACES = ("auto", "always", "never")
#: The settings that differ by target type, where not set (``MultiMixOptions.given``). One rule: targets with many
#: labels per example (multi-hot sets, labels per position) mix pairs, mostly one of the two, because a whole batch's
#: mixed target is near its label frequencies (``benchmarks/sweep.py --task multilabel`` and ``--task segment``);
#: labels per position also take fewer interpolations, each costing a batch of per-position logits
#: (``benchmarks/position_memory.py``). Single labels and probabilities keep the paper's settings.
PAIRS_MOSTLY_ONE = {"tuple_size": 2, "alpha": 0.2}
TYPE_DEFAULTS: dict[str, dict[str, Any]] = {"positions": {"n_tuples": 64, **PAIRS_MOSTLY_ONE},
                                            "multi_hot": dict(PAIRS_MOSTLY_ONE)}


def option(default: Any, doc: str, valid: Callable[[Any], bool], expected: str) -> Any:
    """A dataclass field with its one-line meaning (``doc``) and its check (``valid``, ``expected`` for the error)."""
    return dataclasses.field(default=default, metadata={"doc": doc, "valid": valid, "expected": expected})


def _int(minimum: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _real(low: float, high: float = math.inf, open_low: bool = False, open_high: bool = False) -> Callable[[Any], bool]:
    return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      and (v > low if open_low else v >= low) and (v < high if open_high else v <= high))


def _one_of(choices: tuple) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and v in choices


def _or_none(valid: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or valid(v)


def _is(cls: Any) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, cls)


_path = _or_none(lambda v: isinstance(v, str) and bool(v))


def _check_fields(obj: Any) -> None:
    """Raise ``ValueError`` on the first field of ``obj`` that fails its declared check."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not f.metadata["valid"](value):
            owner = type(obj).__name__.replace("Options", "")  # MultiMixOptions: the user called MultiMix
            raise ValueError(f"{owner}: invalid `{f.name}={value!r}`; expected {f.metadata['expected']}.")


@dataclasses.dataclass(frozen=True)
class Dense:
    r"""Dense MultiMix (:mod:`lightning_multimix.dense`): the feature map interpolated at every position (or token).

    Example:
        >>> from lightning_multimix import MultiMix
        >>> MultiMix(dense=Dense(attention="softmax")).dense
        Dense(attention='softmax', feature_map=None)
    """

    attention: Literal["cam", "softmax", "uniform"] = option(
        "cam", "`cam` (own-label class activation map), `softmax` (of the same scores) or `uniform`",
        _one_of(ATTENTION_KINDS), f"one of {ATTENTION_KINDS}")
    feature_map: Optional[str] = option(
        None, "dotted path of the module outputting the map, `(b, d, h, w)` or `(b, r, d)`; `None`: detected. Its "
        "mean over positions (a ViT's class token) must equal the head's input on the first batch",
        _path, "None or the dotted path of a submodule, e.g. 'backbone.layer4'")

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclasses.dataclass(frozen=True)
class SelfDistillation:
    r"""Self-distillation: an EMA teacher's predictions on the student's (mixed) inputs enter the targets at ``beta``.

    Example:
        >>> from lightning_multimix import MultiMix
        >>> MultiMix(distill=SelfDistillation(weight=0.3)).distill.weight
        0.3
    """

    weight: float = option(0.5, "`beta`'s final value (`0`: as without distillation, but the teacher runs)",
                           _real(0.0, 1.0), "a value in [0, 1]")
    targets: Literal["probs", "logits"] = option(
        "probs", "`probs`: `((1 - beta) Y + beta softmax(teacher_logits / T)) Lambda`; `logits`: the teacher's "
        "prediction on its interpolated embeddings, `softmax(g_T(Z_T Lambda) / T)` (not with `Dense`)",
        _one_of(DISTILL_TARGETS), f"one of {DISTILL_TARGETS}")
    temperature: float = option(1.0, "`T`, the temperature of the teacher's softmax", _real(0.0, open_low=True),
                                "a finite value > 0")
    warmup_steps: int = option(1000, "optimizer steps of `beta`'s linear ramp-up: `weight * min(1, step / "
                               "warmup_steps)`", _int(0), "an int >= 0")
    ema_decay: float = option(0.999, "the teacher's EMA decay, applied at every optimizer step", _real(0.0, 1.0),
                              "a value in [0, 1], e.g. 0.999")
    ema_warmup: bool = option(True, "warm the decay up as `min(ema_decay, (1 + t) / (10 + t))` after update `t`",
                              _is(bool), "True or False")
    validate_with_teacher: bool = option(False, "run validation and test on the teacher's weights (swapped in, "
                                         "then back)", _is(bool), "True or False")

    def __post_init__(self) -> None:
        _check_fields(self)

    def beta(self, global_step: int) -> float:
        """The teacher's weight in the targets at ``global_step``."""
        if self.warmup_steps == 0:
            return self.weight
        return self.weight * min(1.0, global_step / self.warmup_steps)


@dataclasses.dataclass(frozen=True)
class MultiMixOptions:
    """The options of :class:`~lightning_multimix.MultiMix`, checked, with the defaults left ``None`` filled in.

    A ``None`` default means "not set": an option that does not apply is an error only when it was set; ``given``
    holds the names of those set."""

    given: ClassVar[frozenset] = frozenset()

    n_tuples: Optional[int] = option(
        None, "`n`, interpolated examples per batch; `None`: 1000 (64 for labels per position). Not with "
        "`mode='pairs'` (`n = b`)",
        _or_none(_int(1)), "the number of interpolated examples per batch, e.g. 1000")
    alpha: Optional[float] = option(
        None, "concentration of the Dirichlet (`multimix`) or Beta (`pairs`) distribution; `None`: 1, uniform on the "
        "simplex (0.2 for multi-hot targets and labels per position)", _or_none(_real(0.0, open_low=True)),
        "a finite value > 0, e.g. 1.0")
    mode: Literal["multimix", "pairs"] = option(
        "multimix", "`multimix`, or `pairs`: last-layer Manifold Mixup (one `lambda ~ Beta(alpha, alpha)` per batch, "
        "partners by a random permutation), the baseline", _one_of(MODES), f"one of {MODES}")
    tuple_size: Optional[int] = option(
        None, "`m`, examples combined by each interpolation (a random subset per tuple); `None`: the whole batch (2 "
        "for multi-hot targets and labels per position; the batch size or more: the whole batch). Not with "
        "`mode='pairs'`", _or_none(_int(2)), "None or an int >= 2")
    probability: float = option(0.5, "chance that a batch is mixed by `mode` at the last layer (the paper's 0.5); the "
                                "others go as `other_batches`", _real(0.0, 1.0), "a probability in [0, 1]")
    other_batches: Optional[Literal["input_mixup", "pairs", "own_loss"]] = option(
        None, "`input_mixup` (`None`, the paper's protocol: the callback mixes the inputs; inputs that cannot be "
        "interpolated, such as token ids, fall back to `pairs`), `pairs` (last-layer pairs) or `own_loss` (your "
        "unmixed loss). Not with `probability=1`", _or_none(_one_of(OTHER_BATCHES)),
        f"None or one of {OTHER_BATCHES}")
    mixup_alpha: Optional[float] = option(
        None, "`Beta(mixup_alpha, mixup_alpha)` of the other batches; `None`: 1.0. Not when they are not mixed",
        _or_none(_real(0.0, open_low=True)), "None or a finite value > 0, e.g. 1.0")
    clean_loss_weight: float = option(
        0.0, "adds this times your own loss on the batches mixed at the last layer (the paper trains on mixed "
        "examples only)", _real(0.0), "a finite value >= 0")
    label_smoothing: float = option(0.0, "label smoothing of the interpolated targets; `0`: what your loss uses",
                                    _real(0.0, 1.0, open_high=True), "a value in [0, 1)")
    ignore_index: Optional[int] = option(
        -100, "examples (positions, for labels per position) with this label are left out of the mixing, as your "
        "cross-entropy ignores them; at the default, a single other label your loss ignores (such as 255) is read "
        "from it; `None`: every label must be a class", _or_none(_int(-2**63)),
        "None or an int no class has, e.g. -100 or 255")
    head: Optional[str] = option(
        None, "dotted path of the classifier head (`'model.fc'`); `None`: `MultiMixMixin.multimix_head()`, a timm "
        "model's `get_classifier()`, else found on the first batch", _path, "None or a dotted path")
    logit_space: Literal["auto", "always", "never"] = option(
        "auto", "`auto`: interpolate the head's logits when it is an `nn.Linear` (exact, cheaper); `always`: for any "
        "head (you assert it is affine); `never`: run the head on the interpolated embeddings",
        _one_of(LOGIT_SPACES), f"one of {LOGIT_SPACES}")
    dense: Optional[Dense] = option(None, "`Dense(...)`: Dense MultiMix; `None`: off", _or_none(_is(Dense)),
                                    "None (off) or `Dense(...)` with its options, e.g. `MultiMix(dense=Dense())`")
    distill: Optional[SelfDistillation] = option(
        None, "`SelfDistillation(...)`: an EMA teacher's predictions in the targets; `None`: off",
        _or_none(_is(SelfDistillation)),
        "None (off) or `SelfDistillation(...)`, e.g. `MultiMix(distill=SelfDistillation())`")
    sync_batch: bool = option(False, "under DDP, mix the global batch (all processes' embeddings or logits, gathered "
                              "with gradients); `False`: each process mixes its own, as in the paper", _is(bool),
                              "True or False")
    seed: Optional[int] = option(None, "base seed of the callback's generator; `None`: drawn from torch's global RNG "
                                 "at `setup` (so `seed_everything` makes runs reproducible)",
                                 _or_none(_int(-2**63)), "None or an int")
    check_every_n_steps: int = option(
        50, "how often the device-side health check (non-finite loss, labels out of range) is read after the first "
        "batch, besides each epoch's end; a read synchronises the host with the device", _int(1), "an int >= 1")

    def __post_init__(self) -> None:
        _check_fields(self)
        self._check_combinations()
        given = frozenset(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)
        object.__setattr__(self, "given", given)
        fill = {"n_tuples": 1000 if self.mode == "multimix" else None, "other_batches": "input_mixup",
                "mixup_alpha": 1.0, "alpha": 1.0}
        for name, value in fill.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name in ("alpha", "probability", "mixup_alpha", "clean_loss_weight", "label_smoothing"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def for_targets(self, kind: str) -> dict[str, Any]:
        """``n_tuples``, ``alpha`` and ``tuple_size`` in force for targets of ``kind`` (:data:`TYPE_DEFAULTS`'s keys, or
        ``"labels"``): the type's defaults where not set, in ``mode="multimix"``."""
        chosen = {name: getattr(self, name) for name in ("n_tuples", "alpha", "tuple_size")}
        if self.mode == "multimix":
            chosen.update((k, v) for k, v in TYPE_DEFAULTS.get(kind, {}).items() if k not in self.given)
        return chosen

    def type_defaults_note(self, kind: str) -> list[str]:
        """What to say once when targets of ``kind`` change settings that were not set (:meth:`for_targets`)."""
        chosen = self.for_targets(kind)
        changed = [f"{name}={chosen[name]}" for name in TYPE_DEFAULTS.get(kind, {})
                   if chosen[name] != getattr(self, name)]
        what = {"positions": "labels per position", "multi_hot": "multi-hot targets"}.get(kind)
        return [f"MultiMix: {', '.join(changed)}, the defaults for {what}; set them to change."] if changed else []

    def check_per_position(self) -> None:
        """Labels per position are mixed in logit space, without dense mode or a teacher: other options are errors."""
        wrong = [(f"dense={self.dense!r}", "it mixes every position already") if self.dense is not None else None,
                 (f"distill={self.distill!r}", "a teacher's per-position predictions are not carried") if
                 self.distill is not None else None,
                 ("logit_space='never'", "the per-position logits your loss reads are mixed") if
                 self.logit_space == "never" else None]
        wrong = [w for w in wrong if w is not None]
        if wrong:
            raise MultiMixError("MultiMix read labels per position (segmentation masks, token tags), which it mixes at "
                                "every position in logit space; these options do not apply: "
                                f"{'; '.join(f'`{o}` ({why})' for o, why in wrong)}. Remove them.")

    def _check_combinations(self) -> None:
        """Options that do not apply to the others are errors (only when set: ``None`` is "not set")."""
        mode, p = self.mode, self.probability
        if p == 0.0 and self.other_batches == "own_loss":
            raise ValueError("MultiMix: `probability=0.0` with `other_batches='own_loss'` mixes no batch at all. "
                             "Remove the callback for plain training, or set probability > 0.")
        rules = [
            (mode == "pairs", ("n_tuples", "tuple_size"), "mode='pairs' mixes pairs: n = b"),
            (p == 1.0, ("other_batches", "mixup_alpha"), f"probability=1.0: every batch is mixed by {mode!r}"),
            (p == 0.0, ("n_tuples", "tuple_size", "dense"), f"probability=0.0: no batch is mixed by {mode!r}"),
            (p < 1.0 and self.other_batches == "own_loss", ("mixup_alpha",), "other_batches='own_loss' does not mix "
             "them"),
        ]
        wrong = [f"`{name}={getattr(self, name)!r}` ({why})" for applies, names, why in rules if applies
                 for name in names if getattr(self, name) is not None]
        if mode == "pairs" and self.other_batches == "pairs":
            wrong.append("`other_batches='pairs'` with mode='pairs' (that is probability=1.0)")
        if self.dense is not None and self.distill is not None and self.distill.targets == "logits":
            wrong.append("`SelfDistillation(targets='logits')` with `Dense` (dense takes targets='probs': the "
                         "teacher's per-example predictions are the targets every position inherits)")
        if wrong:
            raise ValueError("MultiMix: options that do not apply: " + "; ".join(wrong) + ". Leave them unset.")


def signature_of(cls: type) -> inspect.Signature:
    """``__init__(self, *, <every field>)`` of a dataclass of options, for LightningCLI and ``help()``."""
    hints = typing.get_type_hints(cls)
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
               for f in dataclasses.fields(cls)]
    return inspect.Signature(params, return_annotation=None)


def args_doc(cls: type, indent: int = 8) -> str:
    """The ``Args:`` entries of a docstring, one per field, from the fields' meanings."""
    lines = []
    for f in dataclasses.fields(cls):
        text = f.metadata["doc"].replace("`", "``")
        lines += textwrap.wrap(f"{f.name}: {text}.", width=112, initial_indent=" " * indent,
                               subsequent_indent=" " * (indent + 4))
    return "\n".join(lines)


def options_table(cls: type = MultiMixOptions) -> str:
    """The README's table of options (markdown), from the fields' defaults and meanings."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    rows += [f"| `{f.name}` | `{f.default!r}` | {f.metadata['doc']} |" for f in dataclasses.fields(cls)]
    return "\n".join(rows)
