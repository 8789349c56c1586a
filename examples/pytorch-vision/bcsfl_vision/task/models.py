"""Models for the example federation: a small CNN for MNIST and a ResNet for CIFAR-10."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18


class MnistCNN(nn.Module):
    """Two-conv CNN for 28x28 greyscale digits (about 21k parameters).

    Deliberately small: every round moves the whole model through screening (one
    Gram matrix over all updates), hashing and, in CKKS mode, encryption, so the
    parameter count sets the cost of the whole pipeline. It still reaches ~98% on
    MNIST.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of shape (N, 1, 28, 28)."""
        return self.classifier(self.features(x))


def cifar10_resnet(num_classes: int = 10) -> nn.Module:
    """Return a ResNet-18 adapted to 32x32 inputs, with GroupNorm instead of BatchNorm.

    The stem uses a 3x3 stride-1 convolution and no max-pool (the ImageNet stem
    would shrink a 32x32 image to 8x8 before the first block). GroupNorm replaces
    BatchNorm because BatchNorm mixes samples within a batch, which breaks the
    per-sample gradients Opacus needs for DP-SGD, and because its running
    statistics are not weights that federated averaging treats sensibly.
    """
    model = resnet18(num_classes=num_classes, norm_layer=lambda c: nn.GroupNorm(32, c))
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_model(dataset: str) -> nn.Module:
    """Return a freshly initialised model for ``dataset`` ("mnist" or "cifar10")."""
    if dataset == "mnist":
        return MnistCNN()
    if dataset == "cifar10":
        return cifar10_resnet()
    raise ValueError(f"unknown dataset {dataset!r}; expected 'mnist' or 'cifar10'")
