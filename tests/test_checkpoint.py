"""Resuming a stopped run from its directory: chain, last anchored model, stakes, round counter.

The federation is the notary tests' fake grid (validators answer with a loss, miners run
the real bcsfl mod with each partition's development key); the chain (embedded), the
contract, the model store and results.json are real.
"""

import numpy as np
import pytest
from chain_fixtures import running_anvil
from flwr.app import ConfigRecord
from test_notary import GLOBAL, TARGET, MiningGrid, signed_reply

from bcsfl_flower.audit.checkpoint import ResumeError, load_checkpoint
from bcsfl_flower.audit.verification import verify_trail
from bcsfl_flower.chain.audit import ChainManifest
from bcsfl_flower.chain.backends import JOURNAL_FILE
from bcsfl_flower.chain.keys import client_dev_account
from bcsfl_flower.packets import model_hash
from bcsfl_flower.round.notary import CHAIN_STATE_DIR, MANIFEST_FILE, RoundNotary
from bcsfl_flower.round.settings import StakePolicy
from bcsfl_flower.round.stakes import StakeChanges, settle
from bcsfl_flower.strategy import BCSFL
from bcsfl_vision.results import RunRecorder, load_results

PARTITIONS = range(6)


def open_notary(run_dir):
    return RoundNotary.open(
        "embedded", run_dir, GLOBAL, num_simulated_clients=6, require_signed=True
    )


def play(strategy, notary, rounds, arrays, node_offset=1, poisoned=(), broken=()):
    """Run ``rounds`` through the Strategy API; node ids are partition + node_offset.

    The ``poisoned`` partitions send the honest step reversed and tripled; the ``broken``
    ones send an update with a NaN, which a check rejects.
    """
    partition_of = {p + node_offset: p for p in PARTITIONS}
    grid = MiningGrid(partition_of)
    grid.get_node_ids = lambda: list(partition_of)
    for server_round in rounds:
        list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        rng = np.random.default_rng(server_round)
        current = arrays["w"].numpy()
        step = {p: (-3.0 if p in poisoned else 1.0) * 0.5 * (TARGET - current) for p in PARTITIONS}
        for partition in broken:
            step[partition] = np.where(np.arange(TARGET.size) == 0, np.nan, step[partition])
        replies = [
            signed_reply(
                node,
                partition,
                current + step[partition] + rng.normal(0, 0.05, TARGET.size),
                notary,
                server_round,
            )
            for node, partition in partition_of.items()
        ]
        arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays


@pytest.fixture
def stopped_run(tmp_path):
    """Three rounds of a run, stopped: the notary is closed and results say 'running'."""
    recorder = RunRecorder(tmp_path, {"num-server-rounds": 5})
    notary = open_notary(tmp_path)
    try:
        strategy = BCSFL(notary=notary, num_miners=4, round_sink=recorder.record)
        arrays = play(strategy, notary, (1, 2, 3), GLOBAL)
    finally:
        notary.close()
    return tmp_path, arrays, strategy.ledger.as_dict()


def checkpoint_of(run_dir, num_rounds=5):
    manifest = ChainManifest.load(run_dir / MANIFEST_FILE)
    notary = open_notary(run_dir)
    return notary, load_checkpoint(manifest, notary, load_results(run_dir), num_rounds)


def test_a_stopped_run_resumes_after_its_last_round_with_its_model_and_stakes(stopped_run):
    run_dir, arrays, stakes = stopped_run
    notary, checkpoint = checkpoint_of(run_dir)
    try:
        assert checkpoint.round == 3 and checkpoint.dropped_rounds == ()
        assert model_hash(checkpoint.arrays) == model_hash(arrays) == notary.trail.head()[1]
        by_address = {client_dev_account(p).address: stakes[str(p + 1)] for p in PARTITIONS}
        assert checkpoint.stakes == by_address
        # The federation restarts with new node ids; stakes follow the clients' keys.
        strategy = BCSFL(
            notary=notary, num_miners=4, start_round=4, initial_stakes=checkpoint.stakes
        )
        records = []
        strategy.round_sink = lambda rnd, rec: records.append((rnd, rec))
        play(strategy, notary, (4,), checkpoint.arrays, node_offset=101)
        ((number, record),) = records
        assert number == 4 and record["chain"]["anchored"] is True
        assert record["stakes_before"] == {str(p + 101): stakes[str(p + 1)] for p in PARTITIONS}
        assert record["previous_hash"] == "0x" + model_hash(arrays).hex()
        manifest = ChainManifest.load(run_dir / MANIFEST_FILE)
        report = verify_trail(notary.trail, manifest)
        assert report.ok and report.anchored == 4 and report.latest_round == 4
    finally:
        notary.close()


