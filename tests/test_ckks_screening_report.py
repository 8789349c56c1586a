"""The CKKS-versus-plaintext screening comparison (the runs themselves are real federations)."""

from sim.ckks_screening import compare, comparison_table, rejected_by_round


def _results(rejected):
    rounds = {"0": {"round": 0}}
    for number, partitions in enumerate(rejected, start=1):
        rounds[str(number)] = {"round": number}
        if partitions is not None:
            rounds[str(number)]["rejected_partitions"] = list(partitions)
    return {"rounds": rounds}


def test_rounds_match_only_when_both_screens_rejected_the_same_partitions():
    plaintext = _results([[3, 1], [], [1, 3], [2]])
    encrypted = _results([[1, 3], [], [1], None])
    assert rejected_by_round(plaintext) == {1: (1, 3), 2: (), 3: (1, 3), 4: (2,)}
    rows = compare(plaintext, encrypted, 4)
    assert [row.same for row in rows] == [True, True, False, False]
    table = comparison_table(rows, [1, 3])
    assert "| 2 | none | none | yes |" in table and "| 4 | 2 | — | no |" in table
    assert table.endswith("Same decision in 2 of 4 rounds.")
