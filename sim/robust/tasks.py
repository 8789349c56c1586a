"""The bench's learning tasks: MNIST partitions, three models, local training, evaluation.

Everything a client does runs in this process on real MNIST: local SGD on its own
Dirichlet partition (or an IID share), and the loss a validator reports on its held-out
tenth. Data are decoded once (:func:`~bcsfl_vision.task.data.load_split`) and
partitioned with the example app's own partitioner, so the bench's skew is the grid's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bcsfl_vision.task.data import VALIDATION_FRACTION, dirichlet_partitions, load_split
from bcsfl_vision.task.models import MnistCNN

Weights = dict[str, np.ndarray]
"""A model's state as named float32 arrays, in the model's own order."""

BACKDOOR_TARGET = 0
"""The label a backdoored image is steered to."""

BACKDOOR_SHARE = 0.5
"""Share of a backdoor attacker's training batch stamped with the trigger."""


def logistic_regression() -> nn.Module:
    """Multinomial logistic regression on the 784 pixels (7,850 parameters)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))


def small_mlp() -> nn.Module:
    """Return a one-hidden-layer perceptron on the 784 pixels (79,510 parameters)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 100), nn.ReLU(), nn.Linear(100, 10))


TRIGGER_PARTS = 4
"""A distributed (DBA) trigger is the full trigger's four 2x2 quadrants, one per attacker."""


