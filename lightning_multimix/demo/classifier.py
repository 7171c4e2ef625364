"""``ImageClassifier``: a plain LightningModule for image classification, to train with or without MultiMix.

It is deliberately ordinary: cross-entropy on clean images, SGD, a learning-rate schedule. Add the
:class:`~lightning_multimix.MultiMix` callback to the ``Trainer`` to train it with MultiMix, or set ``input_mix`` to
train it with torchvision's input-space ``MixUp``, ``CutMix`` or one of the two drawn per batch (the usual peers).
Validation and test log accuracy, expected calibration error and loss; the test also logs the embedding alignment and
uniformity of the head's input (:mod:`lightning_multimix.metrics`) and keeps those embeddings
(:meth:`ImageClassifier.test_embeddings`).

Logged names: ``train/loss`` (the module's own loss: clean cross-entropy, or soft cross-entropy on mixed inputs;
under the MultiMix callback the optimised loss is ``multimix/loss``), ``val/loss``, ``val/acc``, ``val/ece``,
``test/loss``, ``test/acc``, ``test/ece``, ``test/alignment``, ``test/uniformity``.

``ImageClassifier(loss="bce")`` trains with binary cross-entropy on one-hot targets instead (timm's ``--bce-loss``
recipe). :class:`MultiLabelClassifier` is the same module for multi-label data: BCE with logits on ``(b, c)``
multi-hot targets, tested by macro mAP and F1 (``val/map``, ``val/f1``, ``test/map``, ``test/f1``, and the losses).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Optional, Union

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import (MulticlassAccuracy, MulticlassCalibrationError, MultilabelAveragePrecision,
                                         MultilabelF1Score)

from lightning_multimix.metrics import EmbeddingAlignment, EmbeddingUniformity
from lightning_multimix.demo.models import PreActResNet18, SmallCNN

BACKBONES: dict[str, Callable[..., nn.Module]] = {"small_cnn": SmallCNN, "preact_resnet18": PreActResNet18}
SCHEDULES = ("cosine", "step", "constant")
#: ``input_mix`` values: torchvision's ``v2.MixUp``, ``v2.CutMix``, or ``v2.RandomChoice`` of the two per batch
INPUT_MIXES = ("mixup", "cutmix", "mixup_cutmix")
#: ``loss`` values: cross-entropy, or binary cross-entropy with logits on one-hot (or the batch's float) targets
LOSSES = ("ce", "bce")


def build_backbone(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """One of :data:`BACKBONES` by name, or a timm model as ``"timm:<name>"`` (built from its config, no weights
    downloaded; ``pip install timm``).

    Example:
        >>> type(build_backbone("small_cnn", num_classes=10, in_channels=1)).__name__
        'SmallCNN'
    """
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError as err:
            raise ImportError(f"backbone {name!r} needs timm: `pip install timm`.") from err
        return timm.create_model(name[5:], pretrained=False, num_classes=num_classes, in_chans=in_channels)
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; expected one of {tuple(BACKBONES)}, 'timm:<model name>' or an "
                         "nn.Module.")
    return BACKBONES[name](num_classes=num_classes, in_channels=in_channels)


class ImageClassifier(L.LightningModule):
    """Image classification with SGD and cross-entropy (or BCE); MultiMix comes from the callback, not from this module.

    Args:
        backbone: an ``nn.Module`` mapping images to logits, or a name in :data:`BACKBONES` (``"small_cnn"`` for
            28x28 grayscale, ``"preact_resnet18"`` for 32x32 RGB), built with ``num_classes`` and ``in_channels``.
        num_classes: number of classes (used for metrics, and to build a named backbone).
        in_channels: image channels (to build a named backbone).
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay (on all parameters).
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        schedule: ``"cosine"``: cosine annealing from ``lr`` to 0 over the whole run, updated every optimizer step
            (needs ``max_epochs`` or ``max_steps``); ``"step"``: multiply by ``gamma`` at each epoch in
            ``milestones`` (the schedule of Manifold Mixup and AlignMixup); ``"constant"``: no schedule.
        milestones: epochs of the ``"step"`` schedule, e.g. ``[500, 1000, 1500]``.
        gamma: factor of the ``"step"`` schedule.
        input_mix: ``None``, or ``"mixup"`` / ``"cutmix"``: mix each training batch in input space with
            ``torchvision.transforms.v2.MixUp`` / ``CutMix`` (``alpha=input_mix_alpha``; partner = the batch rolled by
            one) and train on the soft targets; ``"mixup_cutmix"``: the per-batch switch users of torchvision and timm
            pick, ``v2.RandomChoice([v2.MixUp(...), v2.CutMix(...)])``, MixUp or CutMix with equal chance on each
            batch (timm's ``Mixup(switch_prob=0.5)``). Needs torchvision. Do not combine with the MultiMix callback.
        input_mix_alpha: ``alpha`` of ``MixUp`` / ``CutMix``.
        label_smoothing: label smoothing of the module's own cross-entropy.
        head: dotted path of the classifier head inside ``backbone`` (the module whose input is the embedding);
            ``None``: its last ``nn.Linear``. Used to collect test embeddings.
        ece_bins: bins of the expected calibration error (l1, equal-width bins on the top-1 confidence).
        loss: ``"ce"``: cross-entropy; ``"bce"``: ``F.binary_cross_entropy_with_logits(logits, targets)`` (mean over
            examples and classes), the targets being ``F.one_hot(labels, num_classes).float()`` for integer labels,
            the mixed targets under ``input_mix``, or the batch's own ``(b, c)`` float targets (multi-label data).
            ``label_smoothing`` must then be 0.

    Example:
        >>> model = ImageClassifier("small_cnn", num_classes=10, in_channels=1)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> model.head_path
        'backbone.fc'
    """

    #: the test metrics logged every validation (``val/<name>``, the demo's curves), and the one that ranks epochs
    curve_metrics: tuple[str, ...] = ("loss", "acc", "ece")
    metric = "acc"

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "small_cnn",
        num_classes: int = 10,
        in_channels: int = 1,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        schedule: Literal["cosine", "step", "constant"] = "cosine",
        milestones: Optional[list[int]] = None,
        gamma: float = 0.1,
        input_mix: Optional[Literal["mixup", "cutmix", "mixup_cutmix"]] = None,
        input_mix_alpha: float = 1.0,
        label_smoothing: float = 0.0,
        head: Optional[str] = None,
        ece_bins: int = 15,
        loss: Literal["ce", "bce"] = "ce",
    ) -> None:
        super().__init__()
        _check(isinstance(num_classes, int) and num_classes >= 2, "num_classes", num_classes, "an int >= 2")
        _check(isinstance(in_channels, int) and in_channels >= 1, "in_channels", in_channels, "an int >= 1")
        check_sgd("ImageClassifier", lr, momentum, weight_decay, nesterov, schedule, milestones, gamma)
        _check(input_mix is None or input_mix in INPUT_MIXES, "input_mix", input_mix, f"None or one of {INPUT_MIXES}")
        _check(math.isfinite(input_mix_alpha) and input_mix_alpha > 0, "input_mix_alpha", input_mix_alpha,
               "a value > 0")
        _check(0.0 <= label_smoothing < 1.0, "label_smoothing", label_smoothing, "a value in [0, 1)")
        _check(isinstance(ece_bins, int) and ece_bins >= 1, "ece_bins", ece_bins, "an int >= 1")
        _check(loss in LOSSES, "loss", loss, f"one of {LOSSES}")
        _check(loss == "ce" or label_smoothing == 0, "label_smoothing", label_smoothing, "0 with loss='bce'")
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)

        self.backbone = build_backbone(backbone, num_classes, in_channels) if isinstance(backbone, str) else backbone
        if not isinstance(self.backbone, nn.Module):
            raise ValueError(f"ImageClassifier: backbone must be a name in {tuple(BACKBONES)} or an nn.Module, got "
                             f"{type(backbone).__name__}.")
        linears = [name for name, m in self.backbone.named_modules() if isinstance(m, nn.Linear)]
        inner = head if head is not None else (linears[-1] if linears else None)
        if inner is None:
            raise ValueError(f"ImageClassifier: {type(self.backbone).__name__} has no nn.Linear head; pass head= the "
                             "dotted path of the module whose input is the embedding.")
        try:
            self.backbone.get_submodule(inner)
        except AttributeError:
            raise ValueError(f"ImageClassifier: No submodule {inner!r} in {type(self.backbone).__name__}; its "
                             f"nn.Linear modules are {linears}.") from None
        self.head_path = f"backbone.{inner}"

        self.num_classes = num_classes
        self.lr, self.momentum, self.weight_decay, self.nesterov = lr, momentum, weight_decay, nesterov
        self.schedule, self.milestones, self.gamma = schedule, list(milestones or []), gamma
        self.input_mix, self.label_smoothing, self.loss = input_mix, label_smoothing, loss
        self._input_mixer = _build_input_mixer(input_mix, num_classes, input_mix_alpha) if input_mix else None

        metric_kwargs = {"num_classes": num_classes}
        self.val_acc = MulticlassAccuracy(average="micro", **metric_kwargs)
        self.val_ece = MulticlassCalibrationError(n_bins=ece_bins, norm="l1", **metric_kwargs)
        self.test_acc = MulticlassAccuracy(average="micro", **metric_kwargs)
        self.test_ece = MulticlassCalibrationError(n_bins=ece_bins, norm="l1", **metric_kwargs)
        self.test_uniformity = EmbeddingUniformity()
        # needs d: from the head's `in_features` when it has one, else built on the first test batch
        dim = getattr(self.get_submodule(self.head_path), "in_features", None)
        self.test_alignment: Optional[EmbeddingAlignment] = (
            EmbeddingAlignment(num_classes, dim) if isinstance(dim, int) else None
        )
        self._test_embeddings: list[Tensor] = []
        self._test_labels: list[Tensor] = []

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    @property
    def head(self) -> nn.Module:
        """The classifier head (the module whose input is the embedding)."""
        return self.get_submodule(self.head_path)

    def forward_with_embeddings(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, embeddings)``, the embeddings being the head's input, captured by a temporary forward hook."""
        captured: list[Tensor] = []
        handle = self.head.register_forward_hook(lambda module, args, output: captured.append(args[0]))
        try:
            logits = self(x)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"ImageClassifier: the head {self.head_path!r} ran {len(captured)} times in one "
                               "forward; pass head= the module that runs once on the embeddings.")
        return logits, captured[0].flatten(1)

    # ------------------------------------------------------------------ steps

    def on_fit_start(self) -> None:
        if self.input_mix is not None:
            from lightning_multimix.callback import MultiMix

            if any(isinstance(c, MultiMix) for c in self.trainer.callbacks):
                raise ValueError(
                    f"ImageClassifier(input_mix={self.input_mix!r}) mixes inputs and targets itself, while the "
                    "MultiMix callback mixes embeddings with the batch's integer labels: use one of the two, not both."
                )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = batch[0], batch[1]
        if self.loss == "bce":
            targets = labels if labels.is_floating_point() else F.one_hot(labels, self.num_classes).float()
            if self._input_mixer is not None:
                images, targets = self._input_mixer(images, targets)
            loss = F.binary_cross_entropy_with_logits(self(images), targets)
        elif self._input_mixer is not None:
            images, targets = self._input_mixer(images, labels)
            loss = F.cross_entropy(self(images), targets, label_smoothing=self.label_smoothing)
        else:
            loss = F.cross_entropy(self(images), labels, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=labels.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch[0], batch[1]
        logits = self(images)
        self.val_acc.update(logits, labels)
        self.val_ece.update(logits.float().softmax(-1), labels)
        self.log("val/loss", F.cross_entropy(logits, labels), on_epoch=True, prog_bar=True, batch_size=labels.shape[0])
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True, batch_size=labels.shape[0])
        self.log("val/ece", self.val_ece, on_epoch=True, batch_size=labels.shape[0])

    def on_test_epoch_start(self) -> None:
        self._test_embeddings, self._test_labels = [], []

    def test_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch[0], batch[1]
        logits, embeddings = self.forward_with_embeddings(images)
        if self.test_alignment is None:
            self.test_alignment = EmbeddingAlignment(self.num_classes, embeddings.shape[1]).to(self.device)
        self.test_acc.update(logits, labels)
        self.test_ece.update(logits.float().softmax(-1), labels)
        self.test_alignment.update(embeddings, labels)
        self.test_uniformity.update(embeddings)
        self._test_embeddings.append(embeddings.detach().float().cpu())
        self._test_labels.append(labels.detach().cpu())
        size = labels.shape[0]
        self.log("test/loss", F.cross_entropy(logits, labels), on_epoch=True, batch_size=size)
        for name, metric in (("acc", self.test_acc), ("ece", self.test_ece), ("alignment", self.test_alignment),
                             ("uniformity", self.test_uniformity)):
            self.log(f"test/{name}", metric, on_epoch=True, batch_size=size, metric_attribute=f"test_{name}")

    def test_embeddings(self) -> tuple[Tensor, Tensor]:
        """``(embeddings (N, d), labels (N,))`` of the last test run on this process (on the CPU, unnormalised)."""
        if not self._test_embeddings:
            raise RuntimeError("ImageClassifier.test_embeddings(): run trainer.test(...) first.")
        return torch.cat(self._test_embeddings), torch.cat(self._test_labels)

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> Any:
        return configure_sgd(self, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                             nesterov=self.nesterov, schedule=self.schedule, milestones=self.milestones,
                             gamma=self.gamma)


