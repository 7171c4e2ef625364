"""benchmarks/paper_protocol.py: the paper's CIFAR protocol, run end to end on generated images on the CPU.

The run is a smoke test (one epoch of two steps, a narrow network): it checks the files and their format, not the
accuracy, which means nothing here.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import paper_protocol  # noqa: E402
from benchmarks._harness import read_csv, read_preamble  # noqa: E402

pytest.importorskip("torchvision")


@pytest.fixture(autouse=True)
def restore_logging():
    """``main`` silences Lightning's loggers and warnings for the process (``_harness.quiet``): undone here, so that
    tests after these still see Lightning's log records."""
    loggers = [logging.getLogger(name) for name in ("lightning", "lightning.pytorch", "lightning.fabric",
                                                    "lightning_fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_recipe_is_the_papers() -> None:
    assert paper_protocol.recipe(2000) == {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False,
                                           "schedule": "step", "milestones": [500, 1000, 1500], "gamma": 0.1}
    assert paper_protocol.recipe(40)["milestones"] == [10, 20, 30]
    args = paper_protocol.parse_args(["--data-dir", "x"])
    assert (args.epochs, args.batch_size, args.width, args.dataset, args.seeds) == (2000, 128, 64, "cifar10", "0,1,2")
    assert args.methods.split(",") == ["erm", "mixup", "cutmix", "switch", "multimix", "dense"]


def test_synthetic_smoke_run_writes_the_results_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      one_thread: None) -> None:
    argv = ["--synthetic", "--epochs", "1", "--width", "8", "--methods", "erm,multimix", "--seeds", "0",
            "--accelerator", "cpu", "--workers", "0", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["benchmarks/paper_protocol.py", *argv])
    assert paper_protocol.main(argv) == 0

    stem = tmp_path / "paper_cifar10_synthetic"
    header = Path(f"{stem}.md").read_text().splitlines()
    assert header[0] == "command: python benchmarks/paper_protocol.py " + " ".join(argv)
    assert header[1].startswith("date: ") and header[2].startswith("machine: ") and "torch=" in header[2]
    assert header[3].startswith("settings: cifar10: PreActResNet-18 (width 8)") and "weight decay 1e-4" in header[3]
    assert [line.split()[0] for line in header if line.strip().startswith(("erm", "multimix"))] == ["erm", "multimix"]

    runs = read_csv(Path(f"{stem}_runs.csv"))
    assert read_preamble(Path(f"{stem}_runs.csv"))["command"] == header[0].removeprefix("command: ")
    assert [(r["regime"], r["method"], r["seed"], r["epochs"], r["steps"]) for r in runs] == [
        ("cifar10", "erm", "0", "1", "2"), ("cifar10", "multimix", "0", "1", "2")]  # 256 images, batch 128
    for run in runs:
        assert 0.0 <= float(run["test_acc"]) <= 1.0 and 0.0 <= float(run["best_acc"]) <= 1.0
        assert 0.0 <= float(run["ece"]) <= 1.0 and math.isfinite(float(run["sec_per_epoch"]))
    curves = read_csv(Path(f"{stem}_curves.csv"))
    assert [(c["method"], c["epoch"]) for c in curves] == [("erm", "1"), ("multimix", "1")]
    assert [float(c["test_acc"]) for c in curves] == pytest.approx([float(r["test_acc"]) for r in runs])
    summary = read_csv(Path(f"{stem}_summary.csv"))
    assert [(s["method"], s["runs"]) for s in summary] == [("erm", "1"), ("multimix", "1")]
    assert all(0.0 <= float(s["test_acc_mean"]) <= 100.0 for s in summary)

    # --resume keeps the finished runs and trains nothing more
    assert paper_protocol.main([*argv, "--resume"]) == 0
    assert len(read_csv(Path(f"{stem}_runs.csv"))) == 2


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        paper_protocol.parse_args([])  # neither --data-dir nor --synthetic
    with pytest.raises(SystemExit):
        paper_protocol.parse_args(["--synthetic", "--methods", "erm,mosaic"])


def test_missing_cifar_files_fail_before_training(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        paper_protocol.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_reads_cifar_files_from_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    from lightning_multimix.demo.data import write_cifar

    g = torch.Generator().manual_seed(0)
    split = lambda n: (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),  # noqa: E731
                       torch.randint(0, 100, (n,), generator=g))
    write_cifar(tmp_path / "data", "cifar100", split(130), split(20))
    argv = ["--data-dir", str(tmp_path / "data"), "--skip-checksums", "--dataset", "cifar100", "--epochs", "1",
            "--width", "8", "--methods", "switch", "--seeds", "3", "--accelerator", "cpu", "--workers", "0",
            "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["benchmarks/paper_protocol.py", *argv])
    assert paper_protocol.main(argv) == 0
    (run,) = read_csv(tmp_path / "paper_cifar100_runs.csv")
    assert (run["regime"], run["method"], run["seed"], run["steps"]) == ("cifar100", "switch", "3", "1")
    assert 0.0 <= float(run["test_acc"]) <= 1.0
    assert "130 training and 20 test images" in (tmp_path / "paper_cifar100.md").read_text()
