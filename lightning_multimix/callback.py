"""The ``MultiMix`` callback: MultiMix for any LightningModule, added with one line to the ``Trainer``.

The callback keeps the life cycle (install on fit start, remove on teardown), its state (random stream, teacher in
checkpoints), logging and the health check; what it computes comes from the tensor core
(:func:`~lightning_multimix.objective.multimix_objective`, :func:`~lightning_multimix.objective.mixup_objective`), what
it reads from the model from :mod:`~lightning_multimix.capture`, :mod:`~lightning_multimix.heads` and
:mod:`~lightning_multimix.batch`, and distillation from :class:`~lightning_multimix.teacher.Distiller`.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_multimix.batch import InputMixer, check_labels, default_labels, default_mix_inputs
from lightning_multimix.capture import StepCapture
from lightning_multimix.errors import MultiMixError
from lightning_multimix.health import HealthFlag
from lightning_multimix.heads import is_affine, resolve_feature_map, resolve_head
from lightning_multimix.objective import TeacherOutputs, mixup_objective, multimix_objective
from lightning_multimix.options import Dense, SelfDistillation, validate_multimix
from lightning_multimix.sampling import dirichlet_weights, pair_weights, step_seed
from lightning_multimix.teacher import Distiller

KINDS = ("multimix", "pairs", "input_mixup", "own_loss")


class MultiMix(Callback):
    r"""Train with MultiMix: interpolations of the whole batch at the last layer, in place of your loss.

    The callback captures the input of the classifier head (the penultimate embeddings) during your own
    ``training_step``, interpolates them and the one-hot targets with the same Dirichlet weights, and makes the
    MultiMix loss the value the optimizer backpropagates. Your module, its ``forward`` and its ``training_step`` stay
    unchanged; validation, test and predict are untouched.

    The defaults follow the paper's protocol: every training batch is mixed, with probability ``probability`` (0.5)
    by MultiMix at the last layer, otherwise by input mixup: the callback mixes the batch's inputs with one
    ``lambda ~ Beta(mixup_alpha, mixup_alpha)`` and a random partner permutation before your ``training_step`` runs,
    and trains on the soft cross-entropy of the head's logits against the same mix of the one-hot targets. MultiMix
    on every batch (``probability=1``) stalls: its whole-batch targets are close to the batch's class histogram.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[MultiMix()], logger=False)
        >>> MultiMix(n_tuples=500, dense=Dense(attention="softmax"), distill=SelfDistillation(weight=0.3)).n_tuples
        500

    Args:
        n_tuples: ``n``, interpolated examples per batch; ``None``: 1000. Not with ``mode="pairs"`` (``n = b``).
        alpha: concentration of the Dirichlet (``"multimix"``) or Beta (``"pairs"``) distribution.
        mode: ``"multimix"``, or ``"pairs"``: last-layer Manifold Mixup (one ``lambda ~ Beta(alpha, alpha)`` per
            batch, partners by a random permutation), the baseline.
        tuple_size: ``m``, examples combined by each interpolation (a random subset per tuple); ``None``: the whole
            batch. Not with ``mode="pairs"``.
        probability: chance that a batch is mixed by ``mode`` at the last layer; the others go as ``other_batches``.
        other_batches: ``"input_mixup"`` (``None``, the paper's protocol): the callback mixes the inputs (found by
            ``MultiMixMixin.multimix_mix_inputs``: ``batch[0]`` or the usual dict keys; inputs that cannot be
            interpolated, such as integer token ids, fall back to ``"pairs"``, said once in the log); ``"pairs"``:
            last-layer pairs; ``"own_loss"``: your ``training_step``'s own loss. Not with ``probability=1``.
        mixup_alpha: ``Beta(mixup_alpha, mixup_alpha)`` of the other batches (input mixup or pairs); ``None``: 1.0.
            Not when the other batches are not mixed.
        clean_loss_weight: adds this times your own loss on the batches mixed at the last layer (your step ran on
            clean inputs there; input-mixup batches have no clean forward and train on the mixup loss alone).
        label_smoothing: label smoothing of the interpolated targets.
        head: dotted path of the classifier head in your LightningModule (``"model.fc"``); ``None``: the
            ``MultiMixMixin.multimix_head`` of your module, else the last ``nn.Linear`` it contains.
        logit_space: ``"auto"``: interpolate the head's logits instead of re-running the head on ``n`` embeddings when
            the head is an ``nn.Linear`` (exact, cheaper); ``"always"``: for any head (you assert it is affine);
            ``"never"``: always run the head on the interpolated embeddings.
        dense: Dense MultiMix (:class:`~lightning_multimix.options.Dense`); ``None``: off.
        distill: self-distillation from an EMA teacher (:class:`~lightning_multimix.options.SelfDistillation`);
            ``None``: off.
        sync_batch: under DDP, gather the embeddings (or logits) and targets of all processes, with gradients, and
            interpolate the global batch; default: each process mixes its own batch, as in the paper.
        seed: base seed of the callback's own generator; ``None``: drawn from torch's global RNG at ``setup`` (so
            ``seed_everything`` makes it reproducible). Each process and each batch get their own stream.
        check_every_n_steps: on an accelerator, how often the device-side health flag (non-finite loss, labels out of
            range) is read; reading it synchronises with the device. On CPU it is read at every step (it is free).
    """

    def __init__(
        self,
        n_tuples: Optional[int] = None,
        alpha: float = 1.0,
        mode: Literal["multimix", "pairs"] = "multimix",
        tuple_size: Optional[int] = None,
        probability: float = 0.5,
        other_batches: Optional[Literal["input_mixup", "pairs", "own_loss"]] = None,
        mixup_alpha: Optional[float] = None,
        clean_loss_weight: float = 0.0,
        label_smoothing: float = 0.0,
        head: Optional[str] = None,
        logit_space: Literal["auto", "always", "never"] = "auto",
        dense: Optional[Dense] = None,
        distill: Optional[SelfDistillation] = None,
        sync_batch: bool = False,
        seed: Optional[int] = None,
        check_every_n_steps: int = 50,
    ) -> None:
        validate_multimix(**{k: v for k, v in locals().items() if k != "self"})
        self.mode = mode
        self.n_tuples = n_tuples if n_tuples is not None else (1000 if mode == "multimix" else None)
        self.alpha, self.tuple_size = float(alpha), tuple_size
        self.probability = float(probability)
        self.other_batches = other_batches if other_batches is not None else "input_mixup"
        self.mixup_alpha = float(mixup_alpha) if mixup_alpha is not None else 1.0
        self.clean_loss_weight, self.label_smoothing = float(clean_loss_weight), float(label_smoothing)
        self.head, self.logit_space = head, logit_space
        self.dense, self.distill = dense, distill
        self.sync_batch, self.seed, self.check_every_n_steps = sync_batch, seed, check_every_n_steps
        #: how many training batches of the current fit went each way (host-side counts: no device synchronisation)
        self.batch_counts: dict[str, int] = dict.fromkeys(KINDS, 0)
        # state that lives across fits and in checkpoints
        self._base_seed: Optional[int] = None
        self._batches_seen = 0
        self._distiller = Distiller(distill) if distill is not None else None
        # state of one fit, built in setup/on_fit_start, removed in teardown
        self._head_path: Optional[str] = None
        self._feature_spec: Optional[tuple[str, str]] = None
        self._in_logit_space = False
        self._capture: Optional[StepCapture] = None
        self._wrapped: Optional[pl.LightningModule] = None
        self._original_step: Any = None
        self._generator: Optional[torch.Generator] = None
        self._health: Optional[HealthFlag] = None
        self._verified = self._features_verified = self._warned_small_batch = False
        self._inputs_mixable: Optional[bool] = None

    @property
    def teacher(self) -> Any:
        """The EMA teacher (:class:`~lightning_multimix.teacher.EMATeacher`) with self-distillation, else ``None``."""
        return self._distiller.teacher if self._distiller is not None else None

    @property
    def distiller(self) -> Optional[Distiller]:
        """What runs self-distillation (:class:`~lightning_multimix.teacher.Distiller`), else ``None``."""
        return self._distiller

    @property
    def head_path(self) -> Optional[str]:
        """The dotted path of the classifier head found at ``setup`` (``None`` before)."""
        return self._head_path

    @property
    def feature_map_spec(self) -> Optional[tuple[str, str]]:
        """Dense mode: where the feature map is read, ``(dotted path, "output" | "input" | "vit")``."""
        return self._feature_spec

    # ------------------------------------------------------------------ life cycle

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise MultiMixError(
                "MultiMix replaces the loss returned by `training_step`, which needs automatic optimization; "
                f"{type(pl_module).__name__} sets `automatic_optimization = False`. Compute the loss with "
                "`lightning_multimix.objective.multimix_objective` in your own step instead."
            )
        self._head_path = resolve_head(pl_module, self.head, dense=self.dense is not None)
        head = pl_module.get_submodule(self._head_path)
        self._in_logit_space = self.logit_space == "always" or (self.logit_space == "auto" and is_affine(head))
        if self.dense is not None:
            self._feature_spec = resolve_feature_map(pl_module, self._head_path, self.dense.feature_map)
        if self._base_seed is None:
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            self._base_seed = int(trainer.strategy.broadcast(seed, src=0))
        space = "logit space (exact for an affine head)" if self._in_logit_space else "embedding space"
        where = f", feature map from {self._feature_spec[0]!r}" if self._feature_spec else ""
        rank_zero_info(f"MultiMix: head {self._head_path!r}{where}; interpolating in {space}.")
        if self.probability == 1.0:
            rank_zero_warn("MultiMix(probability=1.0) mixes every batch with MultiMix, without the paper's protocol "
                           "(input mixup on about half the batches): with whole-batch tuples it stalls far below "
                           "plain training. The default (probability=0.5) follows the paper.")
        if self.sync_batch and trainer.world_size == 1:
            rank_zero_warn("MultiMix(sync_batch=True) with a single process: there is no other batch to gather.")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        self._uninstall()  # what a previous fit may have left (an interrupted one)
        if self._distiller is not None:  # before any hook is installed: the teacher's copy carries none
            self._distiller.attach(pl_module, self._head_path, device)
        self._install(pl_module)
        self._generator = torch.Generator(device=device)
        self._health = HealthFlag(device, self.check_every_n_steps)
        self._verified = self._features_verified = False
        self._inputs_mixable = None
        self.batch_counts = dict.fromkeys(KINDS, 0)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._distiller is not None:
            self._distiller.update(pl_module, trainer.global_step, trainer.world_size)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._health is not None:
            self._health.raise_if_unhealthy(trainer.global_step, self._head_path)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._uninstall()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._uninstall()

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._distiller is not None:
            self._distiller.swap(pl_module, swapped=True)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._distiller is not None:
            self._distiller.swap(pl_module, swapped=False)

    on_test_epoch_start = on_validation_epoch_start
    on_test_epoch_end = on_validation_epoch_end

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"base_seed": self._base_seed, "batches_seen": self._batches_seen}
        return {**state, **(self._distiller.state_dict() if self._distiller is not None else {})}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._base_seed, self._batches_seen = state_dict["base_seed"], state_dict["batches_seen"]
        if self._distiller is not None:
            self._distiller.load_state_dict(state_dict)

    def sample_weights(self, num_examples: int, mode: Literal["multimix", "pairs"],
                       generator: torch.Generator) -> Tensor:
        """The ``(num_examples, n)`` weight matrix of one batch mixed at the last layer; each column on the simplex.

        ``mode`` is ``"multimix"`` (``n_tuples`` Dirichlet columns) or ``"pairs"`` (Manifold Mixup's pairs, ``n = b``).
        Override it to customise the weights; draw only from ``generator`` (on the training device, re-seeded from
        ``(seed, rank, batch)`` at every batch) so that runs stay reproducible and resume exactly.
        """
        if mode == "pairs":
            alpha = self.alpha if self.mode == "pairs" else self.mixup_alpha
            return pair_weights(num_examples, alpha, generator=generator, device=generator.device)
        return dirichlet_weights(num_examples, self.n_tuples, self.alpha, tuple_size=self.tuple_size,
                                 generator=generator, device=generator.device)

    def _install(self, pl_module: pl.LightningModule) -> None:
        self._capture = StepCapture(pl_module, self._head_path, self._feature_spec, inputs=self.distill is not None)
        self._original_step = pl_module.__dict__.get("training_step")
        pl_module.training_step = _MultiMixTrainingStep(self, pl_module, pl_module.training_step)
        self._wrapped = pl_module

    def _uninstall(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        if self._distiller is not None:
            self._distiller.detach()
        if self._wrapped is not None:
            if self._original_step is not None:
                self._wrapped.training_step = self._original_step
            else:
                self._wrapped.__dict__.pop("training_step", None)
            self._wrapped = None

    # ------------------------------------------------------------------ the training step

    def _batch_kind(self, step: int, rank: int) -> str:
        # with sync_batch every process takes part in the gather, so all take rank 0's decision (else they deadlock)
        seed = step_seed(self._base_seed, 0 if self.sync_batch else rank, step)
        if self.probability < 1.0 and not random.Random(seed).random() < self.probability:
            return self.other_batches
        return self.mode

    def _training_step(self, pl_module: pl.LightningModule, original: Any, *args: Any, **kwargs: Any) -> Any:
        trainer = pl_module.trainer
        step = self._batches_seen
        self._batches_seen += 1
        kind = self._batch_kind(step, trainer.global_rank)
        batch = args[0] if args else kwargs["batch"]
        labels = check_labels(pl_module.multimix_labels(batch) if hasattr(pl_module, "multimix_labels")
                              else default_labels(batch))
        if kind != "own_loss" and labels.shape[0] < 2:
            if not self._warned_small_batch:
                rank_zero_warn(f"MultiMix: a training batch of {labels.shape[0]} example cannot be mixed; such "
                               "batches train on your own loss. Pass `DataLoader(..., drop_last=True)` to drop them.")
                self._warned_small_batch = True
            kind = "own_loss"
        if kind == "own_loss":
            self.batch_counts[kind] += 1
            return original(*args, **kwargs)

        self._generator.manual_seed(step_seed(self._base_seed, trainer.global_rank, step))
        mixer = InputMixer(self.mixup_alpha, self._generator) if kind == "input_mixup" else None
        if mixer is not None:
            mixed = self._mix_batch(pl_module, batch, mixer)
            if mixed is None:
                kind, mixer = "pairs", None  # the inputs cannot be interpolated: mix this batch at the last layer
            elif args:
                args = (mixed, *args[1:])
            else:
                kwargs = {**kwargs, "batch": mixed}
        with self._capture:
            output = original(*args, **kwargs)
        user_loss = output["loss"] if isinstance(output, dict) else output
        if user_loss is None:
            return output  # the user skipped this batch
        if not isinstance(user_loss, Tensor):
            raise MultiMixError(
                f"`training_step` returned {type(output).__name__}; MultiMix needs a loss tensor or a dict with 'loss'."
            )
        embeddings, logits = self._capture.head_tensors()
        if embeddings.shape[0] != labels.shape[0]:
            raise MultiMixError(f"The head {self._head_path!r} ran on {embeddings.shape[0]} embeddings but the batch "
                                f"has {labels.shape[0]} labels. Pass `MultiMix(head='dotted.path')` naming the head.")
        labels = labels.to(logits.device).long()
        dense_now = self.dense is not None and kind == self.mode
        features = None
        if self.dense is not None and (dense_now or not self._features_verified):
            features = self._capture.feature_map(embeddings, verify=not self._features_verified)
            self._features_verified = True  # checked on the first batch, whichever way it is mixed
        teacher = None
        if self._distiller is not None:
            with_embeddings = not self._in_logit_space and self.distill.targets == "logits" and mixer is None
            teacher = self._distiller.outputs(*self._capture.model_inputs(), trainer.global_step, with_embeddings)

        if mixer is not None:
            loss = mixup_objective(logits, labels, *mixer.draw, teacher=teacher, label_smoothing=self.label_smoothing)
        else:
            loss = self._last_layer_loss(pl_module, kind, embeddings, logits, labels,
                                         features if dense_now else None, teacher)
            if self.clean_loss_weight > 0:
                loss = loss + self.clean_loss_weight * user_loss.float()
        self.batch_counts[kind] += 1
        self._health.update(loss, labels, logits.shape[-1], step)
        if not self._verified or self._health.read_due(step, loss.device):
            self._health.raise_if_unhealthy(trainer.global_step, self._head_path)
        self._verified = True

        size = labels.shape[0]
        # the step value is this process's; the epoch value is averaged over processes, once, at the epoch's end
        pl_module.log("multimix/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=size)
        pl_module.log("multimix/loss_epoch", loss.detach(), on_step=False, on_epoch=True, sync_dist=True,
                      batch_size=size)
        if teacher is not None:
            pl_module.log("multimix/distill_weight", teacher.weight, on_step=True, on_epoch=False, batch_size=size)
        return {**output, "loss": loss} if isinstance(output, dict) else loss

    def _mix_batch(self, pl_module: pl.LightningModule, batch: Any, mixer: InputMixer) -> Optional[Any]:
        """The batch with its inputs mixed, or ``None`` (said once) when they cannot be interpolated."""
        if self._inputs_mixable is False:
            return None
        hook = getattr(pl_module, "multimix_mix_inputs", None)
        mixed = hook(batch, mixer) if hook is not None else default_mix_inputs(batch, mixer)
        if mixed is None or mixer.draw is None:
            if self._inputs_mixable is None:
                rank_zero_info(
                    f"MultiMix: the inputs of {type(pl_module).__name__}'s batches cannot be interpolated (no "
                    "floating-point tensor in `batch[0]` or under a usual dict key): the batches not mixed by "
                    f"{self.mode!r} are mixed by last-layer pairs instead of input mixup. Override "
                    "`MultiMixMixin.multimix_mix_inputs` to say where the inputs are."
                )
            self._inputs_mixable = False
            return None
        self._inputs_mixable = True
        return mixed

    def _last_layer_loss(self, pl_module: pl.LightningModule, kind: str, embeddings: Tensor, logits: Tensor,
                         labels: Tensor, features: Optional[Tensor], teacher: Optional[TeacherOutputs]) -> Tensor:
        if self.sync_batch and pl_module.trainer.world_size > 1:

            def gather(t: Optional[Tensor]) -> Optional[Tensor]:
                return None if t is None else pl_module.all_gather(t, sync_grads=True).flatten(0, 1)

            embeddings, logits, labels, features = map(gather, (embeddings, logits, labels, features))
            if teacher is not None:
                teacher = dataclasses.replace(teacher, logits=gather(teacher.logits),
                                              embeddings=gather(teacher.embeddings))
        weights = self.sample_weights(labels.shape[0], kind, self._generator)
        head = self._capture.head.module
        common = {"teacher": teacher, "label_smoothing": self.label_smoothing}
        if features is not None:
            return multimix_objective(weights, labels, feature_map=features, head=head, attention=self.dense.attention,
                                      affine_head=self._in_logit_space, **common)
        if self._in_logit_space:
            return multimix_objective(weights, labels, logits=logits, **common)
        return multimix_objective(weights, labels, embeddings=embeddings, head=head, **common)

class _MultiMixTrainingStep:
    """Stands in for the module's ``training_step`` while MultiMix is installed (removed in ``teardown``)."""

    def __init__(self, callback: MultiMix, module: pl.LightningModule, original: Any) -> None:
        self.callback, self.module, self.original = callback, module, original
        self.__wrapped__ = original  # what Lightning's `is_overridden` and `inspect` look through

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.callback._training_step(self.module, self.original, *args, **kwargs)