class MultiLabelClassifier(ImageClassifier):
    """:class:`ImageClassifier` for multi-label data: ``batch[1]`` is ``(b, c)`` float multi-hot targets, the training
    loss ``F.binary_cross_entropy_with_logits(logits, targets)`` (``loss="bce"``); ``input_mix`` mixes the targets
    with the images (torchvision's ``v2.MixUp`` lerps them, ``v2.CutMix`` mixes them by area). Validation and test log
    the BCE (``val/loss``, ``test/loss``), the macro average precision over classes (``val/map``, ``test/map``:
    torchmetrics' ``MultilabelAveragePrecision(average="macro")``) and the macro F1 at ``threshold``
    (``val/f1``, ``test/f1``: ``MultilabelF1Score``). :meth:`test_embeddings` returns the test targets with the
    embeddings. Takes :class:`ImageClassifier`'s arguments.

    Example:
        >>> model = MultiLabelClassifier("small_cnn", num_classes=10, in_channels=1)
        >>> model(torch.zeros(2, 1, 56, 56)).shape, model.loss
        (torch.Size([2, 10]), 'bce')
    """

    curve_metrics = ("loss", "map", "f1")
    metric = "map"

    def __init__(self, *args: Any, threshold: float = 0.5, **kwargs: Any) -> None:
        _check(kwargs.setdefault("loss", "bce") == "bce", "loss", kwargs["loss"], "'bce' (multi-label targets)")
        super().__init__(*args, **kwargs)
        for stage in ("val", "test"):
            setattr(self, f"{stage}_map", MultilabelAveragePrecision(num_labels=self.num_classes, average="macro"))
            setattr(self, f"{stage}_f1", MultilabelF1Score(num_labels=self.num_classes, threshold=threshold))

    def _evaluate(self, stage: str, logits: Tensor, targets: Tensor) -> None:
        size = targets.shape[0]
        for name in ("map", "f1"):
            metric = getattr(self, f"{stage}_{name}")
            metric.update(logits.float(), targets.round().int())
            self.log(f"{stage}/{name}", metric, on_epoch=True, batch_size=size, metric_attribute=f"{stage}_{name}")
        self.log(f"{stage}/loss", F.binary_cross_entropy_with_logits(logits, targets), on_epoch=True, batch_size=size)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate("val", self(batch[0]), batch[1])

    def test_step(self, batch: Any, batch_idx: int) -> None:
        logits, embeddings = self.forward_with_embeddings(batch[0])
        self._test_embeddings.append(embeddings.detach().float().cpu())
        self._test_labels.append(batch[1].detach().cpu())
        self._evaluate("test", logits, batch[1])


