"""ImageClassifier: construction, schedules, input-space mixing, evaluation metrics and embeddings, with MultiMix."""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import helpers
from lightning_multimix import MultiMix
from lightning_multimix.demo.classifier import ImageClassifier
from lightning_multimix.metrics import embedding_alignment, embedding_uniformity
from lightning_multimix.demo.models import PreActResNet18, SmallCNN


def tiny_loader(n: int = 16, batch_size: int = 4, seed: int = 0, shuffle: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.arange(n) % 10)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle)


trainer = functools.partial(helpers.trainer, num_sanity_val_steps=0)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*self.log.*")


# ---------------------------------------------------------------------------------------------------- construction


def test_named_and_given_backbones() -> None:
    model = ImageClassifier("small_cnn", num_classes=7, in_channels=3)
    assert isinstance(model.backbone, SmallCNN) and model.backbone.fc.out_features == 7
    assert model.backbone.features[0].in_channels == 3
    assert model.head_path == "backbone.fc" and model.head is model.backbone.fc
    assert model.test_alignment.embedding_dim == 128
    given = ImageClassifier(PreActResNet18(num_classes=5, width=8), num_classes=5)
    assert given(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    assert "backbone" not in given.hparams  # a module is not a hyper-parameter
    assert ImageClassifier("preact_resnet18", num_classes=100, in_channels=3).backbone.fc.out_features == 100


def test_backbone_errors() -> None:
    with pytest.raises(ValueError, match="small_cnn"):
        ImageClassifier("resnet50")
    with pytest.raises(ValueError, match="no nn.Linear head"):
        ImageClassifier(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()))
    with pytest.raises(ValueError, match="No submodule 'classifier'"):
        ImageClassifier(SmallCNN(), head="classifier")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"lr": 0.0}, "lr=0.0"), ({"momentum": 1.0}, "momentum=1.0"), ({"momentum": 0.0, "nesterov": True}, "nesterov"),
     ({"schedule": "step"}, "milestones"), ({"schedule": "linear"}, "schedule='linear'"),
     ({"input_mix": "mosaic"}, "input_mix='mosaic'"), ({"num_classes": 1}, "num_classes=1"),
     ({"label_smoothing": 1.0}, "label_smoothing"), ({"gamma": 0.0}, "gamma")],
)
def test_argument_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImageClassifier(**kwargs)


# ---------------------------------------------------------------------------------------------------- optimisation


