"""One training step under MultiMix: what stands in for the module's ``training_step`` while the callback is installed.

:class:`TrainingStep` decides how the batch is mixed, mixes the inputs for input mixup, runs the user's
``training_step`` with the captures armed, finds the head on the first batch when nothing named it, and returns the
objective in place of the user's loss. Its contract with the callback is explicit: it reads :class:`StepOptions`, the
:class:`~lightning_multimix.sampling.RandomStream` and, when the head is known before the fit, a :class:`HeadPlan`;
it hands each mixed batch's :class:`StepReport` to ``report``. It never touches the callback itself.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_multimix.batch import InputMixer, check_labels, default_labels, default_mix_inputs
from lightning_multimix.capture import CallOrder, StepCapture
from lightning_multimix.checks import check_equal_batch_sizes, check_found_head, check_teacher_entry, check_user_loss
from lightning_multimix.errors import MultiMixError
from lightning_multimix.heads import BufferSafeHead, HeadPlan, declared_feature_map, head_plan
from lightning_multimix.objective import TeacherOutputs, mixup_objective, multimix_objective
from lightning_multimix.options import Dense, SelfDistillation
from lightning_multimix.probe import HeadProbe
from lightning_multimix.sampling import RandomStream
from lightning_multimix.teacher import Distiller
from lightning_multimix.user_loss import LossFit, explain_loss, plain_cross_entropy

if TYPE_CHECKING:
    import lightning.pytorch as pl

KINDS = ("multimix", "pairs", "input_mixup", "own_loss")


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What the step reads of the callback's options (see :class:`~lightning_multimix.MultiMix`)."""

    mode: str
    probability: float
    other_batches: str
    mixup_alpha: float
    label_smoothing: float
    clean_loss_weight: float
    ignore_index: Optional[int]
    logit_space: str
    sync_batch: bool
    dense: Optional[Dense]
    distill: Optional[SelfDistillation]
    #: ``(num_examples, kind, generator, keep) -> (m, n)`` weights of a batch mixed at the last layer
    sample_weights: Callable[..., Tensor]


@dataclasses.dataclass(frozen=True)
class StepReport:
    """What one mixed batch gave: the loss and what the step read, for the health check and the log."""

    index: int  #: the batch's index in the random stream
    kind: str  #: how it was mixed (:data:`KINDS`)
    loss: Tensor
    labels: Tensor  #: on the logits' device, int64
    num_classes: int  #: the head's outputs
    #: ``(b,)`` booleans: labels neither in ``[0, num_classes)`` nor the ignore index (on input-mixup batches only -100
    #: without an ignore index: the cross-entropy raises on the others itself); ``None``: not checked
    unexpected: Optional[Tensor]
    plan: HeadPlan  #: the head the step trained
    first: bool  #: the first mixed batch of the fit


