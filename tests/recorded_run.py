"""One small recorded run: three rounds through the Strategy API, as an audit sees it.

Round 1 commits, round 2 (every client poisoned) rolls back, round 3 commits; with a real
chain, contract, model store, the miners' mod and the ``RunRecorder``'s ``results.json``.
The trail fuzzer mutates it and the explorer page's tests draw it.
"""

from __future__ import annotations

from pathlib import Path

from flwr.supercore.task_identity import TaskIdentity


def record_three_rounds(run_dir: Path, broken: tuple[int, ...] = ()) -> Path:
    """Record the run into ``run_dir`` and return it.

    The ``broken`` partitions send a NaN in round 3, so a check rejects them there.
    """
    from test_checkpoint import PARTITIONS, open_notary, play
    from test_notary import GLOBAL

    from bcsfl_flower.strategy import BCSFL
    from bcsfl_vision.results import RunRecorder

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    recorder = RunRecorder(run_dir, {"num-server-rounds": 3})
    notary = open_notary(run_dir)
    try:
        strategy = BCSFL(notary=notary, num_miners=4, round_sink=recorder.record)
        arrays = play(strategy, notary, (1,), GLOBAL)
        arrays = play(strategy, notary, (2,), arrays, poisoned=tuple(PARTITIONS))
        play(strategy, notary, (3,), arrays, broken=broken)
        recorder.finish()
    finally:
        notary.close()
    return run_dir
