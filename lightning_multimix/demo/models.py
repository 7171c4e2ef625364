"""Reference networks: the demo's small CNN (28x28 grayscale), PreActResNet-18 (32x32, the paper's CIFAR network) and
the small fully convolutional network of the segmentation task.

The classifiers end with a global average pooling (``pool``) and a linear classifier (``fc``), so MultiMix finds the
head and, in dense mode, the feature map without help. :class:`SmallFCN` ends with a 1x1 convolution
(``classifier``) and returns per-pixel logits at the input's size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head; a 28x28 input gives a 7x7 feature map of ``width * 4`` channels.

    Example:
        >>> SmallCNN(num_classes=10)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            return layers + [nn.MaxPool2d(2)] if pool else layers

        self.features = nn.Sequential(
            *block(in_channels, width, True), *block(width, width * 2, True), *block(width * 2, width * 4, False)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 4, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """The penultimate embedding (the head's input)."""
        return self.pool(self.features(x)).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.embed(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al., 2016, "Identity mappings in deep residual networks")."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreActResNet-18 for 32x32 inputs, the network of the MultiMix paper's CIFAR experiments (as in Manifold Mixup).

    A 32x32 input gives a 4x4 feature map (``r = 16`` positions for dense MultiMix) of 512 channels.

    Example:
        >>> PreActResNet18(num_classes=10, width=8)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            layers += [PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.pool(torch.relu(self.bn(self.layers(self.conv1(x))))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.embed(x))


class SmallFCN(nn.Module):
    """A small fully convolutional network for segmentation: per-pixel logits ``(b, num_classes, H, W)``.

    Conv-BN-ReLU blocks: one at full resolution, one with stride 2, then three dilated (2, 4, 8) at half resolution
    (a context module, Yu and Koltun, 2016), so that each output sees 61x61 input pixels, more than a 28x28 item of the
    composites, at the cost of a few layers; then a 1x1 convolution to the classes (``classifier``), upsampled
    bilinearly to the input's size in :meth:`forward`.

    Example:
        >>> SmallFCN(num_classes=11)(torch.zeros(2, 1, 56, 56)).shape
        torch.Size([2, 11, 56, 56])
    """

    def __init__(self, num_classes: int = 11, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_channels, width // 2), *block(width // 2, width, stride=2),
            *block(width, width, dilation=2), *block(width, width, dilation=4), *block(width, width, dilation=8),
        )
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.classifier(self.features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
