"""Train and test the demo's small CNN with one method in one regime: what the demo and the benchmarks run.

Every method trains the same :class:`~lightning_multimix.demo.models.SmallCNN` from the same initial weights, on the
same batches in the same order for a given seed, with SGD (lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4, cosine
schedule over the run, batch 128, last incomplete batch dropped). Test accuracy is measured after every epoch on the
test split; there is no model selection (the "best epoch" numbers are reported beside the last epoch's as what a
peeking practitioner would see, never instead of them).

Methods (:data:`METHODS`): ``erm`` (no mixing), ``mixup`` / ``cutmix`` (torchvision's input-space ``v2.MixUp`` /
``v2.CutMix``, alpha 1, on every batch), ``switch`` (``v2.RandomChoice([v2.MixUp(alpha=1), v2.CutMix(alpha=1)])``:
one of the two drawn for each batch, as timm's ``Mixup(switch_prob=0.5)``): the peers a user would pick instead; and
the callback's:

- ``pairs``: ``MultiMix(mode="pairs")``: last-layer pairs on half the batches, input mixup on the others (the
  protocol's default), i.e. Manifold Mixup over the input and the last layer;
- ``multimix``: ``MultiMix()`` with its defaults (the paper's protocol: MultiMix, n = 1000, alpha = 1 over the whole
  batch on half the batches, input mixup on the others);
- ``multimix_every``: ``MultiMix(probability=1.0)``: MultiMix on every batch, without the protocol;
- ``dense``, ``distill``: Dense MultiMix and MultiMix + self-distillation, with the protocol;
- ``multimix_bce``: ``MultiMix()`` on the classifier trained with BCE on one-hot targets (``ImageClassifier(
  loss="bce")``, timm's ``--bce-loss`` recipe) instead of cross-entropy, at lr 1 (BCE's mean over the classes scales
  the gradient by 1/c), and ``multimix_bce_lr0.1`` the same at cross-entropy's lr; not in the benchmark's default
  methods (:data:`BENCHMARK_METHODS`).

Regimes (:data:`REGIMES`) on the Fashion-MNIST subset shipped in the package: ``clean`` (all 10,000 training images,
30 epochs: the shortest run after which training longer no longer raises ERM's or input mixup's last-epoch test
accuracy), ``low_data`` (100 images per class, 100 epochs) and ``noisy`` (300 images per class with 40% of the labels
replaced by labels drawn uniformly from the 10 classes, 60 epochs; the test set is clean).

:func:`run_method` trains the other tasks as well (:mod:`lightning_multimix.demo.tasks`): given a
:class:`~lightning_multimix.demo.data.MultiLabelSet` it trains a
:class:`~lightning_multimix.demo.classifier.MultiLabelClassifier` and reports mAP and F1 instead of accuracy; given a
:class:`~lightning_multimix.demo.data.SegmentationSet` it trains a
:class:`~lightning_multimix.demo.segmentation.SegmentationModel` (``mixup`` and ``cutmix`` are then its own per-pixel
versions, ``multimix`` the callback on its per-pixel logits) and reports the mean IoU.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, Union

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_multimix import Dense, MultiMix, SelfDistillation
from lightning_multimix.demo.classifier import ImageClassifier, MultiLabelClassifier
from lightning_multimix.demo.data import ImageSet, MultiLabelSet, SegmentationSet
from lightning_multimix.demo.segmentation import SegmentationModel

#: what :func:`run_method` trains on: images and labels, multi-label composites, or composites and their masks
Data = Union[ImageSet, MultiLabelSet, SegmentationSet]


@dataclass(frozen=True)
class Method:
    """A training method: torchvision's input mixing (``input_mix``) or the MultiMix callback (``multimix``: its
    arguments), or neither (ERM); ``classifier``: arguments of the classifier (e.g. its ``loss``)."""

    description: str
    input_mix: Optional[str] = None
    multimix: Optional[dict[str, Any]] = None
    classifier: Optional[dict[str, Any]] = None


METHODS: dict[str, Method] = {
    "erm": Method("ERM: cross-entropy on clean images, no mixing"),
    "mixup": Method("input mixup: torchvision v2.MixUp(alpha=1) on every batch", input_mix="mixup"),
    "cutmix": Method("CutMix: torchvision v2.CutMix(alpha=1) on every batch", input_mix="cutmix"),
    "switch": Method("mixup/CutMix switch: torchvision v2.RandomChoice([v2.MixUp(alpha=1), v2.CutMix(alpha=1)]), one "
                     "of the two on each batch", input_mix="mixup_cutmix"),
    "pairs": Method("MultiMix(mode='pairs'): last-layer pairs or input mixup, 50/50", multimix={"mode": "pairs"}),
    "multimix": Method("MultiMix(): MultiMix (n=1000, alpha=1, whole batch) or input mixup, 50/50 (the paper's "
                       "protocol)", multimix={}),
    "multimix_every": Method("MultiMix(probability=1.0): MultiMix on every batch", multimix={"probability": 1.0}),
    "dense": Method("Dense MultiMix or input mixup, 50/50", multimix={"dense": Dense()}),
    "distill": Method("MultiMix + self-distillation or input mixup, 50/50", multimix={"distill": SelfDistillation()}),
    "multimix_bce": Method("MultiMix() on BCE with one-hot targets (timm's --bce-loss recipe) instead of "
                           "cross-entropy, lr 1 (BCE's mean over the c = 10 classes: see MULTILABEL_OPTIMIZER)",
                           multimix={}, classifier={"loss": "bce", "lr": 1.0}),
    "multimix_bce_lr0.1": Method("multimix_bce at cross-entropy's lr 0.1", multimix={}, classifier={"loss": "bce"}),
}
DEFAULT_METHODS: tuple[str, ...] = ("erm", "mixup", "pairs", "multimix")
#: the methods of benchmarks/accuracy.py by default (``multimix_bce`` on request)
BENCHMARK_METHODS: tuple[str, ...] = tuple(m for m in METHODS if not m.startswith("multimix_bce"))


@dataclass(frozen=True)
class Regime:
    """How much data, how long, how noisy: ``train_per_class`` images of each class (``None``: all), ``epochs``,
    and the fraction of training labels replaced by random ones; the benchmark tests every ``test_every`` epochs."""

    description: str
    epochs: int
    train_per_class: Optional[int] = None
    label_noise: float = 0.0
    test_every: int = 1

    def training_set(self, train: ImageSet, seed: int) -> ImageSet:
        """The regime's training set from ``train`` (the label noise depends on ``seed``)."""
        data = train.balanced_subset(self.train_per_class) if self.train_per_class is not None else train
        return data.with_label_noise(self.label_noise, seed=seed) if self.label_noise > 0 else data

    def quick(self, epochs: Optional[int] = None) -> "Regime":
        """The benchmarks' smoke version: the regime's data handling (subset, label noise) on 13 images per class."""
        return Regime(self.description, epochs=epochs or 1, train_per_class=13 if self.train_per_class else None,
                      label_noise=self.label_noise)

    @property
    def cost(self) -> int:
        """Examples seen in a run (all 10,000 images if ``train_per_class`` is ``None``): the long runs go first."""
        return self.epochs * (self.train_per_class or 1000) * 10


