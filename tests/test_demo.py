"""The demo: ``run_method`` for every method, reproducibility, bad input, and the ``--quick`` run end to end."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import pytest
import torch

from lightning_multimix import demo
from lightning_multimix.data import ImageSet, load_fashion_mnist
from lightning_multimix.demo import METHODS, run_method

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny() -> tuple[ImageSet, ImageSet]:
    train, test = load_fashion_mnist()
    return train.balanced_subset(4), test.balanced_subset(3)  # 40 training, 30 test images


def test_method_contract() -> None:
    assert METHODS == ("erm", "mixup", "cutmix", "pairs", "multimix", "dense", "distill")
    assert demo.DEFAULT_METHODS == ("erm", "pairs", "multimix")
    assert set(demo.METHOD_DESCRIPTIONS) == set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_run_method_every_method(method: str, tiny: tuple[ImageSet, ImageSet]) -> None:
    train, test = tiny
    result = run_method(method, train_data=train, test_data=test, epochs=2, seed=0, n_tuples=64, batch_size=16,
                        max_steps=3, progress=False)
    assert {"method", "seed", "test_acc", "ece", "alignment", "uniformity", "sec_per_epoch", "history", "embeddings",
            "labels"} <= set(result)
    assert result["method"] == method and result["seed"] == 0
    assert result["steps"] == 3  # max_steps stops mid-way through the second epoch (2 full batches per epoch)
    assert [h["epoch"] for h in result["history"]] == [1, 2] and [h["steps"] for h in result["history"]] == [2, 1]
    assert 0.0 <= result["test_acc"] <= 1.0 and 0.0 <= result["ece"] <= 1.0
    assert 0.0 <= result["alignment"] <= 4.0 and -8.0 <= result["uniformity"] <= 0.0
    assert result["sec_per_epoch"] > 0
    assert result["embeddings"].shape == (30, 128) and torch.equal(result["labels"], test.labels)
    for entry in result["history"]:
        assert math.isfinite(entry["train_loss"]) and 0.0 <= entry["val_acc"] <= 1.0
    json.dumps([{k: v for k, v in result.items() if k not in ("embeddings", "labels")}])  # serialisable


def test_method_callbacks() -> None:
    (pairs,) = demo.method_callbacks("pairs", n_tuples=1000, seed=3, total_steps=10, head="backbone.fc")
    assert (pairs.mode, pairs.alpha, pairs.seed, pairs.head) == ("pairs", 1.0, 3, "backbone.fc")
    (multimix,) = demo.method_callbacks("multimix", n_tuples=1000, seed=3, total_steps=10, head="h")
    assert (multimix.mode, multimix.n_tuples, multimix.alpha, multimix.probability) == ("multimix", 1000, 1.0, 1.0)
    (dense,) = demo.method_callbacks("dense", n_tuples=7, seed=3, total_steps=10, head="h")
    assert dense.dense and dense.n_tuples == 7
    (distill,) = demo.method_callbacks("distill", n_tuples=7, seed=3, total_steps=10, head="h")
    assert distill.distill and distill.distill_warmup_steps == 5
    for method in ("erm", "mixup", "cutmix"):
        assert demo.method_callbacks(method, n_tuples=7, seed=3, total_steps=10, head="h") == []


def test_run_method_is_reproducible(tiny: tuple[ImageSet, ImageSet]) -> None:
    train, test = tiny
    runs = [run_method("multimix", train_data=train, test_data=test, epochs=1, seed=seed, n_tuples=32, batch_size=8,
                       progress=False) for seed in (1, 1, 2)]
    assert torch.equal(runs[0]["embeddings"], runs[1]["embeddings"])
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
    results = [{"method": m, "epochs": 3, "test_acc": 0.8 + i / 100, "ece": 0.05, "alignment": 0.5,
                "uniformity": -3.0, "sec_per_epoch": 10.0, "steps": 9, "seed": 0, "history": [],
                "embeddings": torch.zeros(2, 2), "labels": torch.zeros(2)} for i, m in enumerate(("erm", "pairs"))]
    table = demo.format_table(results)
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| erm ") and "0.8100" in lines[3]
    paths = demo.save_results(results, tmp_path, {"epochs": 3})
    saved = json.loads(paths["json"].read_text())
    assert saved["config"] == {"epochs": 3} and [r["method"] for r in saved["results"]] == ["erm", "pairs"]
    assert "embeddings" not in saved["results"][0]
    assert paths["csv"].read_text().splitlines()[0] == "method,epochs,test_acc,ece,alignment,uniformity," \
                                                       "sec_per_epoch,steps,seed"
    assert paths["table"].read_text().strip() == table


# ---------------------------------------------------------------------------------------------------- bad input


def test_unwritable_out_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    started = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        demo.main(["--quick", "--out", str(blocker / "out")])
    assert info.value.code == 2
    assert time.perf_counter() - started < 20  # nothing was trained
    message = capsys.readouterr().err
    assert str(blocker / "out") in message and "writable" in message


def test_prepare_output_dir(tmp_path: Path) -> None:
    assert demo.prepare_output_dir(tmp_path / "new" / "dir") == (tmp_path / "new" / "dir").resolve()
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="not a writable directory"):
        demo.prepare_output_dir(tmp_path / "file")


def test_missing_data_dir_names_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        demo.main(["--quick", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert str(tmp_path / "nowhere" / "train-images-idx3-ubyte.gz") in capsys.readouterr().err


def test_corrupt_data_file_names_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data_dir = tmp_path / "fashion"
    data_dir.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (data_dir / name).write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(SystemExit):
        demo.main(["--data-dir", str(data_dir), "--out", str(tmp_path / "out")])
    assert str(data_dir / "train-images-idx3-ubyte.gz") in capsys.readouterr().err


@pytest.mark.parametrize(("args", "match"), [(["--epochs", "0"], "--epochs 0"),
                                             (["--max-minutes", "0"], "--max-minutes"),
                                             (["--threads", "0"], "--threads 0"),
                                             (["--methods", "bogus"], "invalid choice")])
def test_bad_options(args: list[str], match: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        demo.main([*args, "--out", str(tmp_path)])
    assert match in capsys.readouterr().err


def test_missing_optional_package_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name))
    with pytest.raises(SystemExit):
        demo.main(["--quick", "--out", str(tmp_path)])
    assert "the pictures need matplotlib" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- end to end


def check_outputs(out: Path, methods: list[str], stdout: str) -> list[dict]:
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
        assert result["sec_per_epoch"] > 0 and result["epochs"] == saved["config"]["epochs"]
    return saved["results"]


def test_main_small_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    # a time budget of 0.6 s per method: each stops after its first step(s), then tests, plots and saves
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    demo.main(["--quick", "--epochs", "1", "--methods", "erm", "multimix", "--max-minutes", "0.02", "--no-progress",
               "--out", str(out)])
    results = check_outputs(out, ["erm", "multimix"], capsys.readouterr().out)
    assert all(1 <= r["steps"] < 2000 // 128 for r in results)
    assert logger.level == level  # main() quiets Lightning only while it runs


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo_out"
    started = time.perf_counter()
    demo.main(["--quick", "--out", str(out)])
    elapsed = time.perf_counter() - started
    stdout = capsys.readouterr().out
    results = check_outputs(out, list(demo.DEFAULT_METHODS), stdout)
    assert "| method" in stdout and "test acc" in stdout and "uniformity" in stdout
    erm = results[0]
    assert erm["test_acc"] > 0.5  # ERM learns Fashion-MNIST well above chance (0.1) even in a quick run
    print(f"--quick took {elapsed:.0f} s")


# ---------------------------------------------------------------------------------------------------- plots


def test_pca_2d_matches_eigendecomposition_of_covariance() -> None:
    from lightning_multimix.plots import pca_2d

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
    from lightning_multimix.plots import plot_curves, plot_embeddings

    g = torch.Generator().manual_seed(0)
    results = [{"method": m, "test_acc": 0.5, "embeddings": torch.randn(60, 8, generator=g),
                "labels": torch.arange(60) % 3, "history": [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e,
                                                             "val_acc": 0.3 * e} for e in (1, 2)]}
               for m in ("erm", "pairs", "multimix", "dense", "distill")]  # 5 panels: two rows
    curves = plot_curves(results, tmp_path / "c.png")
    embeddings = plot_embeddings(results, tmp_path / "e.png", class_names=["a", "b", "c"])
    for path in (curves, embeddings):
        assert path.read_bytes().startswith(PNG_MAGIC)
