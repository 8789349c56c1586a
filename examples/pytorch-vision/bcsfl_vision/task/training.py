"""Plain PyTorch train and test loops used by the example ClientApp and the server."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader


def train(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    learning_rate: float,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
) -> float:
    """Train ``model`` in place with SGD and return the mean training loss.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer, optional
        Use this optimizer instead of a fresh SGD(momentum=0.9). DP training passes
        the Opacus-wrapped optimizer (and a matching model and loader) here, so the
        loop is the same with or without differential privacy.
    """
    model.to(device)
    model.train()
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    total_loss, total_batches = 0.0, 0
    for _ in range(epochs):
        for images, labels in loader:
            if len(labels) == 0:  # Poisson sampling (DP) may draw an empty batch.
                continue
            optimizer.zero_grad()
            loss = criterion(model(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
            total_batches += 1
    return total_loss / max(total_batches, 1)


def test(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Return ``(mean cross-entropy loss, accuracy)`` of ``model`` over ``loader``."""
    loss, confusion = evaluate_confusion(model, loader, device)
    return loss, float(np.trace(confusion) / confusion.sum())


@torch.no_grad()
def evaluate_confusion(
    model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int = 10
) -> tuple[float, np.ndarray]:
    """Return the mean cross-entropy loss and the confusion matrix (rows: true class).

    The confusion matrix is what per-class attack metrics need: source-class accuracy
    is a row's diagonal share, and a label-flip's attack success rate is the share of a
    source class predicted as its target class.
    """
    model.to(device)
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss = 0.0
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        total_loss += criterion(logits, labels).item()
        pairs = labels.cpu().numpy() * num_classes + logits.argmax(dim=1).cpu().numpy()
        confusion += np.bincount(pairs, minlength=num_classes**2).reshape(num_classes, -1)
    count = int(confusion.sum())
    if count == 0:
        raise ValueError("cannot evaluate on an empty data loader")
    return total_loss / count, confusion
