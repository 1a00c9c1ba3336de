"""A small ResNet-style network for square one-channel images, used through an import path
(``model: {import: "resnet_digits:make_resnet"}``; the recipe's folder is on the import
path): by resnet-digits.yaml on scikit-learn's 8x8 digits (the defaults) and by
fashion-resnet.yaml on Fashion-MNIST's 28x28 images (``size: 28``, a max pool after the
stem so the blocks work on 14x14, a 4x4 average-pool grid). Layer names in stats and
plans are the qualified names below, e.g. ``stem.conv``, ``blocks.0.conv1``,
``blocks.1.bn2``, ``head``, whatever the size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Stem(nn.Module):
    """The flat ``size*size`` features as an image, conv-bn-relu, then an optional max pool
    (``stem_pool`` > 1) that makes the residual blocks' convolutions cheaper on large images.
    The pool is a function, not a module, so the 8x8 network's modules stay as they were."""

    def __init__(self, width: int, size: int = 8, stem_pool: int = 1) -> None:
        super().__init__()
        self.size, self.stem_pool = size, stem_pool
        self.conv = nn.Conv2d(1, width, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x.reshape(x.shape[0], 1, self.size, self.size))))
        return F.max_pool2d(y, self.stem_pool) if self.stem_pool > 1 else y


class Block(nn.Module):
    """conv-bn-relu-conv-bn plus the identity, then relu."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class ResNet(nn.Module):
    """Stem, ``blocks`` residual blocks of ``width`` channels, an average pool down to a
    ``pool`` x ``pool`` grid, a linear head over its ``pool*pool*width`` features."""

    def __init__(self, width: int = 8, blocks: int = 2, classes: int = 10, size: int = 8, stem_pool: int = 1,
                 pool: int = 2) -> None:
        super().__init__()
        self.stem = Stem(width, size, stem_pool)
        self.blocks = nn.Sequential(*(Block(width) for _ in range(blocks)))
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.head = nn.Linear(pool * pool * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def make_resnet(width: int = 8, blocks: int = 2, classes: int = 10, size: int = 8, stem_pool: int = 1,
                pool: int = 2) -> nn.Module:
    return ResNet(width, blocks, classes, size, stem_pool, pool)
