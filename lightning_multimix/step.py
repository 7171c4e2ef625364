"""One training step under MultiMix: what stands in for the module's ``training_step`` while the callback is installed.

:class:`TrainingStep` decides how the batch is mixed, mixes the inputs for input mixup, runs the user's step with the
captures armed, has the head found (:mod:`~lightning_multimix.head`) and the targets read on the first batch, and
returns the objective in place of the user's loss. It reads the options, the random stream, the ``sample_weights``
hook and the head's plan, and hands each mixed batch's :class:`StepReport` to ``report``; it never touches the callback.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_multimix.batch import InputMixer, default_labels, default_mix_inputs
from lightning_multimix.capture import CallOrder, Capture, StepCapture
from lightning_multimix.errors import MultiMixError
from lightning_multimix.head import HeadPlan, HeadProbe, LogitsProbe, check_found_head, declared, head_plan
from lightning_multimix.head import head_tensors, position_logits
from lightning_multimix.interpolation import runnable_head
from lightning_multimix.objective import TeacherOutputs, mixup_objective, multimix_objective
from lightning_multimix.options import MultiMixOptions
from lightning_multimix.positions import resized
from lightning_multimix.sampling import RandomStream
from lightning_multimix.targets import Targets, flat_positions, per_position, read_targets, target_tensor
from lightning_multimix.teacher import Distiller, check_teacher_entry

if TYPE_CHECKING:
    import lightning.pytorch as pl

KINDS = ("multimix", "pairs", "input_mixup", "own_loss")


@dataclasses.dataclass(frozen=True)
class StepReport:
    """What one mixed batch gave: the loss and what the step read, for the health check and the log."""

    index: int  #: the batch's index in the random stream
    kind: str  #: how it was mixed (:data:`KINDS`)
    loss: Tensor
    batch_size: int
    unexpected: Optional[Tensor]  #: ``(b,)`` booleans, labels neither a class nor ignored; ``None``: not checked
    first: bool  #: the first mixed batch of the fit


class TrainingStep:
    """Stands in for ``module.training_step`` (the original is ``original``) during one fit; removed in ``teardown``.
    It holds what only the step needs: the captures, the generator, the targets and :attr:`batch_counts`."""

    def __init__(self, module: "pl.LightningModule", original: Any, options: MultiMixOptions, stream: RandomStream,
                 sample_weights: Callable[..., Tensor], report: Callable[[StepReport], None],
                 plan: Optional[HeadPlan] = None, distiller: Optional[Distiller] = None) -> None:
        self.module, self.original, self.options, self.stream = module, original, options, stream
        self.sample_weights, self.report, self.plan, self.distiller = sample_weights, report, plan, distiller
        self.__wrapped__ = original  # what Lightning's `is_overridden` and `inspect` look through
        self.generator = torch.Generator(device=module.device)
        self.capture = self._capture() if plan is not None else None
        self.batch_counts: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.features_verified = self.warned_small_batch = False
        self.targets: Optional[Targets] = None  #: read on the first mixed batch
        self.inputs_mixable: Optional[bool] = None
        # whether the batches are gathered across processes (every process then makes the same collective calls)
        self.gathering = options.sync_batch and module.trainer.world_size > 1
        self.read_labels = getattr(module, "multimix_labels", default_labels)

    def _capture(self) -> StepCapture:
        self.head = runnable_head(self.module.get_submodule(self.plan.head_path))
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
        labels = target_tensor(self.read_labels(batch))
        if kind != "own_loss" and self.gathering:
            self._check_equal_batch_sizes(labels.shape[0])  # every process, before any may take another way
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
            mixed = self._mixed_inputs(batch, mixer)
            if mixed is None:
                kind, mixer = "pairs", None  # the inputs cannot be interpolated: mix this batch at the last layer
            elif args:
                args = (mixed, *args[1:])
            else:
                kwargs = {**kwargs, "batch": mixed}
        probe = None
        if self.targets is None and per_position(labels) and (self.plan is None or self.plan.positions is None):
            options.check_per_position()
            probe = LogitsProbe(module, None if self.plan is None else (self.plan.head_path,))
        elif self.capture is None:
            dense = options.dense
            named_map = declared(module, dense.feature_map, "multimix_feature_map") if dense is not None else None
            probe = HeadProbe(module, dense=dense is not None, feature_maps=(named_map,) if named_map else ())
        first = self.targets is None
        order = CallOrder(module) if self.distiller is not None and first else contextlib.nullcontext()
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
            if isinstance(probe, LogitsProbe):
                capture = self._adopt_positions(probe, user_loss, labels)
            else:
                capture = self._adopt(probe, user_loss, labels) if probe is not None else self.capture
            loss, unexpected = self._loss(kind, capture, labels, mixer, user_loss,
                                          order if isinstance(order, CallOrder) else None)
        finally:
            if probe is not None:
                probe.remove()
        self.batch_counts[kind] += 1
        self.report(StepReport(index, kind, loss, labels.shape[0], unexpected, first))
        return {**output, "loss": loss} if isinstance(output, dict) else loss

    def _adopt(self, probe: HeadProbe, user_loss: Tensor, labels: Tensor) -> StepCapture:
        """First batch, no head known: choose it from what ran, check that it explains the user's loss, and capture it
        from the next batch on; this batch's tensors come from the probe."""
        options = self.options
        chosen, source = probe.choose()
        outputs = probe.linear_outputs()
        device = outputs[chosen].device if chosen in outputs else labels.device
        check_found_head(chosen, source, outputs, user_loss, _on(labels, device), options.ignore_index)
        self.plan = head_plan(self.module, chosen, source, options.dense, options.logit_space)
        if self.distiller is not None:
            self.distiller.watch(self.plan.head_path)
        self.capture = self._capture()
        spec = self.plan.feature_spec
        head, features, inputs = probe.recorded(self.plan.head_path, spec[0] if spec is not None else None)
        return StepCapture(self.plan.head_path, head, spec, features, inputs)

    def _adopt_positions(self, probe: LogitsProbe, user_loss: Tensor, labels: Tensor) -> StepCapture:
        """First batch of labels per position: the module whose output holds the logits the user's loss reads
        (declared, or the innermost that explains the loss); this batch's tensors come from the probe."""
        path, *positions = probe.choose(user_loss, labels, self.options.ignore_index)
        source = self.plan.source if self.plan is not None else "read"
        self.plan = HeadPlan(path, source, logit_space=True, positions=tuple(positions))
        self.remove()
        self.capture = StepCapture(path, Capture(self.module.get_submodule(path)))
        return StepCapture(path, probe.modules[path])

    def _read_targets(self, user_loss: Tensor, logits: Tensor, labels: Tensor, class_dim: int = -1,
                      resize: bool = False) -> Targets:
        """First batch: the targets (:func:`~lightning_multimix.targets.read_targets`), said in the log with the target
        type's default settings. Called only while ``self.targets`` is unset, so later steps make no call."""
        options = self.options
        self.targets, notes = read_targets(user_loss, logits, labels, options.ignore_index, options.label_smoothing,
                                           self.plan.head_path, class_dim, resize)
        for note in [*notes, *options.type_defaults_note(self.targets.kind)]:
            rank_zero_info(note)
        return self.targets

    def _position_loss(self, kind: str, capture: StepCapture, labels: Tensor, mixer: Optional[InputMixer],
                       user_loss: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """The objective of a batch of labels per position, and the labels neither a class nor ignored."""
        where, class_dim, resize = self.plan.positions
        raw = position_logits(capture.head, capture.head_path, where, class_dim, resize, labels)
        labels = _on(labels, raw.device)
        targets = self.targets or self._read_targets(user_loss, raw, labels, class_dim, resize)
        logits, flat = local = flat_positions(resized(raw, labels) if resize else raw, labels, class_dim)
        ignore = targets.ignore_index
        if mixer is not None:
            loss = mixup_objective(logits, flat, *mixer.draw, ignore_index=ignore if ignore is not None else -100,
                                   label_smoothing=targets.label_smoothing)
        else:
            if self.gathering:
                logits, flat = (self.module.all_gather(t, sync_grads=True).flatten(0, 1) for t in (logits, flat))
            weights = self.sample_weights(flat.shape[0], kind, self.generator, None)
            loss = multimix_objective(weights, flat, logits=logits, label_smoothing=targets.label_smoothing,
                                      ignore_index=ignore)
            if self.options.clean_loss_weight > 0:
                loss = loss + self.options.clean_loss_weight * user_loss.float()
        other_terms = targets.other_terms(user_loss, *local)
        return (loss + other_terms if other_terms is not None else loss), targets.outside(flat)

    def _loss(self, kind: str, capture: StepCapture, labels: Tensor, mixer: Optional[InputMixer], user_loss: Tensor,
              order: Optional[CallOrder]) -> tuple[Tensor, Optional[Tensor]]:
        """The objective of the batch, and its labels that are neither a class nor ignored (``None``: not counted)."""
        options, plan = self.options, self.plan
        if plan.positions is not None:
            return self._position_loss(kind, capture, labels, mixer, user_loss)
        embeddings, logits = head_tensors(capture.head, capture.head_path)
        if embeddings.shape[0] != labels.shape[0]:
            raise MultiMixError(f"The head {capture.head_path!r} ran on {embeddings.shape[0]} embeddings but the "
                                f"batch has {labels.shape[0]} labels. Pass `MultiMix(head='dotted.path')`.")
        labels = _on(labels, logits.device)
        targets = self.targets or self._read_targets(user_loss, logits, labels)
        dense_now = options.dense is not None and kind == options.mode
        features = mask = None
        if options.dense is not None and (dense_now or not self.features_verified):
            features, mask = capture.feature_map(embeddings, verify=not self.features_verified)
            self.features_verified = True  # checked on the first batch, whichever way it is mixed
        teacher = None
        if self.distiller is not None:
            inputs = check_teacher_entry(self.module, capture.head_path, capture.model_inputs(), order)
            with_embeddings = not plan.logit_space and options.distill.targets == "logits" and mixer is None
            teacher = self.distiller.outputs(*inputs, self.module.trainer.global_step, with_embeddings)
        if mixer is not None:  # F.cross_entropy's terms: a label out of range fails there (the first batch says why)
            ignore = targets.ignore_index
            loss = mixup_objective(logits, labels, *mixer.draw, teacher=teacher,
                                   ignore_index=ignore if ignore is not None else -100,
                                   label_smoothing=targets.label_smoothing, loss=targets.loss.kind)
            if targets.soft or targets.loss.kind == "bce":  # lerped targets, checked by nothing else: counted
                unexpected = targets.outside(labels)
            else:  # every label must be a class, but F.cross_entropy would leave a -100 out: counted
                unexpected = labels == -100 if ignore is None else None
        else:  # the objective reads a label out of range as a class in range: counted for the health check
            keep = targets.keep(labels)
            unexpected = targets.outside(labels, keep)
            loss = self._last_layer_loss(kind, embeddings, logits, labels, keep, features if dense_now else None,
                                         mask if dense_now else None, teacher)
            if options.clean_loss_weight > 0:
                loss = loss + options.clean_loss_weight * user_loss.float()
        other_terms = targets.other_terms(user_loss, logits, labels)
        return (loss + other_terms if other_terms is not None else loss), unexpected

    def _mixed_inputs(self, batch: Any, mixer: InputMixer) -> Optional[Any]:
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

    def _last_layer_loss(self, kind: str, embeddings: Tensor, logits: Tensor, labels: Tensor, keep: Optional[Tensor],
                         features: Optional[Tensor], mask: Optional[Tensor],
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
        weights = self.sample_weights(labels.shape[0], kind, self.generator, keep)
        common = {"teacher": teacher, "label_smoothing": self.targets.label_smoothing, "loss": self.targets.loss.kind}
        if features is not None:
            return multimix_objective(weights, labels, feature_map=features, head=plan.position_head or self.head,
                                      attention=options.dense.attention, position_mask=mask,
                                      affine_head=plan.logit_space, **common)
        if plan.logit_space:
            return multimix_objective(weights, labels, logits=logits, **common)
        return multimix_objective(weights, labels, embeddings=embeddings, head=self.head, **common)

    def _check_equal_batch_sizes(self, size: int) -> None:
        """``sync_batch`` gathers tensors of equal shapes: stop with a clear error when the processes' batches differ
        (gloo would abort the process). One small collective and a host read per step."""
        module = self.module
        sizes = module.all_gather(torch.tensor(size, device=module.device)).flatten().tolist()
        if len(set(sizes)) > 1:
            raise MultiMixError(
                f"MultiMix(sync_batch=True) needs batches of equal size on every process; this step's sizes are "
                f"{sizes}. Use `DataLoader(..., drop_last=True)` (and a sampler that gives each process as many "
                "examples)."
            )


def _on(labels: Tensor, device: torch.device) -> Tensor:
    """``labels`` on ``device``: class indices as int64, soft targets as they are."""
    labels = labels.to(device)
    return labels if labels.is_floating_point() else labels.long()