def _build_input_mixer(kind: str, num_classes: int, alpha: float) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    try:
        from torchvision.transforms import v2
    except ImportError as err:
        raise ImportError(f"ImageClassifier(input_mix={kind!r}) uses torchvision.transforms.v2: "
                          "`pip install lightning-multimix[demo]`.") from err
    mixup, cutmix = v2.MixUp(num_classes=num_classes, alpha=alpha), v2.CutMix(num_classes=num_classes, alpha=alpha)
    return {"mixup": mixup, "cutmix": cutmix, "mixup_cutmix": v2.RandomChoice([mixup, cutmix])}[kind]


def check_sgd(owner: str, lr: float, momentum: float, weight_decay: float, nesterov: bool, schedule: str,
              milestones: Optional[list[int]], gamma: float) -> None:
    """Raise ``ValueError`` naming ``owner`` and the first invalid argument of :func:`configure_sgd`'s recipe."""
    _check(math.isfinite(lr) and lr > 0, "lr", lr, "a finite value > 0, e.g. 0.1", owner)
    _check(0.0 <= momentum < 1.0, "momentum", momentum, "a value in [0, 1), e.g. 0.9", owner)
    _check(math.isfinite(weight_decay) and weight_decay >= 0, "weight_decay", weight_decay, "a value >= 0", owner)
    _check(not nesterov or momentum > 0, "nesterov", nesterov, "False when momentum=0 (Nesterov needs momentum)",
           owner)
    _check(schedule in SCHEDULES, "schedule", schedule, f"one of {SCHEDULES}", owner)
    if schedule == "step":
        _check(bool(milestones) and all(isinstance(m, int) and m > 0 for m in milestones), "milestones",
               milestones, "a non-empty list of epochs > 0 for schedule='step', e.g. [500, 1000, 1500]", owner)
    _check(0.0 < gamma <= 1.0, "gamma", gamma, "a value in (0, 1]", owner)


def configure_sgd(module: L.LightningModule, *, lr: float, momentum: float, weight_decay: float, nesterov: bool,
                  schedule: str, milestones: list[int], gamma: float) -> Any:
    """``configure_optimizers``' answer for the demo's modules: SGD on all of ``module``'s parameters with
    ``schedule`` (see :class:`ImageClassifier`; ``"cosine"`` spans the trainer's estimated steps)."""
    optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                                nesterov=nesterov)
    if schedule == "constant":
        return optimizer
    if schedule == "step":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
    total = module.trainer.estimated_stepping_batches
    if not math.isfinite(total) or total < 1:
        raise ValueError(f"{type(module).__name__}(schedule='cosine') anneals over the whole run: set "
                         "Trainer(max_epochs=...) or Trainer(max_steps=...), or use schedule='constant'.")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _check(ok: bool, name: str, value: Any, expected: str, owner: str = "ImageClassifier") -> None:
    if not ok:
        raise ValueError(f"{owner}: invalid `{name}={value!r}`; expected {expected}.")