REGIMES: dict[str, Regime] = {
    "clean": Regime("all 10,000 training images, 30 epochs (ERM's and mixup's test accuracy have plateaued)",
                    epochs=30),
    "low_data": Regime("100 training images per class, 100 epochs", epochs=100, train_per_class=100),
    "noisy": Regime("300 training images per class, 40% of their labels random, 60 epochs", epochs=60,
                    train_per_class=300, label_noise=0.4),
    # the demo's default: the noisy regime in 40 epochs, tested every 2 (6 minutes on 2 CPU cores for 4 methods)
    "noisy_demo": Regime("300 training images per class, 40% of their labels random, 40 epochs", epochs=40,
                         train_per_class=300, label_noise=0.4),
}
#: the regimes of benchmarks/accuracy.py (the demo's is a shorter noisy one)
BENCHMARK_REGIMES: tuple[str, ...] = ("clean", "low_data", "noisy")
#: The optimiser of every method.
OPTIMIZER = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True, "schedule": "cosine"}
#: The multi-label task's: BCE's mean over the c = 10 classes scales each logit's gradient by 1/c against
#: cross-entropy's, so lr is 10 times the demo's (ERM, 512 composites, 20 epochs: test mAP 0.50 at lr 0.5, 0.55 at 1).
MULTILABEL_OPTIMIZER = {**OPTIMIZER, "lr": 1.0}
#: The segmentation task's: the per-pixel cross-entropy is a mean over pixels as the classifier's is over images, but
#: most pixels are easy background; ERM's test mIoU after 200 steps was higher at lr 0.3 than at 0.1 (one seed).
SEGMENTATION_OPTIMIZER = {**OPTIMIZER, "lr": 0.3}
#: the results of each test metric besides ``test_<metric>`` and ``best_<metric>`` (accuracy's without the prefix)
OTHER_RESULTS = {"acc": ("ece", "alignment", "uniformity"), "map": ("f1",), "miou": ()}


