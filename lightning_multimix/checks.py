"""What MultiMix refuses, and says how to fix: set-ups the step cannot train right, a head that does not explain the
user's loss, a loss it cannot carry, and a teacher that would not run the model's forward. All but the per-step batch
size check run once, before the first optimizer step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from lightning_multimix.capture import CallOrder, ran_before
from lightning_multimix.errors import MultiMixError
from lightning_multimix.health import labels_error
from lightning_multimix.user_loss import LossFit, explain_loss, in_range

if TYPE_CHECKING:
    import lightning.pytorch as pl

LABELS_HOW = ("return them from `MultiMixMixin.multimix_labels(batch)` (MultiMix reads `batch[1]` or a 'label'/"
              "'labels'/'target'/'targets'/'y' key)")


def check_supported(trainer: "pl.Trainer", module: "pl.LightningModule") -> None:
    """Refuse, before any training, what the step cannot do right: manual optimization (MultiMix replaces the loss
    that ``training_step`` returns) and strategies that shard or replace the parameters (FSDP, DeepSpeed, model
    parallelism, XLA)."""
    if not module.automatic_optimization:
        raise MultiMixError(
            "MultiMix replaces the loss returned by `training_step`, which needs automatic optimization; "
            f"{type(module).__name__} sets `automatic_optimization = False`. Compute the loss with "
            "`lightning_multimix.multimix_objective` in your own step instead."
        )
    strategy = trainer.strategy
    name = type(strategy).__name__
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or "XLA" in name or name.startswith(
            ("FSDP", "DeepSpeed", "ModelParallel")):
        raise MultiMixError(
            f"MultiMix supports single-device training and DDP (strategy='ddp', 'ddp_spawn', ...); got "
            f"{type(strategy).__name__}, whose sharded or replaced parameters it has not been made to work with. "
            "Use a DDP strategy, or train without MultiMix."
        )


def check_found_head(chosen: str, how: str, outputs: dict[str, Tensor], user_loss: Tensor, labels: Tensor,
                     ignore_index: Optional[int]) -> Optional[LossFit]:
    """The :class:`~lightning_multimix.user_loss.LossFit` of the head found on the first batch (``outputs``: the
    ``(b, c)`` output of every ``nn.Linear`` that ran); a head that does not explain the user's loss is an error that
    lists the candidates, unless its labels are out of range (the health check then names the labels and the head)."""
    fit = explain_loss(user_loss, outputs[chosen], labels, ignore_index)
    if fit is not None:
        return fit
    fits = [path for path, logits in outputs.items()
            if logits.shape[-1] >= 2 and explain_loss(user_loss, logits, labels, ignore_index) is not None]
    if not fits and not in_range(labels, outputs[chosen].shape[-1], ignore_index):
        return None
    seen = ", ".join(f"{path!r} {tuple(out.shape)}" for path, out in outputs.items())
    hint = (f"Your loss is the cross-entropy of {fits[0]!r}: pass `MultiMix(head={fits[0]!r})`." if len(fits) == 1
            else f"It is the cross-entropy of several of them, {fits}: name the head." if fits else
            "No nn.Linear that ran explains it. Your loss may depend on the logits beyond their cross-entropy (class "
            "weights, a focal or margin loss, a regulariser on the logits, a sum instead of a mean), which MultiMix "
            f"cannot carry; or use other labels than MultiMix read ({LABELS_HOW}); or come from a classifier that is "
            "not an nn.Module (`F.linear` with a parameter: it must be wrapped in a module, and named).")
    raise MultiMixError(
        f"MultiMix found the head {chosen!r} ({how}), but your training_step's loss is not the cross-entropy of its "
        "logits with the batch's labels (plus terms that do not involve them), so it would train the wrong thing. "
        f"The nn.Linear modules that ran: {seen}. {hint} Or pass `MultiMix(head='dotted.path')` / override "
        "`MultiMixMixin.multimix_head()`."
    )


def check_user_loss(fit: Optional[LossFit], head_path: str, logits: Tensor, labels: Tensor,
                    ignore_index: Optional[int], label_smoothing: float) -> LossFit:
    """How MultiMix carries the user's loss (``fit``, from :func:`~lightning_multimix.user_loss.explain_loss`): said
    once; a loss it cannot carry, or a label smoothing that disagrees with ``MultiMix(label_smoothing=...)``, is an
    error that says what to change."""
    if not in_range(labels, logits.shape[-1], ignore_index):
        raise labels_error(logits.shape[-1], "in the first training batch", head_path)
    if fit is None:
        raise MultiMixError(
            f"MultiMix: your training_step's loss is not the cross-entropy of the head {head_path!r}'s logits with the "
            "labels MultiMix read (plus terms that do not involve the logits). MultiMix replaces that cross-entropy "
            "and keeps your other terms, but it cannot carry class weights, a focal or margin loss, a regulariser on "
            f"the logits, or a sum instead of a mean. If those are not the labels your loss uses, {LABELS_HOW}; label "
            "smoothing is carried (or pass `MultiMix(label_smoothing=...)`)."
        )
    if fit.label_smoothing and label_smoothing and abs(fit.label_smoothing - label_smoothing) > 1e-3:
        raise MultiMixError(f"MultiMix(label_smoothing={label_smoothing}) but your loss smooths its labels by "
                            f"{fit.label_smoothing}: set one of them.")
    if fit.label_smoothing and not label_smoothing:
        rank_zero_info(f"MultiMix: your loss smooths its labels by {fit.label_smoothing}; the mixed targets are "
                       "smoothed alike.")
    if fit.rest:
        rank_zero_info("MultiMix: your loss adds terms to the cross-entropy of the head's logits (a regulariser, an "
                       "auxiliary task); they keep training: the loss optimised is the MultiMix loss plus your loss "
                       "minus its cross-entropy.")
    return fit


def check_teacher_entry(model: nn.Module, entry: str, order: CallOrder) -> None:
    """The teacher re-runs ``entry``, the outermost module on the way to the head that the step called: it must be
    the model's forward, not a block the step fed with another module's output."""
    before = ran_before(model, entry, order)
    if before is not None:
        raise MultiMixError(
            f"Self-distillation runs the teacher's own forward on the inputs of your model, but your training_step "
            f"calls {before!r} and then {entry!r} itself (not through `forward`), so the teacher would run {entry!r} "
            "alone on the student's features. Call the model through `self(...)` in training_step, with a `forward` "
            "that runs the whole model to the logits."
        )


def check_equal_batch_sizes(module: "pl.LightningModule", size: int) -> None:
    """``sync_batch`` gathers tensors of equal shapes: stop with a clear error when the processes' batches differ
    (gloo would abort the process). One small collective and a host read per step."""
    sizes = module.all_gather(torch.tensor(size, device=module.device)).flatten().tolist()
    if len(set(sizes)) > 1:
        raise MultiMixError(
            f"MultiMix(sync_batch=True) needs batches of equal size on every process; this step's sizes are {sizes}. "
            "Use `DataLoader(..., drop_last=True)` (and a sampler that gives each process as many examples)."
        )
