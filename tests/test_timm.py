"""timm models with the callback alone (built from their configs, no weights): the head from ``get_classifier()``,
dense mode over ``forward_features`` with ``forward_head`` at every position, self-distillation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

timm = pytest.importorskip("timm", reason="the ecosystem tests need timm: pip install 'lightning-multimix[ecosystem]'")

import lightning as L  # noqa: E402

from helpers_models import quiet_trainer  # noqa: E402
from lightning_multimix import Dense, MultiMix, SelfDistillation  # noqa: E402
from lightning_multimix.feature_maps import TimmPositionHead  # noqa: E402

MODELS = {  # name: (create_model arguments, image size, the head's path, positions of the feature map)
    "resnet18": ({}, 64, "model.fc", 4),
    "efficientnet_b0": ({}, 64, "model.classifier", 4),
    "convnext_atto": ({}, 64, "model.head.fc", 4),
    "vit_tiny_patch16_224": ({"img_size": 32}, 32, "model.head", 4),
    "vit_avg": ({"img_size": 32, "global_pool": "avg", "class_token": False}, 32, "model.head", 4),
}


def create(name: str) -> nn.Module:
    args, _, _, _ = MODELS[name]
    return timm.create_model("vit_tiny_patch16_224" if name == "vit_avg" else name, pretrained=False, num_classes=5,
                             **args)


class TimmModule(L.LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.model = create(name)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def data(size: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(8, 3, size, size, generator=g), torch.arange(8) % 5), batch_size=4)


@pytest.mark.parametrize("mode", ["plain", "dense", "distill"])
@pytest.mark.parametrize("name", list(MODELS))
def test_trains_with_the_callback_alone(name, mode):
    torch.manual_seed(0)
    module = TimmModule(name)
    head = module.get_submodule(MODELS[name][2])
    before = head.weight.detach().clone()
    options = {"dense": {"dense": Dense()}, "distill": {"distill": SelfDistillation(warmup_steps=0)}}.get(mode, {})
    callback = MultiMix(n_tuples=16, seed=0, probability=1.0, **options)
    losses = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].detach())

    quiet_trainer([callback, Spy()], max_steps=2).fit(module, data(MODELS[name][1]))
    assert callback.head_path == MODELS[name][2]  # from timm's get_classifier(), not a guess
    assert callback.feature_map_spec == (("model", "timm") if mode == "dense" else None)
    assert len(losses) == 2 and all(torch.isfinite(loss) for loss in losses)
    assert not torch.equal(head.weight, before)  # the classifier trained
    if mode == "distill":
        assert callback.teacher is not None and callback.teacher.num_updates == 2


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "vit_avg", "convnext_atto"])
def test_the_head_at_every_position_is_timms_own_head(name):
    """What ``forward_head`` reads from the whole map is the pooled map (mean of positions, or the class token);
    the head at every position, given that pooled row, must give the model's logits."""
    model = create(name).eval()
    size = MODELS[name][1]
    with torch.no_grad():
        features = model.forward_features(torch.randn(3, 3, size, size))
        logits = model.forward_head(features)
        if features.ndim == 4:
            pooled = features.mean((2, 3))
        elif model.global_pool == "token":
            pooled = features[:, 0]
        else:
            pooled = features[:, model.num_prefix_tokens:].mean(1)
        per_position = TimmPositionHead(model, tokens=features.ndim == 3)(pooled)
    torch.testing.assert_close(per_position, logits, rtol=1e-4, atol=1e-5)


def test_dense_maps_have_the_patch_tokens_or_the_positions():
    """A ViT's class token is left out of the mixed positions; a CNN's map is flattened channels-last."""
    from lightning_multimix.capture import MethodCapture
    from lightning_multimix.feature_maps import read_feature_map

    for name, positions in (("vit_tiny_patch16_224", 4), ("resnet18", 4)):
        model = create(name)
        capture = MethodCapture(model, "forward_features")
        with capture:
            model(torch.randn(2, 3, MODELS[name][1], MODELS[name][1]))
        features, mask, _ = read_feature_map(capture, ("", "timm"), torch.zeros(2, 1), verify=False)
        capture.remove()
        assert features.shape[:2] == (2, positions) and mask is None
        assert "forward_features" not in model.__dict__