class History(Callback):
    """Per-epoch record: mean training objective, the module's ``curve_metrics`` on the test split (loss, accuracy,
    ECE; multi-label: loss, mAP, F1; segmentation: loss, mIoU), training seconds (evaluation excluded)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []
        self._start = self._eval_seconds = self._eval_start = 0.0
        self._loss_sum: Any = 0.0
        self._steps = 0
        self._validated = False

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._eval_seconds, self._loss_sum, self._steps = time.perf_counter(), 0.0, 0.0, 0
        self._validated = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._loss_sum = self._loss_sum + loss.detach()
            self._steps += 1

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_seconds += time.perf_counter() - self._eval_start
        self._validated = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics  # the test metrics only where this epoch was tested
        value = lambda name: float(metrics[name]) if name in metrics and self._validated else None  # noqa: E731
        names = getattr(pl_module, "curve_metrics", ("loss", "acc", "ece"))
        self.epochs.append({
            "epoch": trainer.current_epoch + 1,
            "steps": self._steps,
            "train_loss": float(self._loss_sum) / self._steps if self._steps else None,
            **{f"val_{name}": value(f"val/{name}") for name in names},
            "train_seconds": time.perf_counter() - self._start - self._eval_seconds,
        })


def method_callbacks(method: str, *, seed: int, total_steps: int, head: Optional[str],
                     multimix_options: Optional[dict[str, Any]] = None) -> list[Callback]:
    """The MultiMix callback of ``method`` (none for ERM and torchvision's mixing), with ``multimix_options``
    overriding its arguments; distillation's ``beta`` ramps up over the first half of the run. ``head``: the
    classifier head's dotted path, ``None`` to let MultiMix find it (the segmentation model's per-pixel logits).

    Example:
        >>> [type(c).__name__ for c in method_callbacks("multimix", seed=0, total_steps=100, head="fc")]
        ['MultiMix']
        >>> method_callbacks("erm", seed=0, total_steps=100, head="fc")
        []
    """
    spec = _method(method)
    if spec.multimix is None:
        if multimix_options:
            raise ValueError(f"method {method!r} does not use MultiMix: multimix_options={multimix_options!r} "
                             "would be ignored.")
        return []
    options = {"seed": seed, "head": head, **spec.multimix, **(multimix_options or {})}
    if options.get("distill") == SelfDistillation():
        # the default warm-up (1000 steps) is longer than a demo run: beta reaches its weight half-way instead
        options["distill"] = SelfDistillation(warmup_steps=max(1, total_steps // 2))
    return [MultiMix(**options)]


def run_method(
    method: str,
    *,
    train_data: Data,
    test_data: Data,
    epochs: int,
    seed: int,
    batch_size: int = 128,
    multimix_options: Optional[dict[str, Any]] = None,
    max_steps: int = -1,
    max_minutes: Optional[float] = None,
    test_every: int = 1,
    progress: bool = True,
    classifier_options: Optional[dict[str, Any]] = None,
    accelerator: str = "cpu",
    devices: int = 1,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Train the demo's classifier (SmallCNN unless ``classifier_options`` say otherwise) with ``method`` on
    ``train_data``, test it on ``test_data``, return the numbers. A
    :class:`~lightning_multimix.demo.data.MultiLabelSet` trains a
    :class:`~lightning_multimix.demo.classifier.MultiLabelClassifier` (BCE), whose results have ``test_map``,
    ``best_map`` and ``test_f1`` (macro average precision and F1 at 0.5, in [0, 1]) instead of ``test_acc``,
    ``best_acc``, ``ece``, ``alignment`` and ``uniformity``, its history ``val_map`` and ``val_f1``, and whose
    ``labels`` are the test targets ``(N, c)``; it trains with :data:`MULTILABEL_OPTIMIZER`. A
    :class:`~lightning_multimix.demo.data.SegmentationSet` trains a
    :class:`~lightning_multimix.demo.segmentation.SegmentationModel` (per-pixel cross-entropy, its own mixup and
    CutMix, MultiMix on its logits, :data:`SEGMENTATION_OPTIMIZER`), whose results have ``test_miou`` and
    ``best_miou`` (mean IoU in [0, 1]) and, instead of ``embeddings``, ``predictions``: the predicted test masks
    ``(N, H, W)`` (``labels``: the true ones); its history has ``val_miou``.

    Args:
        method: a key of :data:`METHODS`.
        train_data, test_data: :class:`~lightning_multimix.demo.data.ImageSet` s (e.g. a regime's training set),
            or the other tasks' data sets (see above).
        epochs: training epochs (the cosine schedule spans them, or ``max_steps`` if that is smaller).
        seed: seeds the initial weights, the batch order and the mixing; equal seeds give every method the same
            initial weights and batches.
        batch_size: training batch size (the last incomplete batch is dropped).
        multimix_options: arguments of ``MultiMix`` overriding the method's (the sweep's ``alpha``, ``n_tuples``...).
        max_steps: stop after this many optimizer steps (``-1``: no limit).
        max_minutes: stop training after this much wall time (then test).
        test_every: test after every this many epochs (the curves and the best epoch), and after the last.
        progress: show Lightning's progress bar.
        classifier_options: arguments of :class:`~lightning_multimix.demo.classifier.ImageClassifier` overriding the
            demo's (``"small_cnn"`` and :data:`OPTIMIZER`), e.g. another ``backbone`` and its training recipe.
        accelerator, devices: the ``Trainer``'s (``devices`` > 1: one process per device, each with ``batch_size``
            examples per step, MultiMix mixing within each).
        num_workers: ``DataLoader`` worker processes for the training set.

    Returns:
        ``{"method", "seed", "test_acc", "best_acc", "best_epoch", "ece", "alignment", "uniformity",
        "sec_per_epoch", "epochs", "steps", "history", "embeddings", "labels"}``: test accuracy in [0, 1] after the
        last epoch and the best over epochs (with its epoch), expected calibration error (15 bins), alignment and
        uniformity of the test embeddings (:mod:`lightning_multimix.metrics`), all after the last epoch; mean training
        seconds per epoch (evaluation excluded), epochs run, optimizer steps, one dict per epoch (``epoch``, ``steps``,
        ``train_loss`` (the optimised objective), ``val_loss``, ``val_acc``, ``val_ece`` on the test split,
        ``train_seconds``), and the test embeddings ``(N, d)`` (the head's input) with their labels ``(N,)``.
    """
    spec = _method(method)
    for name, value, minimum in (("epochs", epochs, 1), ("batch_size", batch_size, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"run_method: {name}={value!r}; expected an int >= {minimum}.")
    if len(train_data) < batch_size:
        raise ValueError(f"run_method: {len(train_data)} training examples, fewer than batch_size={batch_size}.")
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"run_method: max_minutes={max_minutes!r}; expected None or a value > 0.")

    L.seed_everything(seed, workers=True, verbose=False)
    model = build_module(train_data, spec, seed, classifier_options)
    steps_per_epoch = len(train_data) // (batch_size * devices)
    total_steps = epochs * steps_per_epoch if max_steps < 0 else min(max_steps, epochs * steps_per_epoch)
    history = History()
    head = model.head_path if isinstance(model, ImageClassifier) else None  # segmentation: MultiMix's own choice
    callbacks = [*method_callbacks(method, seed=seed, total_steps=total_steps, head=head,
                                   multimix_options=multimix_options), history]
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, max_epochs=epochs, max_steps=max_steps,
        max_time=timedelta(minutes=max_minutes) if max_minutes is not None else None,
        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=progress, num_sanity_val_steps=0, check_val_every_n_epoch=test_every,
    )
    train_loader = DataLoader(train_data, batch_size=batch_size, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(seed), num_workers=num_workers,
                              persistent_workers=num_workers > 0)
    test_loader = DataLoader(test_data, batch_size=500)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*`max_epochs` was not set.*")
        trainer.fit(model, train_loader, test_loader)
        scores = trainer.test(model, test_loader, verbose=False)[0]
    if isinstance(model, SegmentationModel):
        outputs = dict(zip(("predictions", "labels"), model.test_predictions()))
    else:
        outputs = dict(zip(("embeddings", "labels"), model.test_embeddings()))
    full = [h["train_seconds"] for h in history.epochs if h["steps"] == steps_per_epoch]
    seconds = full or [h["train_seconds"] for h in history.epochs]
    metric = model.metric  # "acc", "map" for multi-label data, "miou" for segmentation
    tested = [(h[f"val_{metric}"], h["epoch"]) for h in history.epochs if h[f"val_{metric}"] is not None]
    best, best_epoch = max(tested, key=lambda a: a[0]) if tested else (float("nan"), 0)
    return {
        "method": method,
        "seed": seed,
        f"test_{metric}": float(scores[f"test/{metric}"]),
        f"best_{metric}": best,
        "best_epoch": best_epoch,
        **{(name if metric == "acc" else f"test_{name}"): float(scores[f"test/{name}"])
           for name in OTHER_RESULTS[metric]},
        "sec_per_epoch": sum(seconds) / len(seconds) if seconds else float("nan"),
        "epochs": len(history.epochs),
        "steps": trainer.global_step,
        "history": history.epochs,
        **outputs,
    }


