"""The multi-label task of the demo and of ``benchmarks/accuracy.py``: the composites, the regimes, the module, the
``--task multilabel`` runs end to end, and MultiMix on BCE (multi-label, and one-hot labels)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_multimix.demo import cli
from lightning_multimix.demo.classifier import ImageClassifier, MultiLabelClassifier
from lightning_multimix.demo.data import MultiLabelSet, load_fashion_mnist, make_composites
from lightning_multimix.demo.tasks import (MULTILABEL_REGIMES, NOISE, TASKS, TEST_COMPOSITES, TRAIN_COMPOSITES,
                                           load_composites)
from lightning_multimix.demo.training import METHODS, run_method

REPO = Path(__file__).resolve().parents[1]
MULTIMIX_METHODS = ("pairs", "multimix")


@pytest.fixture(scope="module")
def splits() -> tuple:
    return load_fashion_mnist()


# ---------------------------------------------------------------------------------------------------- composites


def test_composites_are_deterministic_from_their_seed(splits: tuple) -> None:
    train, _ = splits
    a, b, c = make_composites(train, 300, seed=3), make_composites(train, 300, seed=3), make_composites(train, 300, 4)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets) and torch.equal(a.sources, b.sources)
    assert not torch.equal(a.sources, c.sources)


def test_composites_hold_what_their_targets_say(splits: tuple) -> None:
    train, _ = splits
    data = make_composites(train, 500, seed=0)
    assert tuple(data.images.shape) == (500, 1, 56, 56) and data.targets.dtype == torch.float32
    occupied = data.cells >= 0
    assert bool(occupied.any(1).all())  # at least one item per image
    assert 0.4 < float(occupied.float().mean()) < 0.6  # each cell holds an item with probability 0.5 (given >= 1)
    for i in range(len(data)):  # the multi-hot targets are exactly the classes placed
        assert set(torch.nonzero(data.targets[i]).flatten().tolist()) == set(data.cells[i][occupied[i]].tolist())
    for cell in range(4):  # each cell shows its source item of the split, empty cells are black
        row, column = divmod(cell, 2)
        pixels = data.images[:, :, 28 * row:28 * (row + 1), 28 * column:28 * (column + 1)]
        full = occupied[:, cell]
        assert torch.equal(pixels[full], train.images[data.sources[full, cell]])
        assert torch.equal(data.cells[full, cell], train.labels[data.sources[full, cell]])
        assert int(pixels[~full].max()) == 0
    used = data.sources[occupied]
    assert used.unique().numel() == used.numel()  # no item twice
    image, target = data[0]
    assert image.shape == (1, 56, 56) and image.dtype == torch.float32 and torch.equal(target, data.targets[0])


def test_training_composites_come_from_the_training_split_and_test_from_test(splits: tuple) -> None:
    train, test = splits
    pool, held_out = load_composites()
    assert (len(pool), len(held_out)) == (TRAIN_COMPOSITES, TEST_COMPOSITES) == (4000, 500)
    for composites, split in ((pool, train), (held_out, test)):
        full = composites.cells >= 0
        assert int(composites.sources.max()) < len(split)
        assert torch.equal(composites.cells[full], split.labels[composites.sources[full]])
        first = torch.nonzero(full[:, 0]).flatten()[:20]
        assert torch.equal(composites.images[first, :, :28, :28], split.images[composites.sources[first, 0]])
    with pytest.raises(ValueError, match="distinct items"):
        make_composites(test, 1000, seed=0)  # 2,000 test images cannot fill 1,000 composites of 2.13 items


def test_noisy_relabelling_rates_and_clean_test(splits: tuple) -> None:
    pool, _ = load_composites()
    regime = MULTILABEL_REGIMES["noisy"]
    assert (regime.drop, regime.add) == NOISE == (0.3, 0.05)
    noisy, clean = regime.training_set(pool, seed=0), pool.subset(range(regime.train_composites))
    assert torch.equal(noisy.images, clean.images)
    present = clean.targets == 1
    kept, added = float(noisy.targets[present].mean()), float(noisy.targets[~present].mean())
    assert abs(kept - 0.7) < 0.03 and abs(added - 0.05) < 0.01
    assert torch.equal(noisy.targets, regime.training_set(pool, seed=0).targets)  # the seed fixes the noise
    assert not torch.equal(noisy.targets, regime.training_set(pool, seed=1).targets)
    for name in ("low_data", "plateau"):  # the other regimes are clean
        data = MULTILABEL_REGIMES[name].training_set(pool, seed=0)
        assert torch.equal(data.targets, pool.targets[:len(data)])
    with pytest.raises(ValueError, match="drop=1.5"):
        clean.with_label_noise(1.5, 0.0)


# ---------------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny() -> tuple[MultiLabelSet, MultiLabelSet]:
    pool, test = load_composites(quick=True)
    return pool.subset(range(48)), test.subset(range(40))


def test_task_definitions() -> None:
    task = TASKS["multilabel"]
    assert task.methods == ("erm", "mixup", "cutmix", "pairs", "multimix") and set(task.methods) <= set(METHODS)
    assert task.demo_methods == ("erm", "mixup", "multimix") and tuple(task.regimes) == ("low_data", "plateau", "noisy")
    assert TASKS["classify"].run_keys == ("regime", "method", "seed", "test_acc", "best_acc", "best_epoch", "ece",
                                          "alignment", "uniformity", "sec_per_epoch", "epochs", "steps",
                                          "wall_seconds")


@pytest.mark.parametrize("method", ["erm", "mixup", "cutmix"])
def test_run_method_multilabel(method: str, tiny: tuple[MultiLabelSet, MultiLabelSet]) -> None:
    train, test = tiny
    result = run_method(method, train_data=train, test_data=test, epochs=2, seed=0, batch_size=16, max_steps=3,
                        progress=False)
    assert {"test_map", "best_map", "best_epoch", "test_f1", "sec_per_epoch", "history"} <= set(result)
    assert "test_acc" not in result and 0.0 <= result["test_map"] <= result["best_map"] <= 1.0
    assert 0.0 <= result["test_f1"] <= 1.0 and result["steps"] == 3
    assert result["test_map"] == pytest.approx(result["history"][-1]["val_map"])
    assert set(result["history"][0]) == {"epoch", "steps", "train_loss", "val_loss", "val_map", "val_f1",
                                         "train_seconds"}
    assert result["embeddings"].shape == (40, 128) and torch.equal(result["labels"], test.targets)


def test_multilabel_classifier_loss_is_bce_on_the_batch_targets() -> None:
    torch.manual_seed(0)
    model = MultiLabelClassifier("small_cnn", num_classes=10, in_channels=1)
    images, targets = torch.randn(4, 1, 56, 56), (torch.rand(4, 10) > 0.7).float()
    model.log = lambda *args, **kwargs: None  # outside a Trainer
    expected = F.binary_cross_entropy_with_logits(model(images), targets)
    assert torch.allclose(model.training_step((images, targets), 0), expected)
    one_hot = ImageClassifier("small_cnn", num_classes=10, in_channels=1, loss="bce")
    one_hot.load_state_dict(model.state_dict(), strict=False)
    one_hot.log = model.log
    labels = torch.tensor([0, 3, 9, 3])
    assert torch.allclose(one_hot.training_step((images, labels), 0),
                          F.binary_cross_entropy_with_logits(one_hot(images), F.one_hot(labels, 10).float()))
    with pytest.raises(ValueError, match="label_smoothing"):
        ImageClassifier(loss="bce", label_smoothing=0.1)
    with pytest.raises(ValueError, match="loss"):
        MultiLabelClassifier(loss="ce")


@pytest.mark.parametrize("method", [*MULTIMIX_METHODS, "multimix_bce"])
def test_multimix_on_bce_trains(method: str, tiny: tuple[MultiLabelSet, MultiLabelSet]) -> None:
    """Multi-label (``pairs``, ``multimix``) and BCE on one-hot labels (``multimix_bce``) train with the callback."""
    train, test = tiny
    if method == "multimix_bce":
        images, _ = load_fashion_mnist()
        train, test = images.balanced_subset(4), images.balanced_subset(3)
    options = None if method == "pairs" else {"n_tuples": 64}
    result = run_method(method, train_data=train, test_data=test, epochs=1, seed=0, batch_size=16, max_steps=2,
                        multimix_options=options, progress=False)
    assert result["steps"] == 2 and all(h["train_loss"] == h["train_loss"] for h in result["history"])


# ---------------------------------------------------------------------------------------------------- command lines


def test_demo_task_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for args, match in ((["--regime", "plateau"], "not a regime of --task classify"),
                        (["--task", "multilabel", "--regime", "clean"], "not a regime of --task multilabel"),
                        (["--task", "multilabel", "--methods", "dense"], "not a method of --task multilabel"),
                        (["--task", "multilabel", "--label-noise", "0.2"], "--task classify")):
        with pytest.raises(SystemExit):
            cli.main([*args, "--out", str(tmp_path)])
        assert match in capsys.readouterr().err
    help_text = cli.build_parser().format_help()
    assert "--task {classify,multilabel,segment}" in help_text and "multilabel: Fashion-MNIST 2x2 composites" in help_text


@pytest.mark.slow
def test_quick_multilabel_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo_out"
    results = cli.main(["--task", "multilabel", "--quick", "--no-progress", "--out", str(out)])
    stdout = capsys.readouterr().out
    trained = ["erm", "mixup", "multimix"]
    assert [r["method"] for r in results] == trained
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["task"] == "multilabel" and saved["config"]["train_composites"] == 256
    assert [r["method"] for r in saved["results"]] == trained
    assert all(0.0 <= r["test_map"] <= 1.0 and 0.0 <= r["test_f1"] <= 1.0 for r in saved["results"])
    assert (out / "table.md").read_text().strip() in stdout and "test mAP" in stdout
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "256 training composites" in stdout and "200 clean test composites" in stdout


@pytest.mark.slow
def test_accuracy_benchmark_multilabel_quick(tmp_path: Path) -> None:
    methods = TASKS["multilabel"].benchmark_methods
    command = [sys.executable, "benchmarks/accuracy.py", "--task", "multilabel", "--quick", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for regime in MULTILABEL_REGIMES:
        title = next(i for i, line in enumerate(done.stdout.splitlines()) if line.startswith(f"== {regime}: "))
        rows = done.stdout.splitlines()[title + 3:title + 3 + len(methods)]
        assert [row.split()[0] for row in rows] == list(methods)
    assert "last mAP %" in done.stdout and "F1 %" in done.stdout and "the goal" not in done.stdout
    for name in ("multilabel_runs.csv", "multilabel_summary.csv", "multilabel.md", "multilabel.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert not (tmp_path / "accuracy_runs.csv").exists()
    runs = (tmp_path / "multilabel_runs.csv").read_text().splitlines()
    assert runs[0].startswith("# command: python benchmarks/accuracy.py --task multilabel --quick")
    assert len([line for line in runs if not line.startswith("#")]) == 1 + 3 * len(methods)
