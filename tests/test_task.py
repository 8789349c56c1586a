"""Partitions, the label-flipping attack, models and data loading."""

import numpy as np
import pytest
import torch
from conftest import DATA_DIR

from bcsfl_vision.task.attacks import choose_attackers, flip_labels
from bcsfl_vision.task.data import (
    MIN_PARTITION_SIZE,
    dirichlet_partitions,
    load_client_data,
    load_split,
)
from bcsfl_vision.task.models import MnistCNN, build_model, cifar10_resnet

LABELS = np.repeat(np.arange(10), 500)  # 5000 balanced labels


def label_histograms(parts, labels=LABELS):
    return np.stack([np.bincount(labels[p], minlength=10) for p in parts])


def test_partitions_cover_every_sample_once_and_none_is_small():
    parts = dirichlet_partitions(LABELS, num_partitions=10, alpha=0.5, seed=1)
    assert len(parts) == 10
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS)
    assert len(np.unique(joined)) == len(LABELS)
    assert min(len(p) for p in parts) >= MIN_PARTITION_SIZE


def test_partitions_are_deterministic_per_seed():
    first = dirichlet_partitions(LABELS, 8, 0.5, seed=3)
    again = dirichlet_partitions(LABELS, 8, 0.5, seed=3)
    other = dirichlet_partitions(LABELS, 8, 0.5, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_smaller_alpha_gives_more_label_skew():
    def mean_dominant_share(alpha):
        hist = label_histograms(dirichlet_partitions(LABELS, 10, alpha, seed=0))
        return float(np.mean(hist.max(axis=1) / hist.sum(axis=1)))

    skewed, mild, iid_like = (
        mean_dominant_share(0.1),
        mean_dominant_share(0.5),
        mean_dominant_share(100),
    )
    assert skewed > mild > iid_like
    assert iid_like < 0.2  # close to the balanced 0.1
    assert skewed > 0.5


def test_choose_attackers_is_deterministic_and_sized():
    chosen = choose_attackers(10, 0.3, seed=42)
    assert len(chosen) == 3 and chosen <= set(range(10))
    assert chosen == choose_attackers(10, 0.3, seed=42)
    assert choose_attackers(10, 0.0, seed=42) == frozenset()
    assert any(choose_attackers(10, 0.3, seed=s) != chosen for s in range(5))
    with pytest.raises(ValueError, match="attacker fraction"):
        choose_attackers(10, 1.0, seed=0)


def test_flip_labels_is_the_papers_mapping():
    np.testing.assert_array_equal(flip_labels(np.arange(10)), np.arange(10)[::-1])
    with pytest.raises(ValueError, match="labels must lie"):
        flip_labels(np.array([10]))


def _labels(data):
    return np.concatenate(
        [t.numpy() for loader in (data.train, data.validation) for t in [loader.dataset.tensors[1]]]
    )


def test_only_chosen_partitions_are_flipped_on_real_mnist():
    attackers = choose_attackers(5, 0.4, seed=7)
    for pid in range(5):
        kwargs = {"alpha": 0.5, "seed": 7, "batch_size": 32}
        clean = load_client_data("mnist", DATA_DIR, pid, 5, attacker_fraction=0.0, **kwargs)
        poisoned = load_client_data("mnist", DATA_DIR, pid, 5, attacker_fraction=0.4, **kwargs)
        assert poisoned.is_attacker == (pid in attackers)
        if pid in attackers:
            np.testing.assert_array_equal(_labels(poisoned), 9 - _labels(clean))
        else:
            np.testing.assert_array_equal(_labels(poisoned), _labels(clean))


def test_mnist_split_is_normalised_and_complete():
    train = load_split("mnist", DATA_DIR, True)
    assert train.images.shape == (60000, 1, 28, 28)
    assert abs(float(train.images.mean())) < 0.05
    assert np.bincount(train.labels).tolist()[0] == 5923  # official MNIST count of zeros


def test_missing_data_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_split("mnist", tmp_path, True)


def test_models_produce_logits():
    assert MnistCNN()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert cifar10_resnet()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in MnistCNN().parameters()) < 25_000
    with pytest.raises(ValueError, match="unknown dataset"):
        build_model("imagenet")