def build_module(train_data: Data, spec: Method, seed: int,
                 classifier_options: Optional[dict[str, Any]] = None) -> L.LightningModule:
    """The module :func:`run_method` trains on ``train_data``: a
    :class:`~lightning_multimix.demo.segmentation.SegmentationModel` for a
    :class:`~lightning_multimix.demo.data.SegmentationSet` (its input mixing seeded by ``seed``), a
    :class:`~lightning_multimix.demo.classifier.MultiLabelClassifier` for a
    :class:`~lightning_multimix.demo.data.MultiLabelSet`, else an
    :class:`~lightning_multimix.demo.classifier.ImageClassifier` (SmallCNN); each with its optimiser recipe, the
    method's ``input_mix`` and ``classifier`` arguments, then ``classifier_options``."""
    common = {"num_classes": train_data.num_classes, "in_channels": train_data.in_channels,
              "input_mix": spec.input_mix}
    overrides = {**(spec.classifier or {}), **(classifier_options or {})}
    if isinstance(train_data, SegmentationSet):
        return SegmentationModel(**{**common, **SEGMENTATION_OPTIMIZER, "seed": seed, **overrides})
    if isinstance(train_data, MultiLabelSet):
        return MultiLabelClassifier(**{"backbone": "small_cnn", **common, **MULTILABEL_OPTIMIZER, **overrides})
    return ImageClassifier(**{"backbone": "small_cnn", **common, **OPTIMIZER, **overrides})


def _method(method: str) -> Method:
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {tuple(METHODS)}.")
    return METHODS[method]


__all__ = ["BENCHMARK_METHODS", "DEFAULT_METHODS", "METHODS", "MULTILABEL_OPTIMIZER", "OPTIMIZER", "OTHER_RESULTS",
           "REGIMES", "SEGMENTATION_OPTIMIZER", "History", "Method", "Regime", "build_module", "method_callbacks",
           "run_method"]
