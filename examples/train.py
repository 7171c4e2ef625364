"""Train an :class:`~lightning_multimix.demo.classifier.ImageClassifier` from a YAML config with LightningCLI.

Run from the repository root::

    python -m examples.train fit --config examples/configs/fashion_mnist_multimix.yaml
    python -m examples.train fit --config examples/configs/cifar10_preactresnet18_multimix.yaml --data.data_dir ~/data
    python -m examples.train fit --config examples/configs/fashion_mnist_multimix.yaml --print_config

MultiMix is a callback, so it lives in the config under ``trainer.callbacks``::

    trainer:
      callbacks:
        - class_path: lightning_multimix.MultiMix
          init_args: {n_tuples: 1000, alpha: 1.0}

Any argument can be overridden on the command line (``--trainer.max_epochs=10``, ``--model.lr=0.05``). The model's
``num_classes`` and ``in_channels`` follow the data set (linked from ``data.num_classes`` / ``data.in_channels``), so
configs do not set them. ``fit`` validates on the test split every epoch; run ``test`` with ``--ckpt_path`` to
evaluate a checkpoint, including the embedding alignment and uniformity.
"""

from __future__ import annotations

from typing import Optional

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_multimix.demo.classifier import ImageClassifier
from lightning_multimix.demo.data import ImageDataModule


class MultiMixCLI(LightningCLI):
    """LightningCLI over ``ImageClassifier`` and ``ImageDataModule``, with the number of classes and channels linked."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.in_channels", apply_on="instantiate")


def main(args: Optional[list[str]] = None) -> MultiMixCLI:
    return MultiMixCLI(ImageClassifier, ImageDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