class TrainingStep:
    """Stands in for ``module.training_step`` (the original is ``original``) during one fit; removed in ``teardown``.

    It holds the state of the fit that only the step needs: the captures (or, until the head is known, the probe),
    the generator, what the first batch verified, and :attr:`batch_counts`.
    """

    def __init__(self, module: "pl.LightningModule", original: Any, options: StepOptions, stream: RandomStream,
                 report: Callable[[StepReport], None], plan: Optional[HeadPlan] = None,
                 distiller: Optional[Distiller] = None) -> None:
        self.module, self.original, self.options, self.stream = module, original, options, stream
        self.report, self.plan, self.distiller = report, plan, distiller
        self.__wrapped__ = original  # what Lightning's `is_overridden` and `inspect` look through
        self.generator = torch.Generator(device=module.device)
        self.capture = self._capture() if plan is not None else None
        self.batch_counts: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.verified = self.features_verified = self.warned_small_batch = False
        self.loss_fit: Optional[LossFit] = None  #: how the user's loss relates to the cross-entropy (first batch)
        self.inputs_mixable: Optional[bool] = None
        # whether the batches are gathered across processes (every process then makes the same collective calls)
        self.gathering = options.sync_batch and module.trainer.world_size > 1
        self.read_labels = getattr(module, "multimix_labels", default_labels)

    def _capture(self) -> StepCapture:
        head = self.module.get_submodule(self.plan.head_path)
        # the head the interpolations run through: one with buffers (batch norm) runs on copies of them
        self.head = BufferSafeHead(head) if next(head.buffers(), None) is not None else head
        return StepCapture.of(self.module, self.plan.head_path, self.plan.feature_spec,
                              inputs=self.options.distill is not None)

    def remove(self) -> None:
        if self.capture is not None:
            self.capture.remove()
            self.capture = None

    def __deepcopy__(self, memo: dict) -> Any:
        """A deep copy of the module gets the module's own ``training_step`` (bound to the copy), not this."""
        return copy.deepcopy(self.original, memo)

    def __reduce__(self) -> tuple:
        return getattr, (self.module, "training_step")

    # ------------------------------------------------------------------ the step

    def kind(self, batch_index: int, rank: int) -> str:
        """How batch ``batch_index`` is mixed: ``mode`` with chance ``probability``, else ``other_batches``; with
        ``sync_batch`` every process takes rank 0's decision (they all join the gather)."""
        options = self.options
        coin = self.stream.coin(batch_index, 0 if options.sync_batch else rank)
        if options.probability < 1.0 and not coin < options.probability:
            return options.other_batches
        return options.mode

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module, options = self.module, self.options
        if not module.trainer.training:  # a validation_step that calls training_step: not a training batch
            return self.original(*args, **kwargs)
        rank = module.trainer.global_rank
        index = self.stream.next_batch()
        kind = self.kind(index, rank)
        batch = args[0] if args else kwargs["batch"]
        labels = check_labels(self.read_labels(batch))
        if kind != "own_loss" and self.gathering:
            check_equal_batch_sizes(module, labels.shape[0])  # every process, before any may take another way
        if kind != "own_loss" and labels.shape[0] < 2:
            if not self.warned_small_batch:
                rank_zero_warn(f"MultiMix: a training batch of {labels.shape[0]} example cannot be mixed; such "
                               "batches train on your own loss. Pass `DataLoader(..., drop_last=True)` to drop them.")
                self.warned_small_batch = True
            kind = "own_loss"
        if kind == "own_loss":
            self.batch_counts[kind] += 1
            return self.original(*args, **kwargs)

        self.stream.seed(self.generator, index, rank)
        mixer = InputMixer(options.mixup_alpha, self.generator) if kind == "input_mixup" else None
        if mixer is not None:
            mixed = self._mix_batch(batch, mixer)
            if mixed is None:
                kind, mixer = "pairs", None  # the inputs cannot be interpolated: mix this batch at the last layer
            elif args:
                args = (mixed, *args[1:])
            else:
                kwargs = {**kwargs, "batch": mixed}
        probe = None
        if self.capture is None:
            dense = options.dense
            named_map = declared_feature_map(module, dense.feature_map) if dense is not None else None
            probe = HeadProbe(module, dense=dense is not None, feature_maps=(named_map,) if named_map else ())
        order = CallOrder(module) if self.distiller is not None and not self.verified else contextlib.nullcontext()
        try:
            with probe if probe is not None else self.capture, order:
                output = self.original(*args, **kwargs)
            if isinstance(output, dict) and "loss" not in output:
                raise MultiMixError(
                    f"`training_step` returned a dict without a 'loss' key (keys {sorted(map(str, output))}); "
                    "Lightning optimises `output['loss']` and MultiMix replaces it. Return `{'loss': loss, ...}`."
                )
            user_loss = output["loss"] if isinstance(output, dict) else output
            if user_loss is None:
                return output  # the user skipped this batch
            if not isinstance(user_loss, Tensor):
                raise MultiMixError(f"`training_step` returned {type(output).__name__}; MultiMix needs a loss tensor "
                                    "or a dict with 'loss'.")
            capture = self._adopt(probe, user_loss, labels) if probe is not None else self.capture
            if isinstance(order, CallOrder):
                check_teacher_entry(module, capture.model_inputs()[0], order)
            loss, labels, unexpected, num_classes = self._loss(kind, capture, labels, mixer, user_loss)
        finally:
            if probe is not None:
                probe.remove()
        self.batch_counts[kind] += 1
        self.report(StepReport(index, kind, loss, labels, num_classes, unexpected, self.plan,
                               first=not self.verified))
        self.verified = True
        return {**output, "loss": loss} if isinstance(output, dict) else loss

    def _adopt(self, probe: HeadProbe, user_loss: Tensor, labels: Tensor) -> StepCapture:
        """First batch, no declared head: choose it from what ran, check that it explains the user's loss, and capture
        it from the next batch on; this batch's tensors come from the probe."""
        options = self.options
        chosen = probe.choose()
        outputs = probe.linear_outputs()
        if chosen in outputs:  # else the head's shape is wrong, and `head_tensors` says so
            labels = labels.to(outputs[chosen].device).long()
            self.loss_fit = check_found_head(chosen, probe.how, outputs, user_loss, labels, options.ignore_index)
        self.plan = head_plan(self.module, chosen, probe.how, options.dense, options.logit_space)
        if self.distiller is not None:
            self.distiller.watch(self.plan.head_path)
        self.capture = self._capture()
        return probe.step_capture(self.plan.head_path, self.plan.feature_spec)

    def _loss(self, kind: str, capture: StepCapture, labels: Tensor, mixer: Optional[InputMixer],
              user_loss: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor], int]:
        """The objective of the batch, and what was read of its labels: ``(loss, labels, unexpected, num_classes)``."""
        options, plan = self.options, self.plan
        embeddings, logits = capture.head_tensors()
        if embeddings.shape[0] != labels.shape[0]:
            raise MultiMixError(f"The head {capture.head_path!r} ran on {embeddings.shape[0]} embeddings but the "
                                f"batch has {labels.shape[0]} labels. Pass `MultiMix(head='dotted.path')`.")
        labels = labels.to(logits.device).long()
        if not self.verified:
            fit = self.loss_fit or explain_loss(user_loss, logits, labels, options.ignore_index)
            self.loss_fit = check_user_loss(fit, plan.head_path, logits, labels, options.ignore_index,
                                            options.label_smoothing)
        dense_now = options.dense is not None and kind == options.mode
        features = mask = None
        if options.dense is not None and (dense_now or not self.features_verified):
            features, mask = capture.feature_map(embeddings, verify=not self.features_verified)
            self.features_verified = True  # checked on the first batch, whichever way it is mixed
        teacher = None
        if self.distiller is not None:
            with_embeddings = not plan.logit_space and options.distill.targets == "logits" and mixer is None
            teacher = self.distiller.outputs(*capture.model_inputs(), self.module.trainer.global_step,
                                             with_embeddings)
        num_classes, ignore = logits.shape[-1], options.ignore_index
        unexpected = None
        if mixer is not None:  # F.cross_entropy's terms: a label out of range fails there (the first batch says why)
            loss = mixup_objective(logits, labels, *mixer.draw, teacher=teacher,
                                   ignore_index=ignore if ignore is not None else -100,
                                   label_smoothing=self.label_smoothing)
            if ignore is None:  # every label must be a class, but F.cross_entropy's -100 would pass, left out
                unexpected = labels == -100
        else:  # the objective reads a label out of range as a class in range: counted for the health check
            keep = labels != ignore if ignore is not None else None
            in_range = labels.clamp(0, num_classes - 1) == labels
            unexpected = ~in_range if keep is None else keep > in_range  # booleans: kept and not a class
            loss = self._last_layer_loss(kind, capture, embeddings, logits, labels, keep,
                                         features if dense_now else None, mask if dense_now else None, teacher)
            if options.clean_loss_weight > 0:
                loss = loss + options.clean_loss_weight * user_loss.float()
        if self.loss_fit.rest:  # the user's other terms: their loss less the cross-entropy MultiMix replaces
            ce = plain_cross_entropy(logits, labels, options.ignore_index, self.loss_fit.label_smoothing)
            loss = loss + (user_loss.float() - ce)
        return loss, labels, unexpected, num_classes

    def _mix_batch(self, batch: Any, mixer: InputMixer) -> Optional[Any]:
        """The batch with its inputs mixed, or ``None`` (said once) when they cannot be interpolated."""
        if self.inputs_mixable is False:
            return None
        hook = getattr(self.module, "multimix_mix_inputs", None)
        mixed = hook(batch, mixer) if hook is not None else default_mix_inputs(batch, mixer)
        if mixed is None or mixer.draw is None:
            if self.inputs_mixable is None:
                rank_zero_info(
                    f"MultiMix: the inputs of {type(self.module).__name__}'s batches cannot be interpolated (no "
                    "floating-point tensor in `batch[0]` or under a usual dict key): the batches not mixed by "
                    f"{self.options.mode!r} are mixed by last-layer pairs instead of input mixup. Override "
                    "`MultiMixMixin.multimix_mix_inputs` to say where the inputs are."
                )
            self.inputs_mixable = False
            return None
        self.inputs_mixable = True
        return mixed

    def _last_layer_loss(self, kind: str, capture: StepCapture, embeddings: Tensor, logits: Tensor, labels: Tensor,
                         keep: Optional[Tensor], features: Optional[Tensor], mask: Optional[Tensor],
                         teacher: Optional[TeacherOutputs]) -> Tensor:
        options, plan, module = self.options, self.plan, self.module
        if self.gathering:

            def gather(t: Optional[Tensor]) -> Optional[Tensor]:
                if t is None:
                    return None
                gathered = module.all_gather(t, sync_grads=True)
                if gathered.requires_grad:  # the backward of torch.distributed.nn's all_gather misreads a strided
                    # gradient (gloo: wrong gradients), such as the class-major product's
                    gathered.register_hook(lambda grad: grad.contiguous())
                return gathered.flatten(0, 1)

            # what the objective reads, and only that: the same collectives on every process
            logit_path = features is None and plan.logit_space
            embeddings = None if logit_path or features is not None else gather(embeddings)
            logits = gather(logits) if logit_path else None
            labels, keep, features, mask = map(gather, (labels, keep, features, mask))
            if teacher is not None:
                teacher = dataclasses.replace(teacher, logits=gather(teacher.logits),
                                              embeddings=gather(teacher.embeddings))
        weights = options.sample_weights(labels.shape[0], kind, self.generator, keep)
        head = self.head
        common = {"teacher": teacher, "label_smoothing": self.label_smoothing}
        if features is not None:
            return multimix_objective(weights, labels, feature_map=features, head=plan.position_head or head,
                                      attention=options.dense.attention, position_mask=mask,
                                      affine_head=plan.logit_space, **common)
        if plan.logit_space:
            return multimix_objective(weights, labels, logits=logits, **common)
        return multimix_objective(weights, labels, embeddings=embeddings, head=head, **common)

    @property
    def label_smoothing(self) -> float:
        """The smoothing of the mixed targets: ``MultiMix(label_smoothing=...)``, else what the user's loss uses."""
        fit = self.loss_fit
        return self.options.label_smoothing or (fit.label_smoothing if fit is not None else 0.0)
