"""What the demo and ``benchmarks/accuracy.py`` train (``--task``): the data, regimes, methods and measures of each.

* ``classify`` (the default): single-label Fashion-MNIST with cross-entropy, the regimes and methods of
  :mod:`lightning_multimix.demo.training`.
* ``multilabel``: Fashion-MNIST 2x2 composites (:func:`~lightning_multimix.demo.data.make_composites`: 56x56 images,
  each of the four cells holding an item with probability 0.5, at least one item per image, targets the multi-hot set
  of the classes present) trained with BCE with logits
  (:class:`~lightning_multimix.demo.classifier.MultiLabelClassifier`, the demo's SmallCNN unchanged: its global
  pooling takes 56x56 images), tested by macro mAP and macro F1 at 0.5. The composites are generated once:
  :data:`TRAIN_COMPOSITES` from the training split (seed :data:`COMPOSITES_SEED`) and :data:`TEST_COMPOSITES` from the
  test split (seed ``COMPOSITES_SEED + 1``), of the subset shipped in the package; a regime trains on the first
  composites of the training ones. Methods: ``erm``, ``mixup`` (``v2.MixUp``, targets lerped), ``cutmix``
  (``v2.CutMix``, targets mixed by area), ``pairs`` (``MultiMix(mode="pairs")``), ``multimix`` (``MultiMix()``).
  Trained with :data:`~lightning_multimix.demo.training.MULTILABEL_OPTIMIZER` (lr 1: BCE's mean over the classes),
  tested every 2 epochs. Regimes (:data:`MULTILABEL_REGIMES`):

  - ``low_data``: 256 training composites, 40 epochs;
  - ``plateau``: 1,024 composites, 50 epochs: ERM's test mAP over a 60-epoch run (seed 0, ``benchmarks/accuracy.py
    --task multilabel --regimes plateau --methods erm --seeds 0 --epochs 60 --curves``, quoted in
    ``benchmarks/README.md``) climbs to 86.1 at epoch 50 and gains 0.2 point over the last 10;
  - ``noisy``: 1,024 composites, 20 epochs, each present label dropped with probability 0.3 and each absent label
    added with probability 0.05 (:data:`NOISE`; about 0.6 labels dropped and 0.4 added per image), drawn from the
    run's seed; the test composites are clean.

  Time per ERM run on one CPU thread (AMD EPYC): training takes 2.6 s per epoch of 512 composites on an idle core, so
  about 1 to 2 minutes per run (the 60-epoch ERM run of ``plateau`` took 7 minutes on a busy machine).
* ``segment``: semantic segmentation of the same composites (the same items in the same cells:
  :func:`~lightning_multimix.demo.data.make_segmentation_composites`), each pixel labelled with its item's class where
  the item's pixel is foreground (raw intensity above
  :data:`~lightning_multimix.demo.data.FOREGROUND_THRESHOLD`) and background (class 10) elsewhere: 11 classes. A
  small fully convolutional network (:class:`~lightning_multimix.demo.models.SmallFCN`, per-pixel logits at 56x56)
  trained with per-pixel cross-entropy (:class:`~lightning_multimix.demo.segmentation.SegmentationModel`, with
  :data:`~lightning_multimix.demo.training.SEGMENTATION_OPTIMIZER`), tested by the mean IoU over the 11 classes every
  2 epochs. Methods: ``erm``, ``mixup`` (images lerped, one-hot masks lerped into per-pixel soft targets), ``cutmix``
  (a box of image and mask pasted from the permuted batch), ``multimix`` (``MultiMix()``: the per-pixel logits mixed
  over the whole batch, or input mixup, 50/50). Regimes (:data:`SEGMENTATION_REGIMES`): ``low_data`` (256
  composites, 100 epochs) and ``plateau`` (1,024 composites, 50 epochs), each run one or two minutes on an idle CPU
  thread (the network, width 16, takes 0.19 s per step of 128 composites).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from lightning_multimix.demo.data import (MultiLabelSet, SegmentationSet, load_fashion_mnist, make_composites,
                                          make_segmentation_composites)
from lightning_multimix.demo.report import MULTILABEL_COLUMNS, SEGMENTATION_COLUMNS, TABLE_COLUMNS
from lightning_multimix.demo.training import BENCHMARK_METHODS, BENCHMARK_REGIMES, DEFAULT_METHODS, METHODS, REGIMES

#: the composites of the multi-label task: how many from each split, and the seed of the training ones (test: + 1)
TRAIN_COMPOSITES, TEST_COMPOSITES, COMPOSITES_SEED = 4000, 500, 0
#: the noisy regime's annotation noise: probability of dropping a present label, of adding an absent one
NOISE = (0.3, 0.05)


#: the composites of a task: multi-label targets, or masks
Composites = Union[MultiLabelSet, SegmentationSet]


@dataclass(frozen=True)
class CompositeRegime:
    """A multi-label regime: the first ``train_composites`` training composites, ``epochs``, and annotation noise
    (``drop``, ``add``: see :meth:`~lightning_multimix.demo.data.MultiLabelSet.with_label_noise`); the benchmark tests
    every ``test_every`` epochs (and after the last)."""

    description: str
    epochs: int
    train_composites: int
    drop: float = 0.0
    add: float = 0.0
    test_every: int = 2

    def training_set(self, pool: Composites, seed: int) -> Composites:
        """The regime's training set from the training composites ``pool`` (the noise depends on ``seed``; the
        segmentation composites have none)."""
        if self.train_composites > len(pool):
            raise ValueError(f"{self.description}: needs {self.train_composites} composites, {len(pool)} given.")
        data = pool.subset(range(self.train_composites))
        return data.with_label_noise(self.drop, self.add, seed=seed) if self.drop or self.add else data

    def quick(self, epochs: Optional[int] = None) -> "CompositeRegime":
        """The benchmarks' smoke version: the regime's data handling on 130 composites."""
        return dataclasses.replace(self, epochs=epochs or 1, train_composites=130, test_every=1)

    @property
    def cost(self) -> int:
        """Examples seen in a run: the long runs go first."""
        return self.epochs * self.train_composites * 4  # a composite costs about four 28x28 images


MULTILABEL_REGIMES: dict[str, CompositeRegime] = {
    "low_data": CompositeRegime("256 training composites, 40 epochs", epochs=40, train_composites=256),
    "plateau": CompositeRegime("1,024 training composites, 50 epochs (ERM's test mAP flattens)", epochs=50,
                               train_composites=1024),
    "noisy": CompositeRegime(f"1,024 training composites, each present label dropped with probability {NOISE[0]} "
                             f"and each absent one added with probability {NOISE[1]}, 20 epochs", epochs=20,
                             train_composites=1024, drop=NOISE[0], add=NOISE[1]),
}


def load_composites(data_dir: Optional[str] = None, quick: bool = False) -> tuple[MultiLabelSet, MultiLabelSet]:
    """``(training composites, test composites)`` from Fashion-MNIST (``data_dir``: see
    :func:`~lightning_multimix.demo.data.load_fashion_mnist`); ``quick``: 260 and 100 of them."""
    train, test = load_fashion_mnist(data_dir)
    pool = make_composites(train, 260 if quick else TRAIN_COMPOSITES, seed=COMPOSITES_SEED)
    return pool, make_composites(test, 100 if quick else TEST_COMPOSITES, seed=COMPOSITES_SEED + 1)


SEGMENTATION_REGIMES: dict[str, CompositeRegime] = {
    "low_data": CompositeRegime("256 training composites, 100 epochs", epochs=100, train_composites=256),
    # ERM's test mIoU curves in this regime (benchmarks/accuracy.py --task segment --curves, 3 seeds, in
    # benchmarks/results/segment_curves.csv) flatten under the cosine schedule: under 0.4 point over the last 8 epochs
    "plateau": CompositeRegime("1,024 training composites, 50 epochs (ERM's test mIoU flattens)", epochs=50,
                               train_composites=1024),
}


def load_segmentation(data_dir: Optional[str] = None, quick: bool = False
                      ) -> tuple[SegmentationSet, SegmentationSet]:
    """``(training composites, test composites)`` with their masks: the composites of :func:`load_composites`, the
    same items in the same cells; ``quick``: 260 and 100 of them."""
    train, test = load_fashion_mnist(data_dir)
    pool = make_segmentation_composites(train, 260 if quick else TRAIN_COMPOSITES, seed=COMPOSITES_SEED)
    return pool, make_segmentation_composites(test, 100 if quick else TEST_COMPOSITES, seed=COMPOSITES_SEED + 1)


def _load_images(data_dir: Optional[str] = None, quick: bool = False) -> tuple[Any, Any]:
    train, test = load_fashion_mnist(data_dir)
    return (train.balanced_subset(26), test.balanced_subset(20)) if quick else (train, test)


@dataclass(frozen=True)
class Task:
    """A task of the demo (``--task``) and of ``benchmarks/accuracy.py``.

    ``data``: what is trained, in words; ``unit``: one example, in words; ``regimes`` and ``methods``: the names it
    accepts (``methods`` in :data:`~lightning_multimix.demo.training.METHODS`); ``benchmark_*`` and ``demo_*``: the
    defaults of the benchmark and of the demo; ``metric``: the test metric of the curves and of the best epoch
    (``"acc"``, ``"map"``, ``"miou"``: results ``test_<metric>``, ``best_<metric>``, history ``val_<metric>``) and
    ``metric_name`` in words; ``results``: the keys of :func:`~lightning_multimix.demo.training.run_method`'s
    result recorded per run; ``measures``: ``(column title, run key, scale, format)`` of the benchmark's tables (the
    first three are plotted: last and best epoch, then one more); ``columns``: the demo's table
    (:func:`~lightning_multimix.demo.report.format_table`); ``load(data_dir, quick)``: ``(training data, test data)``,
    ``quick``: small ones for smoke runs; ``stem``: the benchmark's file names; ``network``: the network trained, in
    words; ``method_notes``: what a method does in this task where :data:`~lightning_multimix.demo.training.METHODS`'
    description does not say it.
    """

    data: str
    unit: str
    regimes: Mapping[str, Any]
    methods: tuple[str, ...]
    benchmark_regimes: tuple[str, ...]
    benchmark_methods: tuple[str, ...]
    demo_regime: str
    demo_methods: tuple[str, ...]
    metric: str
    metric_name: str
    results: tuple[str, ...]
    measures: tuple[tuple[str, str, float, str], ...]
    columns: tuple[tuple[str, str, str], ...]
    load: Callable[[Optional[str], bool], tuple[Any, Any]]
    stem: str
    network: str = "SmallCNN"
    method_notes: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def run_keys(self) -> tuple[str, ...]:
        """The columns of the benchmark's runs file."""
        return ("regime", "method", "seed", *self.results, "sec_per_epoch", "epochs", "steps", "wall_seconds")


