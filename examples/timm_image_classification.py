"""MultiMix on a timm model with the callback alone: timm's own head and features, no code in the model.

The model is built from timm's config (``pretrained=False``: nothing is downloaded) and trained on the Fashion-MNIST
subset shipped with the package. MultiMix finds the classifier from ``get_classifier()``; with ``--dense`` it mixes
what ``forward_features`` returns (a CNN's map, a ViT's patch tokens) and applies ``forward_head`` at every position.

Run from the repository root::

    python -m examples.timm_image_classification                        # resnet18, MultiMix(), 2 epochs
    python -m examples.timm_image_classification --model convnext_atto --dense
    python -m examples.timm_image_classification --model vit_tiny_patch16_224 --distill --max-steps 20
"""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_multimix import Dense, MultiMix, SelfDistillation
from lightning_multimix.demo.data import load_fashion_mnist

#: the images are resized to 64x64 (a CNN's 32x downsampling leaves a 2x2 map); a ViT takes 16 patches of 16x16
MODEL_ARGS = {"vit_tiny_patch16_224": {"img_size": 64}}
IMAGE_SIZE = 64


class TimmClassifier(L.LightningModule):
    """A plain LightningModule around ``timm.create_model``: cross-entropy, SGD. Nothing MultiMix-specific."""

    def __init__(self, model: str = "resnet18", num_classes: int = 10, in_chans: int = 1, lr: float = 0.05) -> None:
        super().__init__()
        import timm

        self.model = timm.create_model(model, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                       **MODEL_ARGS.get(model, {}))
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.model(F.interpolate(x, size=IMAGE_SIZE, mode="bilinear", align_corners=False))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="a timm model name, e.g. resnet18, efficientnet_b0, "
                                                            "convnext_atto, vit_tiny_patch16_224")
    parser.add_argument("--dense", action="store_true", help="Dense MultiMix over the model's forward_features")
    parser.add_argument("--distill", action="store_true", help="self-distillation from an EMA teacher")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--train-per-class", type=int, default=200, help="training images per class")
    args = parser.parse_args(argv)
    L.seed_everything(0, verbose=False)
    train, test = load_fashion_mnist()
    train, test = train.balanced_subset(args.train_per_class), test.balanced_subset(50)
    callback = MultiMix(dense=Dense() if args.dense else None,
                        distill=SelfDistillation(warmup_steps=50) if args.distill else None)
    trainer = L.Trainer(max_epochs=args.epochs, max_steps=args.max_steps, callbacks=[callback], logger=False,
                        enable_checkpointing=False, accelerator="auto", devices=1)
    model, test_loader = TimmClassifier(args.model), DataLoader(test, batch_size=250)
    trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True, drop_last=True), test_loader)
    scores = trainer.validate(model, test_loader, verbose=False)[0]
    print(f"{args.model}: head {callback.head_path!r}, feature map {callback.feature_map_spec}, batches "
          f"{callback.batch_counts}, test accuracy {scores['val/acc']:.3f}")
    return scores


if __name__ == "__main__":
    main()
