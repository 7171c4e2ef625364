"""The paper's CIFAR setting, for a machine with the CIFAR files and a GPU: PreActResNet-18, b = 128, 2000 epochs.

What is run
-----------
The CIFAR-10/100 protocol of the MultiMix papers (``../shared/MULTIMIX.md``): PreActResNet-18
(:class:`lightning_multimix.demo.models.PreActResNet18`), mini-batches of b = 128 (per device), MultiMix with its
defaults. The papers do not print their schedule; this is AlignMixup's (the same authors' CIFAR code,
github.com/shashankvkt/AlignMixup_CVPR22, ``cifar10_100/main.py``): SGD with learning rate 0.1, momentum 0.9, weight
decay 1e-4, 2000 epochs, the learning rate multiplied by 0.1 after epochs 500, 1000 and 1500 (after a quarter, half
and three quarters of ``--epochs`` for a shorter run); random crop (32, padding 4) and horizontal flip, AlignMixup's
normalisation. Every method trains through :func:`lightning_multimix.demo.training.run_method` (same initial weights
and batch order for a given seed) and is tested on the test split after every epoch.

Methods (``lightning_multimix.demo.training.METHODS``; default ``erm,mixup,cutmix,switch,multimix,dense``): ERM,
torchvision's input mixup, CutMix and the per-batch switch between them (alpha 1), ``MultiMix()`` (the paper's
protocol: MultiMix with n = 1000 on half the batches, input mixup on the others) and ``MultiMix(dense=Dense())``.

How to read the output
----------------------
The format of ``benchmarks/accuracy.py`` (the ``regime`` column holds the data set): one line per run as it
finishes, then a table of test accuracy after the last epoch (the number to compare), the best over epochs (what the
mixup papers report: model selection on the test set, optimistic), ECE, alignment, uniformity and training seconds
per epoch, mean +- std over seeds.

Files written into ``--out`` (default ``benchmarks/results``), ``<stem>`` being ``paper_<dataset>`` (with
``_synthetic`` for ``--synthetic``): ``<stem>_runs.csv`` (one row per run, appended as runs finish; ``--resume``
keeps those already there), ``<stem>_curves.csv`` (test accuracy after every epoch of every run),
``<stem>_summary.csv`` and ``<stem>.md`` (command, date, machine, the table).

Examples::

    # the paper's setting: 2000 epochs, 6 methods, 3 seeds; DIR holds cifar-10-batches-py/ (the "python version")
    python benchmarks/paper_protocol.py --data-dir DIR --dataset cifar10 --accelerator gpu
    python benchmarks/paper_protocol.py --data-dir DIR --dataset cifar100 --accelerator gpu --resume
    # CPU smoke run on generated images
    python benchmarks/paper_protocol.py --synthetic --epochs 1 --width 8 --methods erm,multimix --out /tmp/paper
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from benchmarks._harness import RESULTS_DIR, machine_info, print_machine, quiet, results_header, resumed_note
from benchmarks.accuracy import RUN_KEYS, curve, previous_runs, record_run, regime_table, summarise, write_summary
from lightning_multimix.demo.data import CIFAR_MEAN, CIFAR_STD, ImageSet, load_cifar
from lightning_multimix.demo.models import PreActResNet18
from lightning_multimix.demo.training import METHODS, run_method

DATASETS = {"cifar10": 10, "cifar100": 100}
DEFAULT_METHODS = ("erm", "mixup", "cutmix", "switch", "multimix", "dense")
#: the paper's run length and AlignMixup's learning-rate milestones in it
PAPER_EPOCHS, PAPER_MILESTONES = 2000, (500, 1000, 1500)
#: ``--synthetic``: this many generated training and test images
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 256, 128


def recipe(epochs: int) -> dict[str, Any]:
    """The optimisation arguments of ``ImageClassifier`` in the protocol: AlignMixup's SGD and step schedule, its
    milestones scaled from 2000 epochs to ``epochs``.

    Example:
        >>> recipe(2000)["milestones"], recipe(200)["milestones"], recipe(2)["milestones"]
        ([500, 1000, 1500], [50, 100, 150], [1, 2])
    """
    milestones = sorted({max(1, round(epochs * m / PAPER_EPOCHS)) for m in PAPER_MILESTONES})
    return {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False, "schedule": "step",
            "milestones": milestones, "gamma": 0.1}


def synthetic_cifar(num_classes: int, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Random 32x32 RGB images with random labels (a few hundred), shaped and normalised as CIFAR: a smoke test.

    Example:
        >>> train, test = synthetic_cifar(10)
        >>> len(train), len(test), tuple(train[0][0].shape), train.num_classes
        (256, 128, (3, 32, 32), 10)
    """
    g = torch.Generator().manual_seed(seed)
    classes = tuple(f"class_{i}" for i in range(num_classes))
    sets = [ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                     torch.randint(0, num_classes, (n,), generator=g), classes, CIFAR_MEAN, CIFAR_STD)
            for n in (SYNTHETIC_TRAIN, SYNTHETIC_TEST)]
    return sets[0], sets[1]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data-dir", default=None,
                        help="folder holding cifar-10-batches-py/ or cifar-100-python/ (read offline, never "
                             "downloaded)")
    parser.add_argument("--dataset", default="cifar10", choices=tuple(DATASETS))
    parser.add_argument("--synthetic", action="store_true",
                        help=f"generated random images ({SYNTHETIC_TRAIN} training, {SYNTHETIC_TEST} test) instead "
                             "of CIFAR: a smoke test")
    parser.add_argument("--skip-checksums", action="store_true",
                        help="read CIFAR files that differ from the official release (no md5 check)")
    parser.add_argument("--epochs", type=int, default=PAPER_EPOCHS, help=f"default the paper's {PAPER_EPOCHS}")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated, from "
                                                                             + ",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--batch-size", type=int, default=128, help="per device (default the paper's 128)")
    parser.add_argument("--width", type=int, default=64, help="PreActResNet-18's first width (default 64; smaller "
                                                              "only for smoke tests)")
    parser.add_argument("--accelerator", default="auto", help="the Trainer's (cpu, gpu, auto...)")
    parser.add_argument("--devices", type=int, default=1, help="the Trainer's; b and MultiMix's n are per device")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers for the training set")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="output folder")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in <stem>_runs.csv")
    args = parser.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; expected names from {tuple(METHODS)}")
    if args.data_dir is None and not args.synthetic:
        parser.error("--data-dir is required (the folder holding the CIFAR python-version files), or --synthetic")
    for name in ("epochs", "batch_size", "width", "devices"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0:
        parser.error("--workers must be >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    quiet()
    methods = [m for m in METHODS if m in args.methods.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    dataset, num_classes = args.dataset, DATASETS[args.dataset]
    if args.synthetic:
        train, test = synthetic_cifar(num_classes)
    else:  # a missing or corrupt file fails here, before any training
        train, test = load_cifar(args.data_dir, dataset,  # type: ignore[arg-type]
                                 verify_checksums=not args.skip_checksums)
    train = train.with_augment(True)
    options = recipe(args.epochs)

    writer = rank_zero_only.rank == 0  # under several devices, one process writes and prints
    out, stem = Path(args.out), f"paper_{dataset}" + ("_synthetic" if args.synthetic else "")
    runs_path, curves_path = out / f"{stem}_runs.csv", out / f"{stem}_curves.csv"
    cuda = args.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    info = machine_info("cuda" if cuda else "cpu")
    source = "generated random images (--synthetic)" if args.synthetic else f"'{args.data_dir}'"
    description = (f"PreActResNet-18 (width {args.width}), {len(train)} training and {len(test)} test images from "
                   f"{source}, {args.epochs} epochs, lr x0.1 after epochs {options['milestones']}")
    settings = (f"{dataset}: {description}; the paper's protocol: batch {args.batch_size} per device, SGD lr 0.1, "
                f"momentum 0.9, weight decay 1e-4, crop + flip; seeds {seeds}; accelerator {args.accelerator}, "
                f"{args.devices} device(s), {args.workers} loader worker(s)")
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        print_machine(info)
        print("settings: " + settings, flush=True)
    # every process skips the same finished runs; only the writer starts the files afresh
    done = previous_runs(runs_path, curves_path, args.resume, [dataset], methods, seeds) if writer or args.resume \
        else []
    settings += resumed_note(runs_path, len(done))
    finished = {(row["method"], int(row["seed"])) for row in done}

    started = time.perf_counter()
    for seed in seeds:
        for method in methods:
            if (method, seed) in finished:
                continue
            began = time.perf_counter()
            # built after seeding (run_method seeds again): the initial weights depend on the seed only
            L.seed_everything(seed, workers=True, verbose=False)
            network = PreActResNet18(num_classes=num_classes, width=args.width)
            result = run_method(method, train_data=train, test_data=test, epochs=args.epochs, seed=seed,
                                batch_size=args.batch_size, classifier_options={"backbone": network, **options},
                                accelerator=args.accelerator, devices=args.devices, num_workers=args.workers,
                                progress=False)
            result.update(regime=dataset, wall_seconds=time.perf_counter() - began)
            run = {**{key: result[key] for key in RUN_KEYS}, "curve": curve(result["history"])}
            if writer:
                record_run(run, runs_path, curves_path, results_header(info, settings))
            done.append(run)
    if not writer:
        return 0

    summary = summarise(done, [dataset], methods)
    report = regime_table(summary, dataset, description)
    print("\n" + report + f"\n\nwall time of this invocation: {(time.perf_counter() - started) / 60:.1f} min")
    written = write_summary(out, stem, summary, report, results_header(info, settings))
    print(f"wrote {runs_path}, {curves_path}, {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
