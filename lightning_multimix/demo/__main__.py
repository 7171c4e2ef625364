"""The main job: ``python -m lightning_multimix.demo`` trains a small CNN on the Fashion-MNIST subset shipped in the
package with ERM, last-layer pairs (Manifold Mixup at the last layer) and MultiMix, then prints a comparison table
and writes pictures and results under ``--out`` (default ``./demo_out``). Nothing is downloaded.

Every method trains the same :class:`~lightning_multimix.models.SmallCNN` from the same initial weights, on the same
batches in the same order (fixed seeds), with SGD (lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4, cosine
schedule over the run, batch 128). MultiMix uses the paper's hyper-parameters: ``alpha = 1``, ``n = 1000``, every
batch mixed. Per-epoch curves are measured on the test split (there is no model selection: the reported numbers are
those of the last epoch).

Options: ``--epochs``, ``--n-tuples``, ``--max-minutes`` (a training-time budget, shared equally by the methods),
``--quick`` (a sub-minute run on a smaller subset), ``--dense`` / ``--distill`` (add Dense MultiMix and
MultiMix + self-distillation), ``--methods`` (any of :data:`METHODS`), ``--data-dir`` (full Fashion-MNIST from disk),
``--out``, ``--seed``, ``--batch-size``, ``--threads``, ``--no-progress``.

For other scripts (``benchmarks/accuracy.py``): :func:`run_method` trains and tests one method and returns its
numbers, history and test embeddings; ``train_data`` / ``test_data`` are the :class:`~lightning_multimix.data.ImageSet`
pair that :func:`~lightning_multimix.data.load_fashion_mnist` returns.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import logging
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_multimix.callback import MultiMix
from lightning_multimix.classifier import ImageClassifier
from lightning_multimix.data import DataFormatError, ImageSet, load_fashion_mnist

METHODS: tuple[str, ...] = ("erm", "mixup", "cutmix", "pairs", "multimix", "dense", "distill")
DEFAULT_METHODS: tuple[str, ...] = ("erm", "pairs", "multimix")
METHOD_DESCRIPTIONS = {
    "erm": "ERM: cross-entropy on clean images, no mixing",
    "mixup": "input mixup: torchvision v2.MixUp(alpha=1)",
    "cutmix": "CutMix: torchvision v2.CutMix(alpha=1)",
    "pairs": "last-layer pairs (Manifold Mixup at the last layer): MultiMix(mode='pairs', alpha=1)",
    "multimix": "MultiMix: MultiMix(n_tuples=n, alpha=1)",
    "dense": "Dense MultiMix: MultiMix(n_tuples=n, alpha=1, dense=True)",
    "distill": "MultiMix + self-distillation: MultiMix(n_tuples=n, alpha=1, distill=True)",
}
#: Epochs of the default demo (ERM + pairs + MultiMix). Measured on 2 CPU cores: about 10 s per ERM epoch when the
#: cores are free, i.e. about 3-4 minutes in all; 12 minutes when the same cores were shared with three other jobs
#: (see examples/demo_output/README.md).
DEFAULT_EPOCHS = 5
#: ``--quick``: this many training / test images per class, and epochs.
QUICK_TRAIN_PER_CLASS, QUICK_TEST_PER_CLASS, QUICK_EPOCHS = 200, 50, 2
#: The optimiser of every method.
OPTIMIZER = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True, "schedule": "cosine"}
ALPHA = 1.0


# ---------------------------------------------------------------------------------------------------- one method


class _History(Callback):
    """Per-epoch record: mean training objective, test loss / accuracy / ECE, training seconds (evaluation excluded)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []
        self._start = 0.0
        self._eval_seconds = 0.0
        self._eval_start = 0.0
        self._loss_sum: Any = 0.0
        self._steps = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._eval_seconds, self._loss_sum, self._steps = time.perf_counter(), 0.0, 0.0, 0

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

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        value = lambda name: float(metrics[name]) if name in metrics else None  # noqa: E731
        self.epochs.append({
            "epoch": trainer.current_epoch + 1,
            "steps": self._steps,
            "train_loss": float(self._loss_sum) / self._steps if self._steps else None,
            "val_loss": value("val/loss"),
            "val_acc": value("val/acc"),
            "val_ece": value("val/ece"),
            "train_seconds": time.perf_counter() - self._start - self._eval_seconds,
        })