def test_resumed_stakes_are_the_anchored_settlement_and_an_edited_one_is_refused(tmp_path):
    """Slashes and rewards re-derived from the statements match the ledger to the bit."""
    recorder = RunRecorder(tmp_path, {"num-server-rounds": 6})
    notary = open_notary(tmp_path)
    try:
        strategy = BCSFL(notary=notary, num_miners=4, round_sink=recorder.record)
        play(strategy, notary, (1, 2, 3, 4), GLOBAL, poisoned=(5,))
        report = verify_trail(notary.trail, ChainManifest.load(tmp_path / MANIFEST_FILE))
        assert report.ok, [f.message for f in report.failures]
    finally:
        notary.close()
    ledger = strategy.ledger.as_dict()
    assert ledger["6"] < 0.5 < 1.0 < min(ledger[str(p + 1)] for p in range(5))  # slashed
    expected = {client_dev_account(p).address: ledger[str(p + 1)] for p in PARTITIONS}
    notary, checkpoint = checkpoint_of(tmp_path, num_rounds=6)
    notary.close()
    assert checkpoint.round == 4 and checkpoint.stakes == expected
    results = load_results(tmp_path)
    for record in results["rounds"].values():  # an operator's edit of the settled stakes
        for node in record.get("stakes", {}):
            record["stakes"][node] = 1.0
    (tmp_path / "results.json").write_text(__import__("json").dumps(results))
    # verify re-derives every settlement, so the edit is caught and nothing resumes from it
    with pytest.raises(ResumeError, match="results.json says node 1 settled at stake 1.0"):
        checkpoint_of(tmp_path, num_rounds=6)


def test_a_tampered_model_store_refuses_to_resume_naming_the_round(stopped_run):
    run_dir, _, _ = stopped_run
    notary = open_notary(run_dir)
    try:
        victim = notary.store.path(notary.trail.get_round(2))
    finally:
        notary.close()
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(ResumeError, match="does not verify at round 2"):
        notary, _ = checkpoint_of(run_dir)


def test_a_finished_run_or_one_without_rounds_left_refuses(stopped_run, tmp_path):
    run_dir, _, _ = stopped_run
    with pytest.raises(ResumeError, match="nothing is left to run"):
        checkpoint_of(run_dir, num_rounds=3)
    recorder = RunRecorder(run_dir, {}, load_results(run_dir))
    recorder.finish()
    with pytest.raises(ResumeError, match="the run finished"):
        checkpoint_of(run_dir)


def test_rounds_the_chain_lost_are_dropped_and_run_again(stopped_run):
    run_dir, _, _ = stopped_run
    journal = run_dir / CHAIN_STATE_DIR / JOURNAL_FILE
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:-1]))  # the chain lost round 3's anchor
    notary, checkpoint = checkpoint_of(run_dir)
    try:
        assert checkpoint.round == 2 and checkpoint.dropped_rounds == (3,)
        assert model_hash(checkpoint.arrays) == notary.trail.get_round(2)
    finally:
        notary.close()
    recorder = RunRecorder(run_dir, {}, load_results(run_dir))
    recorder.keep_through(checkpoint.round)
    assert sorted(load_results(run_dir)["rounds"], key=int) == ["1", "2"]
    assert load_results(run_dir)["status"] == "running"


def test_start_round_is_validated():
    with pytest.raises(ValueError, match="start_round"):
        BCSFL(start_round=0)


def test_a_client_that_reconnects_under_a_new_node_id_keeps_its_stake(tmp_path):
    """Node ids are not identities: stake follows the signer's address within a run."""
    notary = open_notary(tmp_path)
    try:
        records = {}
        strategy = BCSFL(
            notary=notary, num_miners=4, round_sink=lambda n, r: records.__setitem__(n, r)
        )
        arrays = play(strategy, notary, (1, 2), GLOBAL)
        before = strategy.ledger.as_dict()
        strategy.ledger.apply(
            settle(
                before,
                StakeChanges(slashed=("1",)),
                StakePolicy(reward=0.0, slash_fraction=0.5),
            )
        )
        slashed = strategy.ledger.stake("1")
        assert slashed < 1.0
        play(strategy, notary, (3,), arrays, node_offset=101)
        record = records[3]
        # partition 0 came back as node 101 with the stake it had as node 1
        assert record["stakes_before"]["101"] == pytest.approx(slashed)
        assert record["stakes_before"]["102"] == pytest.approx(before["2"])
    finally:
        notary.close()


def test_a_run_on_a_json_rpc_url_resumes_on_the_same_contract(tmp_path):
    """The URL backend: the contract lives on a chain the run does not own (a real anvil)."""
    with running_anvil() as url:
        recorder = RunRecorder(tmp_path, {"num-server-rounds": 5})
        notary = RoundNotary.open(url, tmp_path, GLOBAL, num_simulated_clients=6)
        try:
            contract = notary.trail.address
            strategy = BCSFL(notary=notary, num_miners=4, round_sink=recorder.record)
            arrays = play(strategy, notary, (1, 2), GLOBAL)
        finally:
            notary.close()
        manifest = ChainManifest.load(tmp_path / MANIFEST_FILE)
        notary = RoundNotary.open(url, tmp_path, GLOBAL, num_simulated_clients=6)
        try:
            checkpoint = load_checkpoint(manifest, notary, load_results(tmp_path), 5)
            assert notary.trail.address == contract  # attached, not redeployed
            assert checkpoint.round == 2
            assert model_hash(checkpoint.arrays) == model_hash(arrays)
            strategy = BCSFL(
                notary=notary, num_miners=4, start_round=3, initial_stakes=checkpoint.stakes
            )
            play(strategy, notary, (3,), checkpoint.arrays, node_offset=101)
            report = verify_trail(notary.trail, manifest)
            assert report.ok and report.anchored == 3 and report.latest_round == 3
        finally:
            notary.close()
