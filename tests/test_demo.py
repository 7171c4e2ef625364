"""The demo: ``run_method`` for every method and regime, reproducibility, bad input, the ``--quick`` run end to end."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

from lightning_multimix import Dense, MultiMix
from lightning_multimix.demo import cli, report
from lightning_multimix.demo.data import ImageSet, load_fashion_mnist
from lightning_multimix.demo.training import DEFAULT_METHODS, METHODS, REGIMES, method_callbacks, run_method

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny() -> tuple[ImageSet, ImageSet]:
    train, test = load_fashion_mnist()
    return train.balanced_subset(4), test.balanced_subset(3)  # 40 training, 30 test images


def test_method_contract() -> None:
    assert tuple(METHODS) == ("erm", "mixup", "cutmix", "switch", "pairs", "multimix", "multimix_every", "dense",
                              "distill", "multimix_bce", "multimix_bce_lr0.1")  # BCE: tests/test_multilabel_demo.py
    assert {m: METHODS[m].input_mix for m in METHODS if METHODS[m].input_mix} == {
        "mixup": "mixup", "cutmix": "cutmix", "switch": "mixup_cutmix"}
    assert DEFAULT_METHODS == ("erm", "mixup", "pairs", "multimix")  # the main job: the peers and the default
    assert cli.DEFAULT_REGIME in REGIMES


def test_the_demo_tests_every_second_epoch(tiny: tuple[ImageSet, ImageSet]) -> None:
    train, test = tiny
    result = run_method("erm", train_data=train, test_data=test, epochs=4, seed=0, batch_size=16, test_every=2,
                        progress=False)
    assert [h["val_acc"] is not None for h in result["history"]] == [False, True, False, True]
    assert REGIMES[cli.DEFAULT_REGIME].epochs % cli.TEST_EVERY == 0  # the last epoch is tested


def test_regimes_are_the_documented_ones() -> None:
    assert (REGIMES["clean"].epochs, REGIMES["clean"].train_per_class, REGIMES["clean"].label_noise) == (30, None, 0)
    assert (REGIMES["low_data"].epochs, REGIMES["low_data"].train_per_class) == (100, 100)
    assert (REGIMES["noisy"].epochs, REGIMES["noisy"].train_per_class, REGIMES["noisy"].label_noise) == (60, 300, 0.4)
    train, _ = load_fashion_mnist()
    noisy = REGIMES["noisy"].training_set(train, seed=0)
    clean_labels = train.balanced_subset(300).labels
    assert len(noisy) == 3000 and torch.equal(noisy.images, train.balanced_subset(300).images)
    changed = (noisy.labels != clean_labels).float().mean().item()
    assert 0.4 * 0.9 - 0.03 < changed < 0.4 * 0.9 + 0.03  # 40% redrawn, a tenth of those by chance to the same class
    assert torch.equal(noisy.labels, REGIMES["noisy"].training_set(train, seed=0).labels)  # the seed fixes the noise
    assert not torch.equal(noisy.labels, REGIMES["noisy"].training_set(train, seed=1).labels)


@pytest.mark.parametrize("method", [m for m in METHODS if not m.startswith("multimix_bce")])
def test_run_method_every_method(method: str, tiny: tuple[ImageSet, ImageSet]) -> None:
    train, test = tiny
    spec = METHODS[method].multimix
    options = {"n_tuples": 64} if spec is not None and spec.get("mode") != "pairs" else None
    result = run_method(method, train_data=train, test_data=test, epochs=2, seed=0, batch_size=16,
                        multimix_options=options, max_steps=3, progress=False)
    assert {"method", "seed", "test_acc", "best_acc", "best_epoch", "ece", "alignment", "uniformity",
            "sec_per_epoch", "history", "embeddings", "labels"} <= set(result)
    accuracies = {h["epoch"]: h["val_acc"] for h in result["history"] if h["val_acc"] is not None}
    assert result["best_acc"] == max(accuracies.values()) and accuracies[result["best_epoch"]] == result["best_acc"]
    assert result["method"] == method and result["seed"] == 0
    assert result["steps"] == 3  # max_steps stops mid-way through the second epoch (2 full batches per epoch)
    assert [h["epoch"] for h in result["history"]] == [1, 2] and [h["steps"] for h in result["history"]] == [2, 1]
    assert 0.0 <= result["test_acc"] <= 1.0 and 0.0 <= result["ece"] <= 1.0
    assert 0.0 <= result["alignment"] <= 4.0 and -8.0 <= result["uniformity"] <= 0.0
    assert result["sec_per_epoch"] > 0
    assert result["embeddings"].shape == (30, 128) and torch.equal(result["labels"], test.labels)
    for entry in result["history"]:
        assert math.isfinite(entry["train_loss"]) and (entry["val_acc"] is None or 0.0 <= entry["val_acc"] <= 1.0)
    json.dumps([{k: v for k, v in result.items() if k not in ("embeddings", "labels")}])  # serialisable


def test_method_callbacks() -> None:
    (pairs,) = method_callbacks("pairs", seed=3, total_steps=10, head="backbone.fc")
    assert (pairs.mode, pairs.alpha, pairs.seed, pairs.head, pairs.probability) == ("pairs", 1.0, 3, "backbone.fc", 0.5)
    (multimix,) = method_callbacks("multimix", seed=3, total_steps=10, head="h")
    defaults = MultiMix()
    assert (multimix.mode, multimix.n_tuples, multimix.alpha, multimix.probability, multimix.other_batches) == \
        (defaults.mode, defaults.n_tuples, defaults.alpha, defaults.probability, defaults.other_batches)
    (every,) = method_callbacks("multimix_every", seed=3, total_steps=10, head="h")
    assert every.probability == 1.0
    (dense,) = method_callbacks("dense", seed=3, total_steps=10, head="h", multimix_options={"n_tuples": 7})
    assert dense.dense == Dense() and dense.n_tuples == 7 and dense.probability == 0.5
    (distill,) = method_callbacks("distill", seed=3, total_steps=10, head="h")
    assert distill.distill.warmup_steps == 5
    for method in ("erm", "mixup", "cutmix", "switch"):
        assert method_callbacks(method, seed=3, total_steps=10, head="h") == []
    with pytest.raises(ValueError, match="does not use MultiMix"):
        method_callbacks("mixup", seed=3, total_steps=10, head="h", multimix_options={"n_tuples": 7})


def test_run_method_is_reproducible(tiny: tuple[ImageSet, ImageSet]) -> None:
    train, test = tiny
    runs = [run_method("multimix", train_data=train, test_data=test, epochs=1, seed=seed, batch_size=8,
                       multimix_options={"n_tuples": 32}, progress=False) for seed in (1, 1, 2)]
    assert torch.equal(runs[0]["embeddings"], runs[1]["embeddings"])
    assert runs[0]["test_acc"] == pytest.approx(runs[0]["history"][-1]["val_acc"])  # last epoch's evaluation: the test
    assert runs[0]["history"][0]["train_loss"] == runs[1]["history"][0]["train_loss"]
    assert not torch.equal(runs[0]["embeddings"], runs[2]["embeddings"])


def test_run_method_argument_errors(tiny: tuple[ImageSet, ImageSet]) -> None:
    train, test = tiny
    with pytest.raises(ValueError, match="Unknown method 'manifold'"):
        run_method("manifold", train_data=train, test_data=test, epochs=1, seed=0)
    with pytest.raises(ValueError, match="epochs=0"):
        run_method("erm", train_data=train, test_data=test, epochs=0, seed=0)
    with pytest.raises(ValueError, match="fewer than batch_size=128"):
        run_method("erm", train_data=train, test_data=test, epochs=1, seed=0)


def test_format_table_and_save_results(tmp_path: Path) -> None:
    results = [{"method": m, "epochs": 3, "test_acc": 0.8 + i / 100, "best_acc": 0.85, "best_epoch": 2, "ece": 0.05,
                "alignment": 0.5, "uniformity": -3.0, "sec_per_epoch": 10.0, "steps": 9, "seed": 0, "history": [],
                "embeddings": torch.zeros(2, 2), "labels": torch.zeros(2)} for i, m in enumerate(("erm", "pairs"))]
    table = report.format_table(results)
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| erm ") and "0.8100" in lines[3] and "0.8500" in lines[3]
    paths = report.save_results(results, tmp_path, {"epochs": 3})
    saved = json.loads(paths["json"].read_text())
    assert saved["config"] == {"epochs": 3} and [r["method"] for r in saved["results"]] == ["erm", "pairs"]
    assert "embeddings" not in saved["results"][0]
    assert paths["csv"].read_text().splitlines()[0] == "method,epochs,test_acc,best_acc,ece,alignment,uniformity," \
                                                       "sec_per_epoch,best_epoch,steps,seed"
    assert paths["table"].read_text().strip() == table


# ---------------------------------------------------------------------------------------------------- bad input


def test_unwritable_out_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    started = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        cli.main(["--quick", "--out", str(blocker / "out")])
    assert info.value.code == 2
    assert time.perf_counter() - started < 20  # nothing was trained
    message = capsys.readouterr().err
    assert str(blocker / "out") in message and "writable" in message


def test_prepare_output_dir(tmp_path: Path) -> None:
    assert report.prepare_output_dir(tmp_path / "new" / "dir") == (tmp_path / "new" / "dir").resolve()
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="not a writable directory"):
        report.prepare_output_dir(tmp_path / "file")


def test_missing_data_dir_names_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--quick", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert str(tmp_path / "nowhere" / "train-images-idx3-ubyte.gz") in capsys.readouterr().err


def test_corrupt_data_file_names_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data_dir = tmp_path / "fashion"
    data_dir.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (data_dir / name).write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(SystemExit):
        cli.main(["--data-dir", str(data_dir), "--out", str(tmp_path / "out")])
    assert str(data_dir / "train-images-idx3-ubyte.gz") in capsys.readouterr().err


@pytest.mark.parametrize(("args", "match"), [(["--epochs", "0"], "--epochs 0"),
                                             (["--max-minutes", "0"], "--max-minutes"),
                                             (["--threads", "0"], "--threads 0"),
                                             (["--label-noise", "1.5"], "--label-noise 1.5"),
                                             (["--regime", "bogus"], "invalid choice"),
                                             (["--methods", "bogus"], "invalid choice")])
def test_bad_options(args: list[str], match: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main([*args, "--out", str(tmp_path)])
    assert match in capsys.readouterr().err


def test_missing_optional_package_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name))
    with pytest.raises(SystemExit):
        cli.main(["--quick", "--out", str(tmp_path)])
    assert "the pictures need matplotlib" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- end to end


def check_outputs(out: Path, methods: list[str], stdout: str, epochs: Optional[int] = -1) -> list[dict]:
    """The pictures, the results files, the printed table; ``epochs=-1``: every method ran the configured epochs."""
    for name in ("curves.png", "embeddings.png"):
        content = (out / name).read_bytes()
        assert content.startswith(PNG_MAGIC) and len(content) > 10_000, name
    saved = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in saved["results"]] == methods
    table = (out / "table.md").read_text().strip()
    assert table in stdout  # the printed table is the saved one
    assert len((out / "results.csv").read_text().splitlines()) == len(methods) + 1
    for result in saved["results"]:
        assert 0.0 <= result["test_acc"] <= 1.0 and 0.0 <= result["ece"] <= 1.0
        assert 0.0 <= result["alignment"] <= 4.0 and -8.0 <= result["uniformity"] <= 0.0
        assert result["sec_per_epoch"] > 0
        if epochs is not None:
            assert result["epochs"] == (saved["config"]["epochs"] if epochs == -1 else epochs)
    return saved["results"]


def test_main_small_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    cli.main(["--regime", "clean", "--train-per-class", "26", "--epochs", "2", "--methods", "erm", "multimix",
              "--n-tuples", "50", "--no-progress", "--out", str(out)])
    stdout = capsys.readouterr().out
    results = check_outputs(out, ["erm", "multimix"], stdout)
    assert all(r["steps"] == 2 * (260 // 128) for r in results)
    assert "260 training images (26 training images per class, 2 epochs)" in stdout
    saved = json.loads((out / "results.json").read_text())["config"]
    assert (saved["regime"], saved["train_per_class"], saved["label_noise"]) == ("clean", 26, 0.0)
    assert saved["multimix_options"] == {"n_tuples": 50}
    assert logger.level == level  # main() quiets Lightning only while it runs


def test_max_minutes_stops_each_method_early(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # a budget of 0.6 s per method: far fewer steps than the 10 epochs asked for, then tests, plots and saves
    cli.main(["--quick", "--epochs", "10", "--methods", "erm", "multimix", "--max-minutes", "0.02", "--no-progress",
              "--out", str(tmp_path)])
    results = check_outputs(tmp_path, ["erm", "multimix"], capsys.readouterr().out, epochs=None)
    assert all(1 <= r["steps"] < 10 * (2000 // 128) for r in results)


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo_out"
    started = time.perf_counter()
    cli.main(["--quick", "--out", str(out)])
    elapsed = time.perf_counter() - started
    stdout = capsys.readouterr().out
    results = check_outputs(out, list(DEFAULT_METHODS), stdout)
    assert "| method" in stdout and "test acc" in stdout and "uniformity" in stdout
    erm = results[0]
    assert erm["test_acc"] > 0.5  # ERM learns Fashion-MNIST well above chance (0.1) even in a quick run
    print(f"--quick took {elapsed:.0f} s")


# ---------------------------------------------------------------------------------------------------- plots


def test_pca_2d_matches_eigendecomposition_of_covariance() -> None:
    from lightning_multimix.demo.plots import pca_2d

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64) * torch.tensor([5.0, 0.2, 3.0, 0.1, 1.0],
                                                                              dtype=torch.float64) + 7.0
    projected = pca_2d(x).double()
    centred = x - x.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / 200)  # ascending
    top = eigenvectors[:, [-1, -2]]
    assert torch.allclose(projected.var(0, correction=0), eigenvalues[[-1, -2]], rtol=1e-4)
    # the same axes up to sign, and the sign convention: largest-magnitude loading positive
    reference = centred @ top
    for k in range(2):
        sign = torch.sign(top[top[:, k].abs().argmax(), k])
        assert torch.allclose(projected[:, k], sign * reference[:, k], atol=1e-4)
    with pytest.raises(ValueError, match="N >= 2"):
        pca_2d(torch.zeros(1, 3))


def test_plots_write_pngs(tmp_path: Path) -> None:
    from lightning_multimix.demo.plots import plot_curves, plot_embeddings

    g = torch.Generator().manual_seed(0)
    results = [{"method": m, "test_acc": 0.5, "embeddings": torch.randn(60, 8, generator=g),
                "labels": torch.arange(60) % 3, "history": [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e,
                                                             "val_acc": 0.3 * e} for e in (1, 2)]}
               for m in ("erm", "pairs", "multimix", "dense", "distill")]  # 5 panels: two rows
    curves = plot_curves(results, tmp_path / "c.png")
    embeddings = plot_embeddings(results, tmp_path / "e.png", class_names=["a", "b", "c"])
    for path in (curves, embeddings):
        assert path.read_bytes().startswith(PNG_MAGIC)
