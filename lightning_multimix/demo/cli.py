"""The main job: ``python -m lightning_multimix.demo`` trains a small CNN on the Fashion-MNIST subset shipped in the
package with ERM, input mixup, pairs and MultiMix (its defaults: the paper's protocol), then prints a comparison
table and writes pictures and results under ``--out`` (default ``./demo_out``). Nothing is downloaded.

The training is :func:`lightning_multimix.demo.training.run_method` (same initial weights and batches for every
method, SGD with a cosine schedule, batch 128), in one of the regimes of :data:`~lightning_multimix.demo.training.
REGIMES`: by default ``noisy_demo`` (300 images per class, 40% of their labels replaced by random ones, 40 epochs;
the test set is clean, tested every 2 epochs), where mixing shows what it is for; ``--regime noisy`` is the
benchmark's 60-epoch version, ``--regime clean`` trains on all 10,000 images for 30 epochs.
``--quick`` is a sub-minute run on a small subset.

``--task multilabel`` trains the multi-label task of :mod:`lightning_multimix.demo.tasks` instead: Fashion-MNIST 2x2
composites (56x56, each cell holding an item with probability 0.5, targets the multi-hot set of the classes present)
with BCE, by ERM, input mixup and MultiMix in its ``noisy`` regime (about 5 minutes on one CPU thread), and reports
macro mAP and F1. ``--task segment`` trains the segmentation task: the same composites with a class per pixel (11
classes, background included), a small fully convolutional network, by ERM, input mixup and MultiMix in its
``low_data`` regime, reports the mean IoU and draws test images with their true and predicted masks
(``segmentation.png``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import logging
import platform
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as L
import torch

from lightning_multimix.demo.data import DataFormatError, ImageSet, load_fashion_mnist
from lightning_multimix.demo.report import format_table, prepare_output_dir, save_results
from lightning_multimix.demo.tasks import MULTILABEL_REGIMES, SEGMENTATION_REGIMES, TASKS, CompositeRegime, Task
from lightning_multimix.demo.training import (DEFAULT_METHODS, METHODS, MULTILABEL_OPTIMIZER, OPTIMIZER, REGIMES,
                                              SEGMENTATION_OPTIMIZER, Regime, run_method)

#: The regime of a plain ``python -m lightning_multimix.demo``.
DEFAULT_REGIME = "noisy_demo"
#: test after every this many epochs (the curves): the demo's 2 keep a default run near 5 minutes on 2 CPU cores
TEST_EVERY = 2
#: ``--quick``: this many training / test images per class, and epochs.
QUICK_TRAIN_PER_CLASS, QUICK_TEST_PER_CLASS, QUICK_EPOCHS = 200, 50, 2
#: ``--quick --task multilabel`` (and ``segment``): this many training / test composites (and ``QUICK_EPOCHS``)
QUICK_TRAIN_COMPOSITES, QUICK_TEST_COMPOSITES = 256, 200
#: each task's optimiser recipe, recorded in ``results.json``
OPTIMIZERS = {"classify": OPTIMIZER, "multilabel": MULTILABEL_OPTIMIZER, "segment": SEGMENTATION_OPTIMIZER}
#: ``--task segment``: test images drawn with their masks in ``segmentation.png``
SEGMENTATION_PICTURES = 4


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """The command line prints its own account of the run: hide Lightning's set-up chatter and known noise (restored
    on exit, so that calling :func:`main` from Python leaves logging and warnings as they were)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")  # Lightning 2.6's pytree use on newer torch
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _escape(text: str) -> str:
    """``text`` as an argparse help string shows it: argparse formats help with ``%``, so a literal ``%`` is ``%%``."""
    return text.replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_multimix.demo",
        description="Train a small CNN on the Fashion-MNIST subset shipped in the package with ERM, input mixup, "
                    "pairs and MultiMix; print a comparison table and write pictures and results.",
    )
    parser.add_argument("--task", choices=list(TASKS), default="classify",
                        help="what to train: classify: single-label Fashion-MNIST with cross-entropy, noisy labels "
                             "(default); multilabel: Fashion-MNIST 2x2 composites (56x56, each cell holding an item "
                             "with probability 0.5), multi-hot targets, BCE, tested by mAP and F1 (methods "
                             f"{' '.join(TASKS['multilabel'].demo_methods)} in regime "
                             f"{TASKS['multilabel'].demo_regime} by default); segment: the same composites with a "
                             "class per pixel (11 with background), a small fully convolutional network, per-pixel "
                             f"cross-entropy, tested by mIoU (methods {' '.join(TASKS['segment'].demo_methods)} in "
                             f"regime {TASKS['segment'].demo_regime} by default)")
    regimes = "; ".join(f"{name}: {r.description}" for name, r in REGIMES.items())
    composites = "; ".join(f"{name}: {r.description}" for name, r in MULTILABEL_REGIMES.items())
    masks = "; ".join(f"{name}: {r.description}" for name, r in SEGMENTATION_REGIMES.items())
    parser.add_argument("--regime", choices=list(dict.fromkeys([*REGIMES, *MULTILABEL_REGIMES, *SEGMENTATION_REGIMES])),
                        default=None,
                        help=f"how much data, how long, how noisy: {_escape(regimes)} (default {DEFAULT_REGIME}); "
                             f"--task multilabel: {_escape(composites)} (default {TASKS['multilabel'].demo_regime}); "
                             f"--task segment: {_escape(masks)} (default {TASKS['segment'].demo_regime})")
    parser.add_argument("--label-noise", type=float, default=None,
                        help="fraction of training labels replaced by random ones (default: the regime's)")
    parser.add_argument("--train-per-class", type=int, default=None,
                        help="training images per class (default: the regime's; --task classify only)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per method (default: the regime's)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=None, metavar="METHOD",
                        help=f"train exactly these methods, from {', '.join(METHODS)} (default: "
                             f"{' '.join(DEFAULT_METHODS)}, plus --dense/--distill)")
    parser.add_argument("--dense", action="store_true", help="also train Dense MultiMix")
    parser.add_argument("--distill", action="store_true", help="also train MultiMix + self-distillation")
    parser.add_argument("--n-tuples", type=int, default=None, help="MultiMix's n, interpolations per batch (1000)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a sub-minute run: {QUICK_TRAIN_PER_CLASS}/{QUICK_TEST_PER_CLASS} training/test images "
                             f"per class, {QUICK_EPOCHS} epochs, the regime's label noise")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="training-time budget for the whole run in minutes, shared equally by the methods; a "
                             "method that runs out stops early and is tested as it is (default: none)")
    parser.add_argument("--data-dir", default=None,
                        help="directory with the full Fashion-MNIST files (default: the subset shipped in the package)")
    parser.add_argument("--out", default="./demo_out", help="output directory (default ./demo_out)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: weights, batches, mixing, label noise (0)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (128, as in the paper)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice, usually the number of cores); on a "
                             "machine shared with other jobs, 1 can be faster")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def _composite_regime(args: argparse.Namespace, parser: argparse.ArgumentParser) -> CompositeRegime:
    """``--task multilabel``'s or ``segment``'s regime with the command line's overrides (``--quick``, ``--epochs``)."""
    if args.label_noise is not None or args.train_per_class is not None:
        parser.error(f"--label-noise and --train-per-class are for --task classify; the {args.task} regimes fix their "
                     "composites and annotation noise (see --regime)")
    base = TASKS[args.task].regimes[args.regime]
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else base.epochs)
    count = QUICK_TRAIN_COMPOSITES if args.quick else base.train_composites
    _check_numbers(args, parser, epochs, count)
    noise = f", labels dropped with probability {base.drop} and added with {base.add}" if base.drop or base.add else ""
    return dataclasses.replace(base, description=f"{count} training composites{noise}, {epochs} epochs", epochs=epochs,
                               train_composites=count)


