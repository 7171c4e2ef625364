"""The segmentation task of the demo and of ``benchmarks/accuracy.py``: the masks, the composites they share with the
multi-label task, the model and its own mixup and CutMix, ``run_method`` on masks, and ``--task segment`` end to end."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_multimix.demo import cli
from lightning_multimix.demo.data import (FOREGROUND_THRESHOLD, SegmentationSet, load_fashion_mnist, make_composites,
                                          make_segmentation_composites)
from lightning_multimix.demo.models import SmallFCN
from lightning_multimix.demo.segmentation import (MixDraw, SegmentationModel, cutmix_segmentation, draw_mix,
                                                  mixup_segmentation)
from lightning_multimix.demo.tasks import SEGMENTATION_REGIMES, TASKS, load_composites, load_segmentation
from lightning_multimix.demo.training import METHODS, method_callbacks, run_method

REPO = Path(__file__).resolve().parents[1]
BACKGROUND = 10


@pytest.fixture(scope="module")
def splits() -> tuple:
    return load_fashion_mnist()


# ---------------------------------------------------------------------------------------------------- data


def test_masks_label_foreground_pixels_with_their_items_class(splits: tuple) -> None:
    train, _ = splits
    data = make_segmentation_composites(train, 300, seed=0)
    assert (data.num_classes, data.background, data.classes[-1]) == (11, BACKGROUND, "background")
    assert tuple(data.masks.shape) == (300, 56, 56) and data.masks.dtype == torch.int64
    assert int(data.masks.min()) >= 0 and int(data.masks.max()) <= BACKGROUND
    for cell in range(4):
        row, column = divmod(cell, 2)
        pixels = data.images[:, 0, 28 * row:28 * (row + 1), 28 * column:28 * (column + 1)]
        mask = data.masks[:, 28 * row:28 * (row + 1), 28 * column:28 * (column + 1)]
        full = data.cells[:, cell] >= 0
        assert bool((mask[~full] == BACKGROUND).all())  # empty cells are background
        foreground = pixels[full] > FOREGROUND_THRESHOLD
        expected = torch.where(foreground, data.cells[full, cell].view(-1, 1, 1), BACKGROUND)
        assert torch.equal(mask[full], expected)  # the item's class where bright, background where dark
        assert bool(foreground.flatten(1).any(1).all())  # every item shows some foreground
    image, mask = data[0]
    assert image.shape == (1, 56, 56) and image.dtype == torch.float32 and torch.equal(mask, data.masks[0])
    part = data.subset([3, 1])
    assert isinstance(part, SegmentationSet) and torch.equal(part.masks, data.masks[[3, 1]])
    assert torch.equal(part.cells, data.cells[[3, 1]]) and part.in_channels == 1


def test_masks_come_from_the_draw_of_the_multilabel_composites(splits: tuple) -> None:
    train, _ = splits
    labels, masks = make_composites(train, 300, seed=5), make_segmentation_composites(train, 300, seed=5)
    for name in ("images", "cells", "sources"):
        assert torch.equal(getattr(labels, name), getattr(masks, name)), name
    for i in range(len(masks)):  # the classes of a mask are the multi-hot targets of the same composite
        shown = set(masks.masks[i].unique().tolist()) - {BACKGROUND}
        assert shown == set(torch.nonzero(labels.targets[i]).flatten().tolist())
    pool, held_out = load_segmentation(quick=True)
    pool_labels, held_out_labels = load_composites(quick=True)
    assert torch.equal(pool.sources, pool_labels.sources) and torch.equal(held_out.images, held_out_labels.images)


def _digest(data: object) -> str:
    digest = hashlib.sha256()
    for name in ("images", "targets", "cells", "sources"):
        digest.update(getattr(data, name).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def test_multilabel_composites_are_unchanged_bit_for_bit(splits: tuple) -> None:
    """The digests of the composites made before the masks shared their draw."""
    train, test = splits
    assert _digest(make_composites(train, 4000, seed=0)) == "cad05e51689e0cbb"
    assert _digest(make_composites(test, 500, seed=1)) == "018a5df2bb758b81"
    assert _digest(make_composites(train, 300, seed=3, item_probability=0.3)) == "b9ded8862154d87a"


def test_segmentation_set_rejects_bad_masks() -> None:
    images, cells = torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.full((2, 4), -1)
    with pytest.raises(ValueError, match="int64"):
        SegmentationSet(images, torch.zeros(2, 4, 4, dtype=torch.int32), ("a", "b"), cells, cells)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        SegmentationSet(images, torch.full((2, 4, 4), 2), ("a", "b"), cells, cells)


# ---------------------------------------------------------------------------------------------------- model and mixing


def test_forward_returns_logits_at_the_input_size() -> None:
    model = SegmentationModel(num_classes=11, in_channels=1)
    assert model(torch.zeros(2, 1, 56, 56)).shape == (2, 11, 56, 56)
    assert SmallFCN(num_classes=3, in_channels=3, width=8)(torch.zeros(1, 3, 29, 30)).shape == (1, 3, 29, 30)
    with pytest.raises(ValueError, match="input_mix"):
        SegmentationModel(input_mix="mixup_cutmix")
    with pytest.raises(ValueError, match="SegmentationModel: invalid `lr"):
        SegmentationModel(lr=0.0)


def _hand_built_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Image ``i`` all ``i``, its mask all ``i``: a pasted pixel says where it came from."""
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 8, 8).clone()
    return images, torch.arange(4).view(4, 1, 1).expand(4, 8, 8).clone()


