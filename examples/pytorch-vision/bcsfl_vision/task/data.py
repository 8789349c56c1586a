"""Datasets and non-IID partitions for the example federation.

The images come from torchvision's MNIST and CIFAR-10 classes, read from a local
data directory (no network access is assumed). Partitions are drawn with
flwr-datasets' :class:`~flwr_datasets.partitioner.DirichletPartitioner` over the
label column only, so the expensive image tensors are decoded once per process and
shared by every partition that process serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner
from torch.utils.data import DataLoader, TensorDataset
from torchvision import datasets as tv_datasets

from bcsfl_vision.task.attacks import choose_attackers, flip_labels

_NORMALISATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
_EXPECTED_FILES = {
    "mnist": "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz",
    "cifar10": "cifar-10-python.tar.gz or cifar-10-batches-py/",
}
MIN_PARTITION_SIZE = 20
"""Smallest partition the Dirichlet draw may produce: enough for a train and a validation split."""

VALIDATION_FRACTION = 0.1
"""Share of each partition held out for local evaluation (the validators' loss)."""


@dataclass(frozen=True)
class Split:
    """One split of a dataset as normalised image tensors and integer labels."""

    images: torch.Tensor
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@lru_cache(maxsize=4)
def load_split(dataset: str, data_dir: Path, train: bool) -> Split:
    """Load and normalise a whole split of ``dataset`` from ``data_dir``, once per process.

    Parameters
    ----------
    dataset : str
        "mnist" or "cifar10".
    data_dir : Path
        Root directory in torchvision's layout (``<data_dir>/MNIST/raw/*.gz`` or
        ``<data_dir>/cifar-10-batches-py``).
    train : bool
        Whether to load the training split (else the test split).

    Raises
    ------
    FileNotFoundError
        If the files are not in ``data_dir``; the message says which files to put where.
    """
    try:
        if dataset == "mnist":
            # download=True only extracts the md5-checked archives already present.
            raw = tv_datasets.MNIST(str(data_dir), train=train, download=True)
            images = raw.data.unsqueeze(1).float().div_(255.0)
            labels = raw.targets.numpy().astype(np.int64)
        elif dataset == "cifar10":
            raw = tv_datasets.CIFAR10(str(data_dir), train=train, download=True)
            images = torch.from_numpy(raw.data).permute(0, 3, 1, 2).float().div_(255.0)
            labels = np.asarray(raw.targets, dtype=np.int64)
        else:
            raise ValueError(f"unknown dataset {dataset!r}; expected 'mnist' or 'cifar10'")
    except (RuntimeError, OSError) as err:
        raise FileNotFoundError(
            f"{dataset} not found in data directory {data_dir}: expected "
            f"{_EXPECTED_FILES[dataset]} there (set run config 'data-dir' or "
            f"$BCSFL_DATA_DIR); loading failed with: {err}"
        ) from err
    mean, std = _NORMALISATION[dataset]
    images = (images - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    return Split(images=images.contiguous(), labels=labels)


def dirichlet_partitions(
    labels: np.ndarray,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_partition_size: int = MIN_PARTITION_SIZE,
) -> list[np.ndarray]:
    """Split sample indices into label-skewed partitions with a Dirichlet(alpha) prior.

    Smaller ``alpha`` means more skew (alpha=0.5 is the common "moderately non-IID"
    setting). Every partition has at least ``min_partition_size`` samples (default
    :data:`MIN_PARTITION_SIZE`): the partitioner redraws until that holds, and fails
    loudly if it cannot.

    Returns
    -------
    list[np.ndarray]
        ``num_partitions`` arrays of sample indices into ``labels``; disjoint.
    """
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    table = Dataset.from_dict({"label": np.asarray(labels), "index": np.arange(len(labels))})
    partitioner = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min_partition_size,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    partitioner.dataset = table
    return [
        np.asarray(partitioner.load_partition(pid)["index"], dtype=np.int64)
        for pid in range(num_partitions)
    ]


@lru_cache(maxsize=8)
def _cached_partitions(
    dataset: str, data_dir: Path, num_partitions: int, alpha: float, seed: int
) -> tuple[np.ndarray, ...]:
    labels = load_split(dataset, data_dir, train=True).labels
    return tuple(dirichlet_partitions(labels, num_partitions, alpha, seed))


@dataclass(frozen=True)
class ClientData:
    """A client's local data: loaders for training and for validation (its loss votes)."""

    train: DataLoader
    validation: DataLoader
    is_attacker: bool


def load_client_data(
    dataset: str,
    data_dir: Path,
    partition_id: int,
    num_partitions: int,
    *,
    alpha: float,
    seed: int,
    batch_size: int,
    attacker_fraction: float = 0.0,
) -> ClientData:
    """Return the train/validation loaders of one partition, poisoned if it is an attacker.

    The partition's samples are split ``1 - VALIDATION_FRACTION`` / ``VALIDATION_FRACTION``
    with a seed derived from ``seed`` and ``partition_id``. An attacker partition
    (chosen by :func:`~bcsfl_vision.task.attacks.choose_attackers`) has all its labels
    flipped, validation included: a malicious validator judges candidates by its own
    poisoned data.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    split = load_split(dataset, data_dir, train=True)
    indices = _cached_partitions(dataset, data_dir, num_partitions, alpha, seed)[partition_id]
    rng = np.random.default_rng([seed, partition_id])
    indices = rng.permutation(indices)
    num_val = max(1, int(len(indices) * VALIDATION_FRACTION))
    is_attacker = partition_id in choose_attackers(num_partitions, attacker_fraction, seed)
    labels = split.labels[indices]
    if is_attacker:
        labels = flip_labels(labels, num_classes=10)
    images = split.images[torch.from_numpy(indices)]
    targets = torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(seed * 100_003 + partition_id)
    train = DataLoader(
        TensorDataset(images[num_val:], targets[num_val:]),
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
    )
    validation = DataLoader(
        TensorDataset(images[:num_val], targets[:num_val]), batch_size=256, shuffle=False
    )
    return ClientData(train=train, validation=validation, is_attacker=is_attacker)


def load_test_data(dataset: str, data_dir: Path, batch_size: int = 512) -> DataLoader:
    """Return a loader over the whole test split, for central evaluation."""
    split = load_split(dataset, data_dir, train=False)
    return DataLoader(
        TensorDataset(split.images, torch.from_numpy(split.labels)),
        batch_size=batch_size,
        shuffle=False,
    )
