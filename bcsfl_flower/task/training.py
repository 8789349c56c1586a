"""Plain PyTorch train and test loops used by the example ClientApp and the server."""

from __future__ import annotations

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


@torch.no_grad()
def test(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Return ``(mean cross-entropy loss, accuracy)`` of ``model`` over ``loader``."""
    model.to(device)
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct, count = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        total_loss += criterion(logits, labels).item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
        count += len(labels)
    if count == 0:
        raise ValueError("cannot evaluate on an empty data loader")
    return total_loss / count, correct / count
