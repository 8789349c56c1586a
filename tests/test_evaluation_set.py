"""The sealed evaluation set: the committed draw is the seed's draw, and it spans the ranges."""

from sim.robust.evaluation_set import (
    ALPHAS,
    EVALUATION_ATTACKS,
    EVALUATION_SEED,
    MODELS,
    SEALED_PATH,
    draw_configurations,
    load_configurations,
)


def test_the_committed_draw_is_the_draw_of_the_committed_seed():
    """Redrawing quietly (another seed, other ranges) would fail here."""
    assert load_configurations(SEALED_PATH) == draw_configurations(EVALUATION_SEED)


def test_the_draw_spans_every_model_skew_and_share_and_never_uses_tuning_seeds():
    drawn = load_configurations(SEALED_PATH)
    assert len(drawn) >= 40
    assert {c.model for c in drawn} == set(MODELS)
    assert {c.alpha for c in drawn} == set(ALPHAS)
    assert {c.share for c in drawn} == {0.0, 0.2, 0.3}
    assert all(c.attack in EVALUATION_ATTACKS for c in drawn if c.share > 0)
    assert all(c.attack == "clean" for c in drawn if c.share == 0)
    assert all(10 <= c.clients <= 50 and 0.01 <= c.learning_rate <= 0.2 for c in drawn)
    assert not {s for c in drawn for s in c.seeds} & {42, 43, 44}


def test_a_skew_the_apps_partitioner_cannot_meet_still_partitions_every_sample():
    """alpha 0.05 over 42 clients: no draw gives every client 20 samples (sealed e47)."""
    import numpy as np
    from conftest import DATA_DIR

    from bcsfl_vision.task.data import MIN_PARTITION_SIZE, load_split
    from sim.robust.tasks import SMALLEST_PARTITION, partition_indices

    labels = load_split("mnist", DATA_DIR, train=True).labels
    parts = partition_indices(labels, 42, 0.05, 839277)
    sizes = [len(p) for p in parts]
    assert SMALLEST_PARTITION <= min(sizes) < MIN_PARTITION_SIZE
    merged = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(merged, np.arange(len(labels)))  # disjoint, complete
