"""The demo beside the library: ``python -m lightning_multimix.demo`` trains a small CNN on a Fashion-MNIST subset
shipped here, with ERM, input mixup, pairs and MultiMix, and prints and plots the comparison.

The library never imports this subpackage. Its parts: :mod:`~lightning_multimix.demo.cli` (the command line),
:mod:`~lightning_multimix.demo.training` (one method in one regime: what the benchmarks run too),
:mod:`~lightning_multimix.demo.classifier` (a plain LightningModule), :mod:`~lightning_multimix.demo.models`
(``SmallCNN``, ``PreActResNet18``), :mod:`~lightning_multimix.demo.data` (idx and CIFAR readers, the embedded data in
``data_files/``), :mod:`~lightning_multimix.demo.report` and :mod:`~lightning_multimix.demo.plots`.
It needs the ``[demo]`` extra (torchvision for the input-mixup peers, matplotlib for the pictures).
"""
