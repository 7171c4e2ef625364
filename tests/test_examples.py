"""The LightningCLI example: every YAML config parses, trains for a few steps on tiny data in the real file formats
(run as ``python -m examples.train`` from the repository root), and ``--print_config`` shows MultiMix's arguments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_multimix.demo.data import write_cifar, write_idx

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
CONFIG_NAMES = [c.name for c in CONFIGS]


def write_tiny_fashion(root: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), generator=g,
                                                                          dtype=torch.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", (torch.arange(n) % 10).to(torch.uint8))
    return root


def write_tiny_cifar(root: Path, name: str) -> Path:
    g = torch.Generator().manual_seed(0)
    classes = 10 if name == "cifar10" else 100
    train = (torch.randint(0, 256, (20, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(20) % classes)
    test = (torch.randint(0, 256, (10, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(10) % classes)
    write_cifar(root, name, train, test)  # type: ignore[arg-type]
    return root


def data_args(config: Path, tmp_path: Path) -> list[str]:
    """Point the config at tiny data in ``tmp_path``, in the real file format of its data set."""
    dataset = yaml.safe_load(config.read_text())["data"]["dataset"]
    if dataset == "fashion_mnist":
        return [f"--data.data_dir={write_tiny_fashion(tmp_path)}"]
    return [f"--data.data_dir={write_tiny_cifar(tmp_path, dataset)}", "--data.verify_checksums=false",
            "--data.num_workers=0"]


def run_cli(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "examples.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_there_are_configs_for_the_paper_and_fashion_mnist() -> None:
    assert {"fashion_mnist_multimix.yaml", "cifar10_preactresnet18_multimix.yaml",
            "cifar100_preactresnet18_multimix.yaml"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_NAMES)
def test_config_instantiates_in_process(config: Path, tmp_path: Path) -> None:
    """Fast check of every config: it parses and builds model, data and trainer (no training)."""
    from examples.train import MultiMixCLI
    from lightning_multimix import MultiMix
    from lightning_multimix.demo.classifier import ImageClassifier
    from lightning_multimix.demo.data import ImageDataModule

    settings = yaml.safe_load(config.read_text())
    cli = MultiMixCLI(ImageClassifier, ImageDataModule, run=False,
                      args=["--config", str(config), *data_args(config, tmp_path), "--trainer.logger=false",
                            f"--trainer.default_root_dir={tmp_path}"])
    assert cli.model.num_classes == cli.datamodule.num_classes  # linked
    assert cli.model.hparams.in_channels == cli.datamodule.in_channels
    mixers = [c for c in cli.trainer.callbacks if isinstance(c, MultiMix)]
    declared = settings["trainer"].get("callbacks", [])
    assert len(mixers) == len(declared)
    for callback, spec in zip(mixers, declared):
        for key, value in spec["init_args"].items():
            assert getattr(callback, key) == value
    if "preact_resnet18" in config.name:  # the paper's setting
        assert (cli.model.lr, cli.model.momentum, cli.model.weight_decay) == (0.1, 0.9, 1e-4)
        assert cli.datamodule.batch_size == 128 and cli.datamodule.augment
        assert (mixers[0].n_tuples, mixers[0].alpha) == (1000, 1.0)


def _fit_with_subprocess(config: Path, tmp_path: Path) -> None:
    result = run_cli(["fit", "--config", str(config.relative_to(ROOT)), *data_args(config, tmp_path),
                      "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.accelerator=cpu",
                      "--trainer.devices=1", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
                      "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                      f"--trainer.default_root_dir={tmp_path}", "--data.batch_size=4"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "`max_steps=2` reached" in result.stderr + result.stdout
    if "multimix" in config.name:
        assert "MultiMix: head 'backbone.fc'" in result.stderr + result.stdout


FAST = {"fashion_mnist_multimix.yaml"}


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.name in FAST], ids=sorted(FAST))
def test_config_trains_a_few_steps(config: Path, tmp_path: Path) -> None:
    _fit_with_subprocess(config, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("config", [c for c in CONFIGS if c.name not in FAST],
                         ids=[c.name for c in CONFIGS if c.name not in FAST])
def test_other_configs_train_a_few_steps(config: Path, tmp_path: Path) -> None:
    _fit_with_subprocess(config, tmp_path)


def test_print_config_shows_multimix_arguments() -> None:
    result = run_cli(["fit", "--config", "examples/configs/fashion_mnist_multimix.yaml", "--print_config"])
    assert result.returncode == 0, result.stderr[-4000:]
    printed = yaml.safe_load(result.stdout)
    (callback,) = printed["trainer"]["callbacks"]
    assert callback["class_path"].rsplit(".", 1)[-1] == "MultiMix"
    args = callback["init_args"]
    assert (args["n_tuples"], args["alpha"], args["mode"], args["probability"]) == (1000, 1.0, "multimix", 0.5)
    assert (args["other_batches"], args["dense"], args["distill"]) == (None, None, None)
    assert {"tuple_size", "seed", "logit_space", "mixup_alpha"} <= set(args)
    assert printed["model"]["backbone"] == "small_cnn" and printed["data"]["dataset"] == "fashion_mnist"


def test_cifar_without_data_dir_fails_clearly(tmp_path: Path) -> None:
    from examples.train import MultiMixCLI
    from lightning_multimix.demo.classifier import ImageClassifier
    from lightning_multimix.demo.data import ImageDataModule

    with pytest.raises(ValueError, match="needs data_dir, the directory holding 'cifar-10-batches-py/'"):
        MultiMixCLI(ImageClassifier, ImageDataModule, run=False,
                    args=["--config", str(ROOT / "examples/configs/cifar10_preactresnet18_multimix.yaml"),
                          "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"])


def _run_example(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--model", "resnet18"], ["--model", "vit_tiny_patch16_224", "--dense"]],
                         ids=["resnet18", "vit-dense"])
def test_timm_example_runs(args: list[str]) -> None:
    pytest.importorskip("timm")
    done = _run_example("examples.timm_image_classification", *args, "--max-steps", "3", "--train-per-class", "20")
    assert "test accuracy" in done.stdout and "head 'model." in done.stdout


@pytest.mark.slow
def test_hugging_face_example_runs() -> None:
    pytest.importorskip("transformers")
    done = _run_example("examples.hf_text_classification", "--max-steps", "3")
    assert "head 'model.classifier'" in done.stdout and "'input_mixup': 0" in done.stdout
