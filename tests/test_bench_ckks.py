"""sim/bench_ckks.py's round timings: read from a federation's results, first round left out."""

from sim.bench_ckks import round_timings


def test_round_timings_skip_the_first_round_and_rounds_without_timing():
    timing = {"training_s": 5.0, "decision_s": 1.0, "committee_s": 0.5, "anchoring_s": 0.1}
    results = {
        "rounds": {
            "0": {"test_accuracy": 0.1},
            "1": {"timing": {**timing, "training_s": 30.0}},  # loads data and keys
            "10": {"timing": {**timing, "decision_s": 9.0}},
            "2": {"timing": timing},
            "3": {"outcome": "rollback"},
        }
    }
    assert round_timings(results) == [timing, {**timing, "decision_s": 9.0}]