def _check_numbers(args: argparse.Namespace, parser: argparse.ArgumentParser, epochs: int,
                   per_class: Optional[int]) -> None:
    for name, value, minimum in (("--epochs", epochs, 1), ("--train-per-class", per_class, 1),
                                 ("--batch-size", args.batch_size, 2), ("--n-tuples", args.n_tuples, 1),
                                 ("--threads", args.threads, 1)):
        if value is not None and value < minimum:
            parser.error(f"{name} {value}: expected an integer >= {minimum}")
    if args.max_minutes is not None and not args.max_minutes > 0:
        parser.error(f"--max-minutes {args.max_minutes}: expected a positive number of minutes")


def _regime(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Regime:
    """The regime with the command line's overrides (``--quick``, ``--epochs``, ``--train-per-class``, ...)."""
    base = REGIMES[args.regime]
    per_class = QUICK_TRAIN_PER_CLASS if args.quick else base.train_per_class
    per_class = args.train_per_class if args.train_per_class is not None else per_class
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else base.epochs)
    noise = args.label_noise if args.label_noise is not None else base.label_noise
    _check_numbers(args, parser, epochs, per_class)
    if not 0.0 <= noise <= 1.0:
        parser.error(f"--label-noise {noise}: expected a fraction in [0, 1]")
    parts = [f"{per_class} training images per class" if per_class else "all training images"]
    parts += [f"{noise:.0%} of their labels random"] if noise > 0 else []
    return Regime(", ".join(parts + [f"{epochs} epochs"]), epochs=epochs, train_per_class=per_class,
                  label_noise=noise)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    """Run the demo; returns the per-method results (see :func:`~lightning_multimix.demo.training.run_method`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    args.regime = args.regime or task.demo_regime
    if args.regime not in task.regimes:
        parser.error(f"--regime {args.regime}: not a regime of --task {args.task}; expected one of "
                     f"{', '.join(task.regimes)}")
    regime = _regime(args, parser) if args.task == "classify" else _composite_regime(args, parser)
    methods = list(args.methods or task.demo_methods)
    methods += [m for m, flag in (("dense", args.dense), ("distill", args.distill)) if flag and m not in methods]
    if set(methods) - set(task.methods):
        parser.error(f"--methods {' '.join(sorted(set(methods) - set(task.methods)))}: not a method of --task "
                     f"{args.task}; expected methods from {', '.join(task.methods)}")

    try:  # everything that can fail on bad input fails here, before any training
        out = prepare_output_dir(args.out)
        if args.task == "classify":
            train, test = load_fashion_mnist(args.data_dir)
            test = test.balanced_subset(QUICK_TEST_PER_CLASS) if args.quick else test
        else:
            train, test = task.load(args.data_dir, False)
            test = test.subset(range(QUICK_TEST_COMPOSITES)) if args.quick else test
        train = regime.training_set(train, seed=args.seed)
    except (OSError, DataFormatError, ValueError) as err:
        parser.error(str(err))
    needed = [("matplotlib", "the pictures")]
    if args.task != "segment" and any(METHODS[m].input_mix for m in methods):  # segmentation mixes on its own
        needed.append(("torchvision", "the input-mixing peers (--methods mixup/cutmix/switch)"))
    missing = [(package, why) for package, why in needed if importlib.util.find_spec(package) is None]
    if missing:
        parser.error("; ".join(f"{why} need {package}" for package, why in missing)
                     + ": pip install 'lightning-multimix[demo]'")
    with _quiet_lightning():
        return _run(args, task, methods, regime, out, train, test)


def _run(args: argparse.Namespace, task: Task, methods: list[str], regime: Any, out: Path, train: ImageSet,
         test: ImageSet) -> list[dict]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    source = "the subset shipped in the package" if args.data_dir is None else f"'{args.data_dir}'"
    unit, metric = task.unit, task.metric
    print(f"{task.data} from {source}: {len(train)} training {unit} ({regime.description}), {len(test)} clean "
          f"test {unit}, {train.num_classes} classes. {task.network}, batch {args.batch_size}, seed {args.seed}, "
          f"{torch.get_num_threads()} CPU thread(s).")
    options: dict[str, Any] = {"n_tuples": args.n_tuples} if args.n_tuples is not None else {}
    budget = args.max_minutes / len(methods) if args.max_minutes is not None else None
    results, started = [], time.perf_counter()
    for i, method in enumerate(methods, 1):
        spec = METHODS[method]
        print(f"\n[{i}/{len(methods)}] {method}: {task.method_notes.get(method, spec.description)}", flush=True)
        result = run_method(method, train_data=train, test_data=test, epochs=regime.epochs, seed=args.seed,
                            batch_size=args.batch_size,
                            multimix_options=options if spec.multimix is not None else None, max_minutes=budget,
                            test_every=1 if regime.epochs % TEST_EVERY else TEST_EVERY, progress=not args.no_progress)
        print(f"    test {task.metric_name} {result[f'test_{metric}']:.4f} after {result['epochs']} epoch(s) (best "
              f"{result[f'best_{metric}']:.4f}, epoch {result['best_epoch']}), {result['sec_per_epoch']:.1f} s/epoch",
              flush=True)
        results.append(result)
    total = time.perf_counter() - started
    config = {
        "methods": [r["method"] for r in results], "task": args.task, "regime": args.regime, "epochs": regime.epochs,
        **{k: v for k, v in dataclasses.asdict(regime).items() if k not in ("description", "epochs", "test_every")},
        "multimix_options": options, "batch_size": args.batch_size,
        "seed": args.seed, "quick": args.quick, "max_minutes": args.max_minutes,
        "optimizer": OPTIMIZERS[args.task],
        "data": {"source": source, "train": len(train), "test": len(test)},
        "total_seconds": total, "torch": torch.__version__, "lightning": L.__version__,
        "threads": torch.get_num_threads(), "python": platform.python_version(),
    }
    paths = save_results(results, out, config, task.columns)
    from lightning_multimix.demo.plots import plot_curves, plot_embeddings, plot_segmentations

    pictures = [plot_curves(results, out / "curves.png", metric, f"test {task.metric_name}")]
    if args.task == "classify":
        pictures.append(plot_embeddings(results, out / "embeddings.png", class_names=train.classes))
    if args.task == "segment":
        pictures.append(plot_segmentations(results, test.images, test.masks, out / "segmentation.png", test.classes,
                                           background=test.background, count=SEGMENTATION_PICTURES))

    print(f"\nResults on the clean test split ({len(test)} {unit}), after {total / 60:.1f} minutes of training and "
          "testing:\n")
    print(format_table(results, task.columns))
    if args.task == "multilabel":
        print("\ntest mAP: macro average precision over the 10 classes after the last epoch (chance: about 0.2, the "
              "share of composites showing a class). best mAP: the best test mAP over epochs (picked on the test "
              "set: optimistic). test F1: macro F1 of the sigmoid outputs thresholded at 0.5. s/epoch: training "
              "seconds per epoch, evaluation excluded.")
        print(f"\nWrote {', '.join(map(str, pictures))}, {paths['json']}, {paths['csv']} and {paths['table']}.")
        return results
    if args.task == "segment":
        background = float((test.masks == test.background).float().mean()) / train.num_classes
        print(f"\ntest mIoU: mean over the {train.num_classes} classes (background included) of the intersection over "
              "union of the predicted and true pixels of the class, after the last epoch (background everywhere "
              f"scores {background:.3f}). best mIoU: the best test mIoU over epochs (picked on the test set: "
              "optimistic). s/epoch: training seconds per epoch, evaluation excluded.")
        print(f"\nWrote {', '.join(map(str, pictures))}, {paths['json']}, {paths['csv']} and {paths['table']}.")
        return results
    print("\ntest acc: top-1 accuracy after the last epoch. best acc: the best test accuracy over epochs (picked on "
          "the test set: optimistic). ECE: expected calibration error (15 bins; lower is better calibrated). "
          "alignment: mean squared distance between normalised test embeddings of the same class (lower: tighter "
          "classes). uniformity: log mean exp(-2 squared distance) over all pairs (lower: more uniformly spread). "
          "s/epoch: training seconds per epoch, evaluation excluded.")
    print(f"\nWrote {', '.join(map(str, pictures))}, {paths['json']}, {paths['csv']} and {paths['table']}.")
    return results