class _RecordLR(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize(
    ("schedule", "extra", "expected"),
    [
        ("cosine", {}, [0.1 * (1 + math.cos(math.pi * k / 8)) / 2 for k in range(8)]),
        ("step", {"milestones": [1], "gamma": 0.5}, [0.1] * 4 + [0.05] * 4),
        ("constant", {}, [0.1] * 8),
    ],
)
def test_schedules(schedule: str, extra: dict, expected: list[float]) -> None:
    model = ImageClassifier("small_cnn", lr=0.1, schedule=schedule, **extra)
    record = _RecordLR()
    trainer(max_epochs=2, callbacks=[record], limit_val_batches=0).fit(model, tiny_loader())
    assert record.lrs == pytest.approx(expected)
    optimizer = model.optimizers().optimizer  # LightningOptimizer wraps torch's
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["weight_decay"] == 5e-4


def test_cosine_needs_a_finite_run() -> None:
    model = ImageClassifier("small_cnn")
    with pytest.raises(ValueError, match="max_epochs"):
        trainer(max_epochs=-1, max_time={"seconds": 5}).fit(model, tiny_loader())


# ---------------------------------------------------------------------------------------------------- input mixing


@pytest.mark.parametrize("kind", ["mixup", "cutmix", "mixup_cutmix"])
def test_input_mix_trains_on_torchvision_soft_targets(kind: str) -> None:
    v2 = pytest.importorskip("torchvision.transforms.v2")
    model = ImageClassifier("small_cnn", input_mix=kind, input_mix_alpha=0.4)
    images, labels = next(iter(tiny_loader(n=8, batch_size=8)))
    torch.manual_seed(5)
    loss = model.training_step((images, labels), 0)
    torch.manual_seed(5)
    mixup, cutmix = v2.MixUp(num_classes=10, alpha=0.4), v2.CutMix(num_classes=10, alpha=0.4)
    mixer = {"mixup": mixup, "cutmix": cutmix, "mixup_cutmix": v2.RandomChoice([mixup, cutmix])}[kind]
    mixed_images, soft = mixer(images, labels)
    assert soft.shape == (8, 10) and not torch.equal(soft, F.one_hot(labels, 10).float())
    expected = -(soft * F.log_softmax(model(mixed_images), -1)).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_switch_mixes_with_mixup_on_some_batches_and_cutmix_on_others() -> None:
    """Image i is the constant i + 1, its partner (torchvision's: the batch rolled by one) another constant, so a
    MixUp batch holds blends (every pixel of an image the same value strictly between the two) and a CutMix batch only
    the two originals (a pasted rectangle of the partner's); either way the soft target's weight of the own label is
    the own image's share."""
    pytest.importorskip("torchvision.transforms.v2")
    model = ImageClassifier("small_cnn", input_mix="mixup_cutmix")
    b = 8
    images = torch.arange(1, b + 1, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 1, 28, 28).contiguous()
    labels, partners = torch.arange(b), torch.arange(b).roll(1)
    own = images[:, :, :1, :1]
    partner = own.roll(1, 0)
    seen = []
    model.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    torch.manual_seed(0)
    kinds = []
    for _ in range(20):
        loss = model.training_step((images, labels), 0)
        mixed = seen[-1]
        if torch.all((mixed == own) | (mixed == partner)):  # only original pixels: CutMix
            kinds.append("cutmix")
            weight = (mixed == own).float().mean(dim=(1, 2, 3))
        else:  # every pixel of an image the same blend of the two: MixUp
            kinds.append("mixup")
            assert torch.allclose(mixed, mixed.amax(dim=(1, 2, 3), keepdim=True))
            weight = ((mixed - partner) / (own - partner)).mean(dim=(1, 2, 3))
            assert torch.all((weight > 0) & (weight < 1)) and torch.allclose(weight, weight[0].expand(b))
        targets = weight[:, None] * F.one_hot(labels, 10) + (1 - weight[:, None]) * F.one_hot(partners, 10)
        expected = -(targets * F.log_softmax(model(mixed), -1)).sum(-1).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert 5 <= kinds.count("mixup") <= 15, kinds  # one of the two per batch, with equal chance
    with pytest.raises(ValueError, match="mixup_cutmix"):  # an unknown value names the choices
        ImageClassifier(input_mix="switch")


def test_input_mix_and_multimix_callback_are_exclusive() -> None:
    model = ImageClassifier("small_cnn", input_mix="mixup")
    with pytest.raises(ValueError, match="not both"):
        trainer(max_steps=1, callbacks=[MultiMix(n_tuples=10)]).fit(model, tiny_loader())


def test_multimix_callback_trains_the_classifier() -> None:
    model = ImageClassifier("small_cnn")
    before = model.backbone.fc.weight.detach().clone()
    t = trainer(max_steps=3, callbacks=[MultiMix(n_tuples=50, seed=0)], limit_val_batches=1)
    t.fit(model, tiny_loader(shuffle=True))
    assert t.global_step == 3
    assert math.isfinite(float(t.callback_metrics["multimix/loss"]))
    assert not torch.equal(before, model.backbone.fc.weight)
    assert "training_step" not in model.__dict__  # the callback removed its wrapper


# ---------------------------------------------------------------------------------------------------- evaluation


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE (l1): sum over equal-width confidence bins of |accuracy - mean confidence| weighted by the bin's share."""
    confidence, prediction = probs.max(-1)
    correct = (prediction == labels).float()
    total = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            gap = abs(correct[inside].mean().item() - confidence[inside].mean().item())
            total += inside.float().mean().item() * gap
    return total


def test_test_metrics_and_embeddings() -> None:
    torch.manual_seed(0)
    model = ImageClassifier("small_cnn")
    loader = tiny_loader(n=40, batch_size=16)  # batches of 16, 16, 8
    scores = trainer().test(model, loader, verbose=False)[0]
    embeddings, labels = model.test_embeddings()
    images = torch.cat([b[0] for b in loader])
    labels_all = torch.cat([b[1] for b in loader])
    model.eval()
    with torch.no_grad():
        reference = model.backbone.embed(images)
        logits = model.backbone.fc(reference)
    assert torch.allclose(embeddings, reference, atol=1e-5) and torch.equal(labels, labels_all)
    assert scores["test/acc"] == pytest.approx((logits.argmax(-1) == labels_all).float().mean().item())
    assert scores["test/ece"] == pytest.approx(expected_calibration_error(logits.softmax(-1), labels_all), abs=1e-5)
    assert scores["test/alignment"] == pytest.approx(embedding_alignment(reference, labels_all).item(), rel=1e-5)
    assert scores["test/uniformity"] == pytest.approx(embedding_uniformity(reference).item(), rel=1e-5)
    assert scores["test/loss"] == pytest.approx(F.cross_entropy(logits, labels_all).item(), rel=1e-5)


def test_validation_logs_accuracy_and_ece() -> None:
    model = ImageClassifier("small_cnn")
    scores = trainer().validate(model, tiny_loader(n=24, batch_size=8), verbose=False)[0]
    assert set(scores) == {"val/loss", "val/acc", "val/ece"}
    assert 0.0 <= scores["val/acc"] <= 1.0 and 0.0 <= scores["val/ece"] <= 1.0


def test_test_embeddings_before_test() -> None:
    with pytest.raises(RuntimeError, match="trainer.test"):
        ImageClassifier().test_embeddings()


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = ImageClassifier("small_cnn", lr=0.05, schedule="constant")
    t = trainer(max_steps=1, limit_val_batches=0)
    t.fit(model, tiny_loader())
    t.save_checkpoint(tmp_path / "model.ckpt")
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "model.ckpt")
    assert restored.lr == 0.05
    x = torch.randn(2, 1, 28, 28)
    model.eval(), restored.eval()
    assert torch.equal(model(x), restored(x))