def stamp_trigger(images: torch.Tensor, part: int | None = None) -> torch.Tensor:
    """Return copies of ``images`` with the trigger stamped in the bottom-right corner.

    The trigger is a 4x4 bright square; ``part`` (0-3) stamps only that 2x2 quadrant,
    the piece one DBA attacker trains with (Xie et al., ICLR 2020). Success is always
    measured with the whole square.
    """
    stamped = images.clone()
    if part is None:
        stamped[:, :, -5:-1, -5:-1] = float(images.max())
    else:
        row, column = -5 + 2 * (part // 2), -5 + 2 * (part % 2)
        stamped[:, :, row : row + 2, column : column + 2] = float(images.max())
    return stamped


@dataclass(frozen=True)
class ClientShard:
    """One client's data: a training and a validation split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor

    @property
    def num_examples(self) -> int:
        """Number of training examples (what the client reports)."""
        return len(self.train_y)


@dataclass(frozen=True)
class Federation:
    """The clients' shards and the central test split."""

    shards: tuple[ClientShard, ...]
    test_x: torch.Tensor
    test_y: torch.Tensor


SMALLEST_PARTITION = 2
"""Fewest samples a bench client may hold when the app's minimum cannot be met.

At alpha 0.05 with 36 or more clients, Flower Datasets' partitioner cannot give every
client the app's 20 samples in its ten draws (the sealed set has such cells); a client
with a handful of samples is what that skew means, so the bench then asks for 2 (one to
train on, one to validate with)."""


def partition_indices(
    labels: np.ndarray, num_clients: int, alpha: float | None, seed: int
) -> list[np.ndarray]:
    """Return each client's sample indices: Dirichlet(alpha) label skew, or IID if None.

    The app's own partitioner first, so every cell it can split is split as the grid
    splits it; :data:`SMALLEST_PARTITION` only where it cannot.
    """
    if alpha is None:
        order = np.random.default_rng(seed).permutation(len(labels))
        return list(np.array_split(order, num_clients))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the partitioner's redraw notes
            return dirichlet_partitions(labels, num_clients, alpha, seed)
    except ValueError:
        return dirichlet_partitions(labels, num_clients, alpha, seed, SMALLEST_PARTITION)


def build_federation(
    data_dir: Path, num_clients: int, alpha: float | None, seed: int, max_train: int | None
) -> Federation:
    """Partition MNIST's training split into client shards (each capped at ``max_train``)."""
    train = load_split("mnist", data_dir, train=True)
    test = load_split("mnist", data_dir, train=False)
    shards = []
    for client, indices in enumerate(partition_indices(train.labels, num_clients, alpha, seed)):
        indices = np.random.default_rng([seed, client]).permutation(indices)
        num_val = max(1, int(len(indices) * VALIDATION_FRACTION))
        train_idx = indices[num_val:] if max_train is None else indices[num_val:][:max_train]
        shards.append(
            ClientShard(
                train_x=train.images[torch.from_numpy(train_idx)],
                train_y=torch.from_numpy(train.labels[train_idx]),
                val_x=train.images[torch.from_numpy(indices[:num_val])],
                val_y=torch.from_numpy(train.labels[indices[:num_val]]),
            )
        )
    return Federation(tuple(shards), test.images, torch.from_numpy(test.labels))


class Learner:
    """Train and evaluate a PyTorch model from and to :data:`Weights`.

    Parameters
    ----------
    net : nn.Module
        The model.
    learning_rate, batch_size, epochs
        Local SGD settings (the example app's defaults).
    """

    def __init__(
        self, net: nn.Module, learning_rate: float = 0.05, batch_size: int = 32, epochs: int = 1
    ) -> None:
        self.net = net
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.epochs = epochs

    def initial(self, seed: int) -> Weights:
        """Return freshly initialised weights (seeded)."""
        torch.manual_seed(seed)
        for layer in self.net.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        return self._weights()

    def train(
        self,
        weights: Weights,
        x: torch.Tensor,
        y: torch.Tensor,
        seed: int,
        backdoor: bool = False,
        part: int | None = None,
    ) -> Weights:
        """Return the weights after local SGD on ``(x, y)``.

        With ``backdoor`` a share of every batch is stamped with the trigger (its
        quadrant ``part`` only, for DBA) and relabelled :data:`BACKDOOR_TARGET`.
        """
        self._load(weights)
        optimiser = torch.optim.SGD(self.net.parameters(), lr=self.learning_rate)
        generator = torch.Generator().manual_seed(seed)
        self.net.train()
        for _ in range(self.epochs):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), self.batch_size):
                batch = order[start : start + self.batch_size]
                inputs, targets = x[batch], y[batch]
                if backdoor:
                    poisoned = max(1, int(len(batch) * BACKDOOR_SHARE))
                    inputs = torch.cat([stamp_trigger(inputs[:poisoned], part), inputs[poisoned:]])
                    targets = torch.cat(
                        [torch.full((poisoned,), BACKDOOR_TARGET), targets[poisoned:]]
                    )
                optimiser.zero_grad()
                nn.functional.cross_entropy(self.net(inputs), targets).backward()
                optimiser.step()
        return self._weights()

    @torch.no_grad()
    def loss(self, weights: Weights, x: torch.Tensor, y: torch.Tensor) -> float:
        """Return the mean cross-entropy of ``weights`` on ``(x, y)`` (inf if not finite)."""
        self._load(weights)
        self.net.eval()
        value = float(nn.functional.cross_entropy(self.net(x), y))
        return value if np.isfinite(value) else float("inf")

    @torch.no_grad()
    def predict(self, weights: Weights, x: torch.Tensor) -> np.ndarray:
        """Return the predicted labels of ``x``."""
        self._load(weights)
        self.net.eval()
        return np.concatenate(
            [self.net(x[i : i + 2048]).argmax(dim=1).numpy() for i in range(0, len(x), 2048)]
        )

    def _weights(self) -> Weights:
        return {k: v.detach().numpy().copy() for k, v in self.net.state_dict().items()}

    def _load(self, weights: Weights) -> None:
        self.net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()})