def test_cutmix_pastes_image_and_mask_from_the_same_box() -> None:
    images, masks = _hand_built_batch()
    partner, box = torch.tensor([2, 0, 3, 1]), (1, 5, 2, 8)
    pasted, labels = cutmix_segmentation(images, masks, MixDraw(torch.tensor(0.5), partner, box))
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[1:5, 2:8] = True
    for i in range(4):
        assert bool((pasted[i, 0][inside] == partner[i]).all()) and bool((labels[i][inside] == partner[i]).all())
        assert bool((pasted[i, 0][~inside] == i).all()) and bool((labels[i][~inside] == i).all())
    assert torch.equal(images, _hand_built_batch()[0])  # the batch itself is left as it was
    for seed in range(20):  # the drawn box: inside the image, about 1 - lam of it before clipping
        draw = draw_mix("cutmix", 4, (56, 56), 1.0, torch.Generator().manual_seed(seed))
        top, bottom, left, right = draw.box
        assert 0 <= top <= bottom <= 56 and 0 <= left <= right <= 56
        assert (bottom - top) * (right - left) <= (1 - float(draw.lam)) * 56 * 56 + 1e-6


def test_mixup_soft_targets_are_the_lerp_of_the_one_hot_masks() -> None:
    images, masks = _hand_built_batch()
    draw = draw_mix("mixup", 4, (8, 8), 1.0, torch.Generator().manual_seed(0))
    mixed, targets = mixup_segmentation(images, masks, draw, num_classes=5)
    lam = float(draw.lam)
    assert targets.shape == (4, 5, 8, 8) and torch.allclose(targets.sum(1), torch.ones(4, 8, 8))
    for i in range(4):
        j = int(draw.partner[i])
        assert torch.allclose(mixed[i], lam * images[i] + (1 - lam) * images[j])
        expected = torch.zeros(5)
        expected[i] += lam
        expected[j] += 1 - lam
        assert torch.allclose(targets[i, :, 3, 3], expected)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_training_step_trains_on_its_own_mixing(kind: str) -> None:
    torch.manual_seed(0)
    model = SegmentationModel(num_classes=11, width=8, input_mix=kind, seed=3)
    model.log = lambda *args, **kwargs: None  # outside a Trainer
    images, masks = torch.randn(4, 1, 16, 16), torch.randint(0, 11, (4, 16, 16))
    draw = draw_mix(kind, 4, (16, 16), 1.0, torch.Generator().manual_seed(3))
    inputs, targets = (mixup_segmentation(images, masks, draw, 11) if kind == "mixup"
                       else cutmix_segmentation(images, masks, draw))
    expected = F.cross_entropy(model(inputs), targets)
    assert torch.allclose(model.training_step((images, masks), 0), expected)


# ---------------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny() -> tuple[SegmentationSet, SegmentationSet]:
    pool, test = load_segmentation(quick=True)
    return pool.subset(range(32)), test.subset(range(12))


def test_task_definitions() -> None:
    task = TASKS["segment"]
    assert task.methods == ("erm", "mixup", "cutmix", "multimix") and set(task.methods) <= set(METHODS)
    assert task.demo_methods == ("erm", "mixup", "multimix") and tuple(task.regimes) == ("low_data", "plateau")
    assert task.demo_regime in task.regimes and task.metric == "miou" and task.stem == "segment"
    assert task.run_keys == ("regime", "method", "seed", "test_miou", "best_miou", "best_epoch", "sec_per_epoch",
                             "epochs", "steps", "wall_seconds")
    assert [key for _, key, _, _ in task.measures] == ["test_miou", "best_miou", "sec_per_epoch"]
    pool, _ = load_segmentation(quick=True)
    quick = SEGMENTATION_REGIMES["plateau"].quick()
    assert torch.equal(quick.training_set(pool, seed=0).masks, pool.masks[:quick.train_composites])


