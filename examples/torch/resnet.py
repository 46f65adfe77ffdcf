"""A small ResNet-style CNN in plain PyTorch (no torchvision), for ``--model torch:examples.torch.resnet:make``.

Sized to train on two shared cores in a couple of minutes on Fashion-MNIST
(28x28, about 0.5 M multiply-adds a forward pass): a 3x3 stem, max-pool to
14x14, one residual block at 14x14, one down-sampling residual block to 7x7
(1x1 projection on its shortcut), global average pooling and a linear layer.
BatchNorm after every convolution: its running statistics are local to each
process (see zsgd.nn.torch_model), and nothing here knows about zsgd.

    zsgd train --model torch:examples.torch.resnet:make --data fashion-mnist
    zsgd run --n-proc 4 --model torch:examples.torch.resnet:make --data fashion-mnist
    python examples/torch/plain_loop.py      # the same training in a plain PyTorch loop
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (a 1x1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, in_channels: int = 1, n_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.block1 = Block(width, width)
        self.block2 = Block(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.stem(x))), 2)
        x = self.block2(self.block1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def make(input_shape: tuple[int, int, int] = (1, 28, 28), n_classes: int = 10) -> nn.Module:
    """zsgd's factory: the module for images of ``input_shape`` (C, H, W); the loss is zsgd's default, cross-entropy."""
    return ResNet(in_channels=input_shape[0], n_classes=n_classes)