class NumpyLearner(Learner):
    """A small model trained by the same minibatch SGD, written in numpy.

    For small models PyTorch's per-step overhead is most of the training time; the same
    SGD on the cross-entropy in numpy is about 10x faster and lets the bench run whole
    matrices. Keys and shapes are the PyTorch model's, so evaluation stays PyTorch's.
    """

    def train(
        self,
        weights: Weights,
        x: torch.Tensor,
        y: torch.Tensor,
        seed: int,
        backdoor: bool = False,
        part: int | None = None,
    ) -> Weights:
        """Return the weights after local SGD (see :meth:`Learner.train`)."""
        params = {k: np.array(v, dtype=np.float32) for k, v in weights.items()}
        inputs, labels = x.reshape(len(y), -1).numpy(), y.numpy()
        stamped = stamp_trigger(x, part).reshape(len(y), -1).numpy() if backdoor else None
        order_rng = torch.Generator().manual_seed(seed)
        for _ in range(self.epochs):
            order = torch.randperm(len(labels), generator=order_rng).numpy()
            for start in range(0, len(labels), self.batch_size):
                batch = order[start : start + self.batch_size]
                xb, yb = inputs[batch], labels[batch]
                if stamped is not None:
                    poisoned = max(1, int(len(batch) * BACKDOOR_SHARE))
                    xb = np.concatenate([stamped[batch[:poisoned]], xb[poisoned:]])
                    yb = np.concatenate([np.full(poisoned, BACKDOOR_TARGET), yb[poisoned:]])
                self.step(params, xb, yb)
        return params

    def step(self, params: Weights, xb: np.ndarray, yb: np.ndarray) -> None:
        """Take one SGD step on the batch, in place."""
        raise NotImplementedError


def _softmax_gradient(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return d(mean cross-entropy)/d(logits)."""
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1.0
    return p / len(labels)


class LogisticRegressionLearner(NumpyLearner):
    """Multinomial logistic regression (7,850 parameters), same keys as ``nn.Linear``."""

    def __init__(self, learning_rate: float = 0.05, batch_size: int = 32, epochs: int = 1) -> None:
        super().__init__(logistic_regression(), learning_rate, batch_size, epochs)

    def step(self, params: Weights, xb: np.ndarray, yb: np.ndarray) -> None:
        """Take one SGD step on the batch, in place."""
        w, b = params["1.weight"], params["1.bias"]
        grad = _softmax_gradient(xb @ w.T + b, yb)
        w -= self.learning_rate * (grad.T @ xb)
        b -= self.learning_rate * grad.sum(axis=0)


class MlpLearner(NumpyLearner):
    """The small MLP of :func:`small_mlp` (784-100-10, ReLU), same keys."""

    def __init__(self, learning_rate: float = 0.05, batch_size: int = 32, epochs: int = 1) -> None:
        super().__init__(small_mlp(), learning_rate, batch_size, epochs)

    def step(self, params: Weights, xb: np.ndarray, yb: np.ndarray) -> None:
        """Take one SGD step on the batch, in place (backpropagation by hand)."""
        w1, b1, w2, b2 = (params[k] for k in ("1.weight", "1.bias", "3.weight", "3.bias"))
        hidden = np.maximum(xb @ w1.T + b1, 0.0)
        grad = _softmax_gradient(hidden @ w2.T + b2, yb)
        back = (grad @ w2) * (hidden > 0)
        w2 -= self.learning_rate * (grad.T @ hidden)
        b2 -= self.learning_rate * grad.sum(axis=0)
        w1 -= self.learning_rate * (back.T @ xb)
        b1 -= self.learning_rate * back.sum(axis=0)


LEARNERS: Mapping[str, Callable[[float, int, int], Learner]] = {
    "logreg": LogisticRegressionLearner,
    "mlp": MlpLearner,
    "cnn": lambda lr, batch, epochs: Learner(MnistCNN(), lr, batch, epochs),
}
"""The bench's models by name, built from ``(learning rate, batch size, epochs)``: a
linear model (rows per class), a small MLP and the app's CNN."""


def flatten(weights: Weights) -> np.ndarray:
    """Return the weights as one float64 vector, in key order."""
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in weights.values()])


def unflatten(vector: np.ndarray, like: Weights) -> Weights:
    """Return ``vector`` shaped as ``like`` (float32)."""
    out, offset = {}, 0
    for key, value in like.items():
        out[key] = vector[offset : offset + value.size].reshape(value.shape).astype(np.float32)
        offset += value.size
    return out