@pytest.mark.parametrize("method", ["erm", "mixup", "cutmix"])
def test_run_method_segmentation(method: str, tiny: tuple[SegmentationSet, SegmentationSet]) -> None:
    train, test = tiny
    result = run_method(method, train_data=train, test_data=test, epochs=1, seed=0, batch_size=16, max_steps=2,
                        progress=False)
    assert result["steps"] == 2 and "test_acc" not in result and "embeddings" not in result
    assert 0.0 <= result["test_miou"] <= result["best_miou"] <= 1.0 and result["best_epoch"] == 1
    history = result["history"]
    assert set(history[0]) == {"epoch", "steps", "train_loss", "val_loss", "val_miou", "train_seconds"}
    assert all(torch.isfinite(torch.tensor([h["train_loss"], h["val_loss"]])).all() for h in history)
    assert result["predictions"].shape == (12, 56, 56) and torch.equal(result["labels"], test.masks)


def test_multimix_method_is_the_callback_with_its_defaults() -> None:
    [callback] = method_callbacks("multimix", seed=0, total_steps=10, head=None)
    assert type(callback).__name__ == "MultiMix" and callback.head is None


def test_run_method_segmentation_multimix(tiny: tuple[SegmentationSet, SegmentationSet]) -> None:
    train, test = tiny
    result = run_method("multimix", train_data=train, test_data=test, epochs=1, seed=0, batch_size=16, max_steps=2,
                        multimix_options={"n_tuples": 64}, progress=False)
    assert result["steps"] == 2 and all(h["train_loss"] == h["train_loss"] for h in result["history"])


# ---------------------------------------------------------------------------------------------------- command lines


def test_demo_segment_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for args, match in ((["--task", "segment", "--regime", "noisy"], "not a regime of --task segment"),
                        (["--task", "segment", "--methods", "pairs"], "not a method of --task segment"),
                        (["--task", "segment", "--train-per-class", "3"], "--task classify")):
        with pytest.raises(SystemExit):
            cli.main([*args, "--out", str(tmp_path)])
        assert match in capsys.readouterr().err
    help_text = " ".join(cli.build_parser().format_help().split())
    assert "--task {classify,multilabel,segment}" in help_text and "segment: the same composites" in help_text


def test_quick_segment_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo_out"
    results = cli.main(["--task", "segment", "--quick", "--epochs", "1", "--methods", "cutmix", "multimix",
                        "--no-progress", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert [r["method"] for r in results] == ["cutmix", "multimix"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["task"] == "segment" and saved["config"]["optimizer"]["lr"] > 0
    assert all(0.0 <= r["test_miou"] <= 1.0 and "predictions" not in r for r in saved["results"])
    assert (out / "table.md").read_text().strip() in stdout and "test mIoU" in stdout and "SmallFCN" in stdout
    for picture in ("curves.png", "segmentation.png"):
        assert (out / picture).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.slow
def test_accuracy_benchmark_segment_quick(tmp_path: Path) -> None:
    methods = ["erm", "mixup", "cutmix", "multimix"]
    command = [sys.executable, "benchmarks/accuracy.py", "--task", "segment", "--quick", "--curves", "--methods",
               ",".join(methods), "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for regime in SEGMENTATION_REGIMES:
        title = next(i for i, line in enumerate(done.stdout.splitlines()) if line.startswith(f"== {regime}: "))
        rows = done.stdout.splitlines()[title + 3:title + 3 + len(methods)]
        assert [row.split()[0] for row in rows] == methods
    assert "last mIoU %" in done.stdout and "SmallFCN" in done.stdout and "the goal" not in done.stdout
    for name in ("segment_runs.csv", "segment_summary.csv", "segment.md", "segment.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    curves = [line for line in (tmp_path / "segment_curves.csv").read_text().splitlines() if not line.startswith("#")]
    assert curves[0] == "regime,method,seed,epoch,test_miou" and len(curves) > 1
    assert "test mIoU % after every epoch" in done.stdout


@pytest.mark.slow
def test_sweep_segment_quick(tmp_path: Path) -> None:
    command = [sys.executable, "benchmarks/sweep.py", "--task", "segment", "--regime", "low_data", "--quick",
               "--configs", "default,tuple_size=2", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SmallFCN on Fashion-MNIST 2x2 composites (segmentation" in done.stdout
    assert "last mIoU %" in done.stdout and "== MultiMix settings, segment low_data" in done.stdout
    table = (tmp_path / "sweep_segment_low_data.md").read_text()
    assert "tuple_size=2" in table and "SmallFCN" in table
