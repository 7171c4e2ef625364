"""Two-line adoption on torchvision's classifiers: only the callback line, the head found unaided."""

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_multimix import MultiMix

models = pytest.importorskip("torchvision.models")


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def tiny_vit() -> nn.Module:
    return models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )


class MLPNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.layers(x)


@pytest.mark.parametrize(
    "build, head",
    [
        (lambda: models.resnet18(num_classes=10), "net.fc"),
        (tiny_vit, "net.heads.head"),
        (lambda: models.efficientnet_b0(num_classes=10), "net.classifier.1"),
        (lambda: models.mobilenet_v3_small(num_classes=10), "net.classifier.3"),
        (MLPNet, "net.layers.3"),
    ],
    ids=["resnet18", "vit", "efficientnet_b0", "mobilenet_v3_small", "mlp"],
)
def test_callback_line_only(build, head):
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    callback = MultiMix(n_tuples=64, seed=0)
    module = Classifier(build())
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = L.Trainer(
        max_steps=2, callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    assert callback.head_path == head
    assert torch.isfinite(trainer.callback_metrics["multimix/loss"])
    # the first layers of the encoder were updated by the MultiMix loss
    first = next(n for n, p in module.named_parameters() if p.requires_grad)
    assert not torch.equal(before[first], dict(module.named_parameters())[first])