def method_callbacks(method: str, *, n_tuples: int, seed: int, total_steps: int, head: str) -> list[Callback]:
    """The MultiMix callback (if any) of ``method``; ``total_steps`` sets the distillation warm-up (half the run).

    Example:
        >>> [type(c).__name__ for c in method_callbacks("multimix", n_tuples=1000, seed=0, total_steps=100, head="fc")]
        ['MultiMix']
        >>> method_callbacks("erm", n_tuples=1000, seed=0, total_steps=100, head="fc")
        []
    """
    _check_method(method)
    common = {"alpha": ALPHA, "seed": seed, "head": head}
    if method == "pairs":
        return [MultiMix(mode="pairs", **common)]
    if method == "multimix":
        return [MultiMix(n_tuples=n_tuples, **common)]
    if method == "dense":
        return [MultiMix(n_tuples=n_tuples, dense=True, **common)]
    if method == "distill":
        # the callback's default warm-up (1000 steps) is longer than a demo run: beta reaches 0.5 half-way instead
        return [MultiMix(n_tuples=n_tuples, distill=True, distill_warmup_steps=max(1, total_steps // 2), **common)]
    return []


def run_method(
    method: str,
    *,
    train_data: ImageSet,
    test_data: ImageSet,
    epochs: int,
    seed: int,
    n_tuples: int = 1000,
    batch_size: int = 128,
    max_steps: int = -1,
    max_minutes: Optional[float] = None,
    progress: bool = True,
) -> dict:
    """Train the demo's SmallCNN with ``method`` on ``train_data``, test it on ``test_data``, return the numbers.

    Args:
        method: one of :data:`METHODS` (see :data:`METHOD_DESCRIPTIONS`).
        train_data, test_data: :class:`~lightning_multimix.data.ImageSet` s, e.g. ``load_fashion_mnist()``.
        epochs: training epochs (the cosine schedule spans them, or ``max_steps`` if that is smaller).
        seed: seeds the initial weights, the batch order and the mixing; equal seeds give every method the same
            initial weights and batches.
        n_tuples: ``n`` of MultiMix (``multimix``, ``dense``, ``distill``).
        batch_size: training batch size (the last incomplete batch is dropped).
        max_steps: stop after this many optimizer steps (``-1``: no limit).
        max_minutes: stop training after this much wall time (then test).
        progress: show Lightning's progress bar.

    Returns:
        ``{"method", "seed", "test_acc", "ece", "alignment", "uniformity", "sec_per_epoch", "epochs", "steps",
        "history", "embeddings", "labels"}``: test accuracy in [0, 1], expected calibration error (15 bins),
        alignment and uniformity of the test embeddings (:mod:`lightning_multimix.metrics`), mean training seconds
        per epoch (evaluation excluded), epochs run, optimizer steps, one dict per epoch (``epoch``, ``steps``,
        ``train_loss`` (the optimised objective), ``val_loss``, ``val_acc``, ``val_ece`` on the test split,
        ``train_seconds``), and the test embeddings ``(N, d)`` (the head's input) with their labels ``(N,)``.
    """
    _check_method(method)
    for name, value, minimum in (("epochs", epochs, 1), ("n_tuples", n_tuples, 1), ("batch_size", batch_size, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"run_method: {name}={value!r}; expected an int >= {minimum}.")
    if len(train_data) < batch_size:
        raise ValueError(f"run_method: {len(train_data)} training examples, fewer than batch_size={batch_size}.")
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"run_method: max_minutes={max_minutes!r}; expected None or a value > 0.")

    L.seed_everything(seed, workers=True, verbose=False)
    model = ImageClassifier("small_cnn", num_classes=train_data.num_classes, in_channels=train_data.in_channels,
                            input_mix=method if method in ("mixup", "cutmix") else None, **OPTIMIZER)
    steps_per_epoch = len(train_data) // batch_size
    total_steps = epochs * steps_per_epoch if max_steps < 0 else min(max_steps, epochs * steps_per_epoch)
    history = _History()
    callbacks = [*method_callbacks(method, n_tuples=n_tuples, seed=seed, total_steps=total_steps,
                                   head=model.head_path), history]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, max_steps=max_steps,
        max_time=timedelta(minutes=max_minutes) if max_minutes is not None else None,
        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=progress, num_sanity_val_steps=0,
    )
    train_loader = DataLoader(train_data, batch_size=batch_size, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(seed))
    test_loader = DataLoader(test_data, batch_size=500)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*`max_epochs` was not set.*")
        trainer.fit(model, train_loader, test_loader)
        scores = trainer.test(model, test_loader, verbose=False)[0]
    embeddings, labels = model.test_embeddings()
    full = [h["train_seconds"] for h in history.epochs if h["steps"] == steps_per_epoch]
    seconds = full or [h["train_seconds"] for h in history.epochs]
    return {
        "method": method,
        "seed": seed,
        "test_acc": float(scores["test/acc"]),
        "ece": float(scores["test/ece"]),
        "alignment": float(scores["test/alignment"]),
        "uniformity": float(scores["test/uniformity"]),
        "sec_per_epoch": sum(seconds) / len(seconds) if seconds else float("nan"),
        "epochs": len(history.epochs),
        "steps": trainer.global_step,
        "history": history.epochs,
        "embeddings": embeddings,
        "labels": labels,
    }


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")


# ---------------------------------------------------------------------------------------------------- reporting


TABLE_COLUMNS = (("method", "method", "{}"), ("epochs", "epochs", "{:d}"), ("test acc", "test_acc", "{:.4f}"),
                 ("ECE", "ece", "{:.4f}"), ("alignment", "alignment", "{:.4f}"),
                 ("uniformity", "uniformity", "{:.4f}"), ("s/epoch", "sec_per_epoch", "{:.1f}"))


def format_table(results: Sequence[dict]) -> str:
    """The comparison table, one row per method, as Markdown.

    Example:
        >>> print(format_table([{"method": "erm", "epochs": 1, "test_acc": 0.5, "ece": 0.1, "alignment": 1.0,
        ...                      "uniformity": -2.0, "sec_per_epoch": 3.0}]))
        | method | epochs | test acc | ECE    | alignment | uniformity | s/epoch |
        |--------|--------|----------|--------|-----------|------------|---------|
        | erm    | 1      | 0.5000   | 0.1000 | 1.0000    | -2.0000    | 3.0     |
    """
    rows = [[fmt.format(r[key]) for _, key, fmt in TABLE_COLUMNS] for r in results]
    headers = [title for title, _, _ in TABLE_COLUMNS]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def save_results(results: Sequence[dict], out: Path, config: dict) -> dict[str, Path]:
    """Write ``results.json`` (config, per-method numbers and history), ``results.csv`` and ``table.md``."""
    scalars = [{k: v for k, v in r.items() if k not in ("embeddings", "labels")} for r in results]
    paths = {"json": out / "results.json", "csv": out / "results.csv", "table": out / "table.md"}
    paths["json"].write_text(json.dumps({"config": config, "results": scalars}, indent=2) + "\n")
    fields = [key for _, key, _ in TABLE_COLUMNS] + ["steps", "seed"]
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(scalars)
    paths["table"].write_text(format_table(results) + "\n")
    return paths


def prepare_output_dir(out: Union[str, os.PathLike]) -> Path:
    """Create ``out`` if needed and check that files can be written in it; raise ``OSError`` naming it otherwise."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OSError(f"--out '{path}' is not a writable directory ({type(err).__name__}: {err.strerror or err}). "
                      "Pass --out pointing to a directory you can write to.") from None
    return path.resolve()


# ---------------------------------------------------------------------------------------------------- command line


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_multimix.demo",
        description="Train a small CNN on the Fashion-MNIST subset shipped in the package with ERM, last-layer pairs "
                    "and MultiMix (optionally Dense MultiMix and MultiMix + distillation); print a comparison table "
                    "and write pictures and results.",
    )
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs per method (default {DEFAULT_EPOCHS}; {QUICK_EPOCHS} with --quick)")
    parser.add_argument("--n-tuples", type=int, default=1000, help="MultiMix's n, interpolations per batch (1000)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="training-time budget for the whole run in minutes, shared equally by the methods; a "
                             "method that runs out stops early and is tested as it is (default: none)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a sub-minute run: {QUICK_TRAIN_PER_CLASS}/{QUICK_TEST_PER_CLASS} training/test images "
                             f"per class, {QUICK_EPOCHS} epochs")
    parser.add_argument("--dense", action="store_true", help="also train Dense MultiMix")
    parser.add_argument("--distill", action="store_true", help="also train MultiMix + self-distillation")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None, metavar="METHOD",
                        help=f"train exactly these methods, from {', '.join(METHODS)} (default: "
                             f"{' '.join(DEFAULT_METHODS)}, plus --dense/--distill)")
    parser.add_argument("--data-dir", default=None,
                        help="directory with the full Fashion-MNIST files (default: the subset shipped in the package)")
    parser.add_argument("--out", default="./demo_out", help="output directory (default ./demo_out)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (128, as in the paper)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice, usually the number of cores); on a "
                             "machine shared with other jobs, 1 can be several times faster")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    """Run the demo; returns the per-method results (see :func:`run_method`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS)
    for name, value in (("--epochs", epochs), ("--n-tuples", args.n_tuples), ("--batch-size", args.batch_size)):
        if value < 1 or (name == "--batch-size" and value < 2):
            parser.error(f"{name} {value}: expected a positive integer" + (" >= 2" if name == "--batch-size" else ""))
    if args.max_minutes is not None and not args.max_minutes > 0:
        parser.error(f"--max-minutes {args.max_minutes}: expected a positive number of minutes")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}: expected a positive integer")
    methods = list(args.methods or DEFAULT_METHODS)
    methods += [m for m, flag in (("dense", args.dense), ("distill", args.distill)) if flag and m not in methods]

    try:  # everything that can fail on bad input fails here, before any training
        out = prepare_output_dir(args.out)
        train, test = load_fashion_mnist(args.data_dir)
    except (OSError, DataFormatError) as err:
        parser.error(str(err))
    needed = [("matplotlib", "the pictures")]
    if {"mixup", "cutmix"} & set(methods):
        needed.append(("torchvision", "--methods mixup/cutmix"))
    missing = [(package, why) for package, why in needed if importlib.util.find_spec(package) is None]
    if missing:
        parser.error("; ".join(f"{why} need {package}" for package, why in missing)
                     + ": pip install 'lightning-multimix[plot,vision]'")
    with _quiet_lightning():
        return _run(args, methods, epochs, out, train, test)


def _run(args: argparse.Namespace, methods: list[str], epochs: int, out: Path, train: ImageSet,
         test: ImageSet) -> list[dict]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        train, test = train.balanced_subset(QUICK_TRAIN_PER_CLASS), test.balanced_subset(QUICK_TEST_PER_CLASS)

    source = "the subset shipped in the package" if args.data_dir is None else f"'{args.data_dir}'"
    print(f"Fashion-MNIST from {source}: {len(train)} training and {len(test)} test images, "
          f"{train.num_classes} classes. SmallCNN, batch {args.batch_size}, {epochs} epoch(s) per method, "
          f"seed {args.seed}, {torch.get_num_threads()} CPU thread(s).")
    budget = args.max_minutes / len(methods) if args.max_minutes is not None else None
    results, started = [], time.perf_counter()
    for i, method in enumerate(methods, 1):
        description = METHOD_DESCRIPTIONS[method].replace("n_tuples=n", f"n_tuples={args.n_tuples}")
        print(f"\n[{i}/{len(methods)}] {method}: {description}", flush=True)
        result = run_method(method, train_data=train, test_data=test, epochs=epochs, seed=args.seed,
                            n_tuples=args.n_tuples, batch_size=args.batch_size, max_minutes=budget,
                            progress=not args.no_progress)
        print(f"    test accuracy {result['test_acc']:.4f} after {result['epochs']} epoch(s), "
              f"{result['sec_per_epoch']:.1f} s/epoch", flush=True)
        results.append(result)
    total = time.perf_counter() - started

    config = {
        "methods": methods, "epochs": epochs, "n_tuples": args.n_tuples, "alpha": ALPHA, "batch_size": args.batch_size,
        "seed": args.seed, "quick": args.quick, "max_minutes": args.max_minutes, "optimizer": OPTIMIZER,
        "data": {"source": source, "train": len(train), "test": len(test)},
        "total_seconds": total, "torch": torch.__version__, "lightning": L.__version__,
        "threads": torch.get_num_threads(), "python": platform.python_version(),
    }
    paths = save_results(results, out, config)
    from lightning_multimix.plots import plot_curves, plot_embeddings

    curves = plot_curves(results, out / "curves.png")
    embeddings = plot_embeddings(results, out / "embeddings.png", class_names=train.classes)

    print(f"\nResults on the test split ({len(test)} images), after {total / 60:.1f} minutes of training and "
          "testing:\n")
    print(format_table(results))
    print("\ntest acc: top-1 accuracy. ECE: expected calibration error (15 bins; lower is better calibrated). "
          "alignment: mean squared distance between normalised test embeddings of the same class (lower: tighter "
          "classes). uniformity: log mean exp(-2 squared distance) over all pairs (lower: more uniformly spread). "
          "s/epoch: training seconds per epoch, evaluation excluded.")
    print(f"\nWrote {curves}, {embeddings}, {paths['json']}, {paths['csv']} and {paths['table']}.")
    return results


if __name__ == "__main__":
    main()
