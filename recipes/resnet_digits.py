"""A small ResNet-style network for scikit-learn's 8x8 digits, used by resnet-digits.yaml
through ``model: {import: "resnet_digits:make_resnet"}`` (the recipe's folder is on the
import path). Layer names in stats and plans are the qualified names below, e.g.
``stem.conv``, ``blocks.0.conv1``, ``blocks.1.bn2``, ``head``."""

from __future__ import annotations

import torch
from torch import nn


class Stem(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x.reshape(x.shape[0], 1, 8, 8))))


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
    def __init__(self, width: int = 8, blocks: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.stem = Stem(width)
        self.blocks = nn.Sequential(*(Block(width) for _ in range(blocks)))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def make_resnet(width: int = 8, blocks: int = 2, classes: int = 10) -> nn.Module:
    return ResNet(width, blocks, classes)
