"""The ``MultiMix`` callback: the life cycle (install on fit start, remove on every exit path), the state kept in
checkpoints (the random stream, the teacher), logging and the health check; one training step is
:class:`~lightning_multimix.step.TrainingStep`, its options :class:`~lightning_multimix.options.MultiMixOptions`."""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BatchSizeFinder, Callback, LearningRateFinder
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.strategies import SingleDeviceXLAStrategy, XLAStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_multimix.errors import MultiMixError
from lightning_multimix.head import HeadPlan, plan_before_fit
from lightning_multimix.monitor import HealthFlag, LossLog
from lightning_multimix.options import MultiMixOptions, args_doc, signature_of
from lightning_multimix.sampling import RandomStream, dirichlet_weights, pair_weights
from lightning_multimix.spawn import register, send_to_main_process
from lightning_multimix.step import KINDS, StepReport, TrainingStep
from lightning_multimix.teacher import Distiller


class MultiMix(Callback):
    r"""Train with MultiMix: interpolations of the whole batch at the last layer, in place of your loss.

    During your own ``training_step`` the callback captures the classifier head's input and output, interpolates
    them and the one-hot targets with the same Dirichlet weights, and returns the MultiMix loss for the optimizer.
    As in the paper, every batch is mixed: with probability ``probability`` by MultiMix at the last layer, otherwise
    by input mixup (the callback mixes the inputs before your step runs). Validation, test and predict are untouched.
    Every option (keyword only) is checked at construction (``ValueError``) and readable as an attribute; a set-up
    MultiMix cannot train right stops with :class:`~lightning_multimix.MultiMixError` saying the fix.

    Example:
        >>> import lightning as L
        >>> from lightning_multimix import Dense, SelfDistillation
        >>> trainer = L.Trainer(callbacks=[MultiMix()], logger=False)
        >>> MultiMix(n_tuples=500, dense=Dense(attention="softmax"), distill=SelfDistillation(weight=0.3)).n_tuples
        500

    Args:
    """

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(MultiMixOptions)})
        if unknown:
            raise TypeError(f"MultiMix() got unexpected keyword arguments {unknown}; see `help(MultiMix)`.")
        self.options = MultiMixOptions(**options)
        # state that lives across fits and in checkpoints
        self._stream: Optional[RandomStream] = None
        self._distiller = Distiller(self.options.distill) if self.options.distill is not None else None
        # state of one fit, built in setup/on_fit_start, removed in teardown
        self._plan: Optional[HeadPlan] = None
        self._step: Optional[TrainingStep] = None
        self._settings_of, self._settings = None, self.options.for_targets("labels")  # n, alpha, tuple_size in force
        self._wrapped: Optional[pl.LightningModule] = None
        self._own_step: Any = None
        self._loss_log = LossLog()
        self._health: Optional[HealthFlag] = None
        self._counts: dict[str, int] = dict.fromkeys(KINDS, 0)
        self._token = register(self._receive_from_worker)  # a fit in spawned processes sends its state back to it

    @property
    def batch_counts(self) -> dict[str, int]:
        """How many training batches of the current (or last) fit went each way: mixed by ``"multimix"``,
        ``"pairs"``, ``"input_mixup"``, or trained on the user's ``"own_loss"`` (host-side counts, no device sync)."""
        return self._step.batch_counts if self._step is not None else self._counts

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
        """The dotted path of the classifier head; ``None`` until known (at ``setup`` or the first batch)."""
        return self._plan.head_path if self._plan is not None else None

    @property
    def feature_map_spec(self) -> Optional[tuple[str, str]]:
        """Dense mode: where the feature map is read, ``(dotted path, kind)`` (see :mod:`.feature_maps`)."""
        return self._plan.feature_spec if self._plan is not None else None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _check_supported(trainer, pl_module)
        # the learning-rate and batch-size finders try the fit in their on_fit_start: this one's must run first, so
        # that their trials train on the mixed loss the fit optimises
        tuners = [i for i, c in enumerate(trainer.callbacks) if isinstance(c, (LearningRateFinder, BatchSizeFinder))]
        if tuners and trainer.callbacks.index(self) > tuners[0]:
            trainer.callbacks.insert(tuners[0], trainer.callbacks.pop(trainer.callbacks.index(self)))
        self._plan = plan_before_fit(pl_module, self.head, self.dense, self.logit_space)
        if self._plan is not None:
            rank_zero_info(self._plan.describe())
        if self._stream is None:
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            self._stream = RandomStream(int(trainer.strategy.broadcast(seed, src=0)))
        if self.probability == 1.0:
            rank_zero_warn("MultiMix(probability=1.0) mixes every batch with MultiMix, without the paper's protocol "
                           "(input mixup on about half the batches): with whole-batch tuples it stalls far below "
                           "plain training. The default (probability=0.5) follows the paper.")
        if self.sync_batch and trainer.world_size == 1:
            rank_zero_warn("MultiMix(sync_batch=True) with a single process: there is no other batch to gather.")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._uninstall(pl_module)  # what a previous, interrupted fit may have left
        if self._distiller is not None:  # before any hook is installed: the teacher's copy carries none
            self._distiller.attach(pl_module, pl_module.device)
            if self._plan is not None:
                self._distiller.watch(self._plan.head_path)
        self._health = HealthFlag(pl_module.device)
        self._own_step = pl_module.__dict__.get("training_step")
        self._wrapped = pl_module
        self._step = TrainingStep(pl_module, pl_module.training_step, self.options, self._stream, self.sample_weights,
                                  self._record_step, self._plan, self._distiller)
        pl_module.training_step = self._step

    def _uninstall(self, pl_module: Optional[pl.LightningModule] = None) -> None:
        """Remove every hook and the step wrapper, and put the student's weights back: safe on every exit path."""
        module = pl_module if pl_module is not None else self._wrapped
        if self._distiller is not None and module is not None:
            self._distiller.swap(module, swapped=False)
        if self._step is not None:
            self._counts = self._step.batch_counts
            self._step.remove()
            self._step = None
        if self._distiller is not None:
            self._distiller.detach()
        if self._wrapped is not None:
            if self._own_step is not None:
                self._wrapped.training_step = self._own_step
            else:
                self._wrapped.__dict__.pop("training_step", None)
            self._wrapped = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._distiller is not None:  # the step counter is restored by now; a new fit may start it again at 0
            self._distiller.start(trainer.global_step)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._loss_log.batch_started()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._distiller is not None:
            self._distiller.update(pl_module, trainer.global_step, trainer.world_size)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read_health(trainer.global_step)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            self._swap(pl_module, False)
            return
        self._uninstall(pl_module)
        send_to_main_process(trainer, self._token, {**self.state_dict(), "batch_counts": dict(self.batch_counts)})

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for spawned processes), the copy sends its state back to this callback under a new token."""
        return {**self.__dict__, "_token": register(self._receive_from_worker)}

    def _receive_from_worker(self, state: dict[str, Any]) -> None:
        """The state rank 0 ended a fit in spawned processes with (:mod:`lightning_multimix.spawn`)."""
        state = dict(state)
        self._counts = state.pop("batch_counts")
        self.load_state_dict(state)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._uninstall(pl_module)

    def _swap(self, pl_module: pl.LightningModule, swapped: bool) -> None:
        if self._distiller is not None:  # validation with the teacher's weights, swapped back on every exit path
            self._distiller.swap(pl_module, swapped=swapped)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap(pl_module, True)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap(pl_module, False)

    on_test_epoch_start, on_test_epoch_end = on_validation_epoch_start, on_validation_epoch_end

    @override
    def state_dict(self) -> dict[str, Any]:
        stream = self._stream or RandomStream(None)  # type: ignore[arg-type]
        state = {"base_seed": stream.base_seed, "batches_seen": stream.batches_seen}
        return {**state, **(self._distiller.state_dict() if self._distiller is not None else {})}

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self._distiller is not None:
            self._distiller.on_save_checkpoint(pl_module, checkpoint, self.state_key)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self._distiller is not None and trainer.state.fn == "fit":
            self._distiller.on_load_checkpoint(pl_module, checkpoint, self.state_key)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        base_seed, seen = state_dict["base_seed"], state_dict["batches_seen"]
        if base_seed is None:
            self._stream = None
        elif self._stream is None:
            self._stream = RandomStream(base_seed, seen)
        else:  # in place: a step installed before the restore (a tuner's trial) reads the same stream
            self._stream.base_seed, self._stream.batches_seen = base_seed, seen
        if self._distiller is not None:
            self._distiller.load_state_dict(state_dict)

    def sample_weights(self, num_examples: int, mode: Literal["multimix", "pairs"], generator: torch.Generator,
                       keep: Optional[Tensor] = None) -> Tensor:
        """The ``(num_examples, n)`` weight matrix of one batch mixed at the last layer; each column on the simplex.

        ``mode`` is ``"multimix"`` (``n_tuples`` Dirichlet columns, with the target type's defaults where not set:
        :data:`~lightning_multimix.options.TYPE_DEFAULTS`) or ``"pairs"`` (Manifold Mixup's pairs, ``n = b``);
        ``keep`` (``(b,)`` booleans, or ``None``) marks the examples that may be mixed (the others have an ignore-index
        label and must get weight 0). Override it to customise the weights; draw only from ``generator`` (on the
        training device, re-seeded from ``(seed, rank, batch)`` at every batch) so that runs resume exactly.
        """
        if mode == "pairs":
            alpha = self.alpha if self.mode == "pairs" else self.mixup_alpha
            return pair_weights(num_examples, alpha, keep=keep, generator=generator)
        targets = self._step.targets if self._step is not None else None
        if targets is not self._settings_of:  # read once per fit: the targets' type and its defaults
            self._settings_of, self._settings = targets, self.options.for_targets(targets.kind if targets else "labels")
        chosen = self._settings
        return dirichlet_weights(num_examples, chosen["n_tuples"], chosen["alpha"], tuple_size=chosen["tuple_size"],
                                 keep=keep, generator=generator)

    def _record_step(self, report: StepReport) -> None:
        """After a mixed batch: learn the head the step found, update the health flag (read it when due) and the
        running loss, and log it when due."""
        if self._plan is not self._step.plan:  # found on the first batch (labels per position: their logits)
            self._plan = self._step.plan
            rank_zero_info(self._plan.describe())
        if report.unexpected is not None:
            self._health.update(report.unexpected, self._step.targets)
        self._loss_log.add(report.loss)  # logged as the mean since the last log
        trainer, module = self._wrapped.trainer, self._wrapped
        if report.first or report.index % self.check_every_n_steps == 0:
            self._read_health(trainer.global_step)
        if self._loss_log.due(trainer, report.first):
            size = report.batch_size
            module.log("multimix/loss", self._loss_log.take_window(), on_step=True, on_epoch=False, batch_size=size)
            if self._distiller is not None:
                # a 0-dim tensor filled on the device: a Python float would be copied to it, a synchronisation
                beta = torch.full((), self._distiller.beta(trainer.global_step), device=report.loss.device)
                module.log("multimix/distill_weight", beta, on_step=True, on_epoch=False, batch_size=size)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loss_log.start_epoch()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read_health(trainer.global_step)  # before the epoch's sum of losses starts again
        self._loss_log.log_epoch(trainer, pl_module)

    def _read_health(self, global_step: int) -> None:
        if self._health is not None and self._stream is not None and self._stream.batches_seen > 0:
            self._health.raise_if_unhealthy(self._loss_log.total, self._stream.batches_seen - 1, global_step,
                                            self.head_path)


MultiMix.__doc__ = MultiMix.__doc__.rstrip(" ") + args_doc(MultiMixOptions) + "\n"
MultiMix.__init__.__signature__ = signature_of(MultiMixOptions)  # what LightningCLI and help() read
for _option in dataclasses.fields(MultiMixOptions):  # callback.n_tuples: the option in force
    setattr(MultiMix, _option.name, property(operator.attrgetter(f"options.{_option.name}"),
                                             doc=_option.metadata["doc"]))


def _check_supported(trainer: pl.Trainer, module: pl.LightningModule) -> None:
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
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(
            strategy, (DeepSpeedStrategy, XLAStrategy, SingleDeviceXLAStrategy)):
        raise MultiMixError(
            f"MultiMix supports single-device training and DDP (strategy='ddp', 'ddp_spawn', ...); got "
            f"{type(strategy).__name__}, whose sharded or replaced parameters it has not been made to work with. "
            "Use a DDP strategy, or train without MultiMix."
        )
