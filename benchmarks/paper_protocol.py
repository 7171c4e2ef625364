"""The papers' CIFAR setting, for a machine with the CIFAR files and a GPU: PreActResNet-18, b = 128, 2000 epochs.

b = 128 per device, MultiMix's defaults, AlignMixup's CIFAR schedule (the same authors'; the papers print none): SGD
lr 0.1, momentum 0.9, weight decay 1e-4, lr x0.1 after a quarter, half and three quarters of ``--epochs``, random crop
and flip; every method through the demo's ``run_method``, tested after every epoch. Output as ``accuracy.py``'s
(``regime``: the data set), in ``--out``: ``paper_<dataset>[_synthetic]`` + ``_runs.csv``, ``_curves.csv``,
``_summary.csv``, ``.md``.

Examples::

    # DIR holds cifar-10-batches-py/ or cifar-100-python/ (the "python version"; nothing is downloaded)
    python benchmarks/paper_protocol.py --data-dir DIR --dataset cifar10 --accelerator gpu
    python benchmarks/paper_protocol.py --synthetic --epochs 1 --width 8 --methods erm,multimix   # CPU smoke run
"""

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

from benchmarks._harness import OUT_DIR, machine_info, print_machine, quiet, results_header, resumed_note, script_parser
from benchmarks.accuracy import RUN_KEYS, curve, previous_runs, record_run, regime_table, summarise, write_summary
from lightning_multimix.demo.data import CIFAR_MEAN, CIFAR_STD, ImageSet, load_cifar
from lightning_multimix.demo.models import PreActResNet18
from lightning_multimix.demo.training import METHODS, run_method

DATASETS = {"cifar10": 10, "cifar100": 100}
DEFAULT_METHODS = ("erm", "mixup", "cutmix", "switch", "multimix", "dense")
#: the paper's run length and AlignMixup's learning-rate milestones in it
PAPER_EPOCHS, PAPER_MILESTONES = 2000, (500, 1000, 1500)


def recipe(epochs: int) -> dict[str, Any]:
    """AlignMixup's SGD and step schedule (``ImageClassifier``'s arguments), milestones scaled to ``epochs``."""
    milestones = sorted({max(1, round(epochs * m / PAPER_EPOCHS)) for m in PAPER_MILESTONES})
    return {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False, "schedule": "step",
            "milestones": milestones, "gamma": 0.1}


def synthetic_cifar(num_classes: int, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Random 32x32 RGB images with random labels, shaped and normalised as CIFAR: a smoke test."""
    g = torch.Generator().manual_seed(seed)
    classes = tuple(f"class_{i}" for i in range(num_classes))
    sets = [ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                     torch.randint(0, num_classes, (n,), generator=g), classes, CIFAR_MEAN, CIFAR_STD)
            for n in (256, 128)]  # training and test images
    return sets[0], sets[1]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--data-dir", default=None, help="folder holding the CIFAR files (never downloaded)")
    parser.add_argument("--dataset", default="cifar10", choices=tuple(DATASETS))
    parser.add_argument("--synthetic", action="store_true", help="generated random images instead: a smoke test")
    parser.add_argument("--skip-checksums", action="store_true", help="no md5 check of the CIFAR files")
    parser.add_argument("--epochs", type=int, default=PAPER_EPOCHS, help="default the paper's %(default)s")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="from " + ",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--batch-size", type=int, default=128, help="per device (default the paper's 128)")
    parser.add_argument("--width", type=int, default=64, help="PreActResNet-18's first width (smaller: smoke tests)")
    parser.add_argument("--accelerator", default="auto", help="the Trainer's (cpu, gpu, auto...)")
    parser.add_argument("--devices", type=int, default=1, help="the Trainer's; b and MultiMix's n are per device")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers for the training set")
    parser.add_argument("--out", default=str(OUT_DIR), help="output folder (default %(default)s)")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in <stem>_runs.csv")
    args = parser.parse_args(argv)
    if unknown := set(args.methods.split(",")) - set(METHODS):
        parser.error(f"--methods: unknown {sorted(unknown)}; expected names from {tuple(METHODS)}")
    if args.data_dir is None and not args.synthetic:
        parser.error("--data-dir is required (the folder holding the CIFAR python-version files), or --synthetic")
    if min(args.epochs, args.batch_size, args.width, args.devices) < 1 or args.workers < 0:
        parser.error("--epochs, --batch-size, --width and --devices must be >= 1, --workers >= 0")
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