TASKS: dict[str, Task] = {
    "classify": Task(
        data="Fashion-MNIST", unit="images", regimes=REGIMES, methods=tuple(METHODS),
        benchmark_regimes=BENCHMARK_REGIMES, benchmark_methods=BENCHMARK_METHODS, demo_regime="noisy_demo",
        demo_methods=DEFAULT_METHODS, metric="acc", metric_name="accuracy",
        results=("test_acc", "best_acc", "best_epoch", "ece", "alignment", "uniformity"),
        measures=(("last acc %", "test_acc", 100.0, "{:.2f}"), ("best acc %", "best_acc", 100.0, "{:.2f}"),
                  ("ECE", "ece", 1.0, "{:.3f}"), ("alignment", "alignment", 1.0, "{:.3f}"),
                  ("uniformity", "uniformity", 1.0, "{:.3f}"), ("s/epoch", "sec_per_epoch", 1.0, "{:.1f}")),
        columns=TABLE_COLUMNS, load=_load_images, stem="accuracy"),
    "multilabel": Task(
        data="Fashion-MNIST 2x2 composites (multi-label, BCE)", unit="composites", regimes=MULTILABEL_REGIMES,
        methods=("erm", "mixup", "cutmix", "pairs", "multimix"), benchmark_regimes=tuple(MULTILABEL_REGIMES),
        benchmark_methods=("erm", "mixup", "cutmix", "pairs", "multimix"), demo_regime="noisy",
        demo_methods=("erm", "mixup", "multimix"), metric="map", metric_name="mAP",
        results=("test_map", "best_map", "best_epoch", "test_f1"),
        measures=(("last mAP %", "test_map", 100.0, "{:.2f}"), ("best mAP %", "best_map", 100.0, "{:.2f}"),
                  ("F1 %", "test_f1", 100.0, "{:.2f}"), ("s/epoch", "sec_per_epoch", 1.0, "{:.1f}")),
        columns=MULTILABEL_COLUMNS, load=load_composites, stem="multilabel"),
    "segment": Task(
        data="Fashion-MNIST 2x2 composites (segmentation, 11 classes with background)", unit="composites",
        regimes=SEGMENTATION_REGIMES, methods=("erm", "mixup", "cutmix", "multimix"),
        benchmark_regimes=tuple(SEGMENTATION_REGIMES), benchmark_methods=("erm", "mixup", "cutmix", "multimix"),
        demo_regime="low_data", demo_methods=("erm", "mixup", "multimix"), metric="miou", metric_name="mIoU",
        results=("test_miou", "best_miou", "best_epoch"),
        measures=(("last mIoU %", "test_miou", 100.0, "{:.2f}"), ("best mIoU %", "best_miou", 100.0, "{:.2f}"),
                  ("s/epoch", "sec_per_epoch", 1.0, "{:.1f}")),
        columns=SEGMENTATION_COLUMNS, load=load_segmentation, stem="segment", network="SmallFCN",
        method_notes={"mixup": "input mixup: images lerped, one-hot masks lerped into per-pixel soft targets "
                               "(alpha=1), on every batch",
                      "cutmix": "CutMix: a box of the permuted batch's images and masks pasted (alpha=1), on every "
                                "batch",
                      "multimix": "MultiMix(): the per-pixel logits mixed over the whole batch (n=1000, alpha=1) or "
                                  "input mixup, 50/50"}),
}
