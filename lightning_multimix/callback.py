"""The ``MultiMix`` callback: MultiMix for any LightningModule, added with one line to the ``Trainer``.

The callback keeps the life cycle (install on fit start, remove on teardown and on every exit path), its state (the
random stream and the teacher, in checkpoints), logging and the health check. What one training step does is
:class:`~lightning_multimix.step.TrainingStep`; what it computes comes from the tensor core
(:mod:`~lightning_multimix.objective`), and self-distillation from :class:`~lightning_multimix.teacher.Distiller`.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_multimix.feature_maps import TimmPositionHead
from lightning_multimix.health import HealthFlag
from lightning_multimix.heads import (
    classifier_block,
    declared_feature_map,
    declared_head,
    is_affine,
    resolve_feature_map,
)
from lightning_multimix.loss_log import LossLog
from lightning_multimix.options import Dense, SelfDistillation, validate_multimix
from lightning_multimix.sampling import dirichlet_weights, pair_weights
from lightning_multimix.step import KINDS, TrainingStep, check_supported
from lightning_multimix.teacher import Distiller


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
            Not when the other batches are not mixed. With ``mode="pairs"``, other batches that fall back to pairs
            (inputs that cannot be interpolated) are ``mode``'s pairs and take ``alpha``.
        clean_loss_weight: adds this times your own loss on the batches mixed at the last layer (your step ran on
            clean inputs there; input-mixup batches have no clean forward and train on the mixup loss alone).
        label_smoothing: label smoothing of the interpolated targets.
        ignore_index: examples with this label are left out of the mixing, as your cross-entropy ignores them
            (``-100``, PyTorch's default); ``None``: every label must be a class.
        head: dotted path of the classifier head in your LightningModule (``"model.fc"``); ``None``: the
            ``MultiMixMixin.multimix_head`` of your module, a timm model's ``get_classifier()``, else found on the
            first batch from what runs: the ``nn.Linear`` whose output your model returns.
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
        ignore_index: Optional[int] = -100,
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
        self.ignore_index, self.head, self.logit_space = ignore_index, head, logit_space
        self.dense, self.distill = dense, distill
        self.sync_batch, self.seed, self.check_every_n_steps = sync_batch, seed, check_every_n_steps
        # state that lives across fits and in checkpoints
        self._base_seed, self._batches_seen = None, 0
        self._distiller = Distiller(distill) if distill is not None else None
        # state of one fit, built in setup/on_fit_start, removed in teardown
        self._head_path: Optional[str] = None
        self._feature_spec: Optional[tuple[str, str]] = None
        self._in_logit_space = False
        self._position_head: Any = None  # dense mode, when the head at every position is not the head module
        self._step: Optional[TrainingStep] = None
        self._wrapped: Optional[pl.LightningModule] = None
        self._own_step: Any = None
        self._loss_log = LossLog()
        self._health: Optional[HealthFlag] = None
        self._counts: dict[str, int] = dict.fromkeys(KINDS, 0)

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
        """The dotted path of the classifier head (``None`` until it is known: at ``setup`` when declared, else after
        the first training batch)."""
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
        check_supported(trainer, pl_module)
        self._head_path = self._feature_spec = self._position_head = None
        if self.dense is not None:
            declared_feature_map(pl_module, self.dense.feature_map)  # a wrong path fails now, before any training
        declared = declared_head(pl_module, self.head)
        if declared is not None:
            self._adopt_head(declared, "declared", module=pl_module)
        if self._base_seed is None:
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            self._base_seed = int(trainer.strategy.broadcast(seed, src=0))
        if self.probability == 1.0:
            rank_zero_warn("MultiMix(probability=1.0) mixes every batch with MultiMix, without the paper's protocol "
                           "(input mixup on about half the batches): with whole-batch tuples it stalls far below "
                           "plain training. The default (probability=0.5) follows the paper.")
        if self.sync_batch and trainer.world_size == 1:
            rank_zero_warn("MultiMix(sync_batch=True) with a single process: there is no other batch to gather.")

    def _adopt_head(self, path: str, how: str, module: Optional[pl.LightningModule] = None) -> None:
        """Settle the head (and, in dense mode, its classifier block and feature map)."""
        module = module if module is not None else self._wrapped
        if how != "declared" and self.dense is not None:
            path = classifier_block(module, path)
        self._head_path = path
        head = module.get_submodule(path)
        self._in_logit_space = self.logit_space == "always" or (self.logit_space == "auto" and is_affine(head))
        if self.dense is not None:
            self._feature_spec = resolve_feature_map(module, path, self.dense.feature_map)
            if self._feature_spec[1] == "timm":  # the head at every position: the timm model's own forward_head
                owner = module.get_submodule(self._feature_spec[0])
                self._position_head = TimmPositionHead(owner, tokens=hasattr(owner, "num_prefix_tokens"))
                self._in_logit_space = self.logit_space == "always"
        if self._distiller is not None and self._distiller.teacher is not None:
            self._distiller.watch(path)
        space = "logit space (exact for an affine head)" if self._in_logit_space else "embedding space"
        where = f", feature map from {self._feature_spec[0]!r}" if self._feature_spec else ""
        found = "" if how == "declared" else f" ({how})"
        rank_zero_info(f"MultiMix: head {path!r}{found}{where}; interpolating in {space}.")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._uninstall(pl_module)  # what a previous, interrupted fit may have left
        if self._distiller is not None:  # before any hook is installed: the teacher's copy carries none
            self._distiller.attach(pl_module, pl_module.device)
            if self._head_path is not None:
                self._distiller.watch(self._head_path)
        self._health = HealthFlag(pl_module.device, self.check_every_n_steps)
        self._own_step = pl_module.__dict__.get("training_step")
        self._wrapped = pl_module
        self._step = TrainingStep(self, pl_module, pl_module.training_step)
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
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._distiller is not None:
            self._distiller.update(pl_module, trainer.global_step, trainer.world_size)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read_health(trainer.global_step)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._uninstall(pl_module)
        else:
            self._swap(pl_module, False)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._uninstall(pl_module)

    def _swap(self, pl_module: pl.LightningModule, swapped: bool) -> None:
        if self._distiller is not None:
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
        state = {"base_seed": self._base_seed, "batches_seen": self._batches_seen}
        return {**state, **(self._distiller.state_dict() if self._distiller is not None else {})}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._base_seed, self._batches_seen = state_dict["base_seed"], state_dict["batches_seen"]
        if self._distiller is not None:
            self._distiller.load_state_dict(state_dict)

    # ------------------------------------------------------------------ the weights, the stream, logging and health

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

    def _next_batch(self) -> int:
        """The index of the batch starting now (the random stream is a pure function of it: resume is exact)."""
        self._batches_seen += 1
        self._loss_log.batch_started()
        return self._batches_seen - 1

    def _after_step(self, pl_module: pl.LightningModule, loss: Tensor, labels: Tensor, keep: Optional[Tensor],
                    label_range: Optional[tuple[int, int]], num_classes: int, index: int, first: bool) -> None:
        """Update the health flag (read it when due) and the running loss; log it when due. ``keep``: the examples
        whose label is not the ignore index (``None``: all); ``label_range``: the labels' ``(min, max)`` when the step
        read it (on CPU)."""
        self._health.update(loss, labels, num_classes, index, keep=keep, label_range=label_range)
        trainer = pl_module.trainer
        if first or self._health.read_due(index, loss.device):
            self._read_health(trainer.global_step)
        self._loss_log.add(loss)  # logged as the mean since the last log (`lightning_multimix.loss_log`)
        if self._loss_log.due(trainer, first):
            pl_module.log("multimix/loss", self._loss_log.take_window(), on_step=True, on_epoch=False, prog_bar=True,
                          batch_size=labels.shape[0])
            if self._distiller is not None:
                # a 0-dim tensor filled on the device: a Python float would be copied to it, a synchronisation
                beta = torch.full((), self._distiller.beta(trainer.global_step), device=loss.device)
                pl_module.log("multimix/distill_weight", beta, on_step=True, on_epoch=False,
                              batch_size=labels.shape[0])

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loss_log.start_epoch()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loss_log.log_epoch(trainer, pl_module)

    def _read_health(self, global_step: int) -> None:
        ignored = self._health.raise_if_unhealthy(global_step, self._head_path) if self._health is not None else 0
        if ignored:
            rank_zero_info(f"MultiMix: {ignored} training example(s) so far with label {self.ignore_index} "
                           "(`ignore_index`) were left out of the mixing, as your loss ignores them.")

