"""``bcsfl audit``: list, show, verify-model and verify on a run's output directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from chain_fixtures import (
    GENESIS,
    approval_for,
    certificate,
    clients,
    rollback_certificate,
    stated_round,
    toy_model,
)

from bcsfl_flower.chain.audit import AuditTrail
from bcsfl_flower.chain.backends import JOURNAL_FILE, connect
from bcsfl_flower.chain.model_store import ModelStore
from bcsfl_flower.cli import main
from bcsfl_flower.packets import model_hash
from bcsfl_flower.round.conclusion import stated_rollback_reason
from bcsfl_flower.round.settlement import stated_settlement
from bcsfl_flower.round.statement import RoundStatement


def make_run(run_dir: Path, backend: str = "embedded") -> ModelStore:
    """A finished run: rounds 1 and 3 anchored, round 2 rolled back, models stored.

    Each round stores its state statement, whose draw seats all four miners; three of
    them certify every round, the rollback too.
    """
    miners = clients(4)
    store = ModelStore(run_dir / "models")
    store.save(toy_model(0.0))
    with connect(backend, run_dir / "chain") as connection:
        trail = AuditTrail.open(connection, GENESIS)
        trail.register_clients({m.address: 10 for m in miners})
        stakes = None
        for round_number in (1, 2, 3):
            _, head = trail.head()
            committed = None if round_number == 2 else model_hash(toy_model(float(round_number)))
            statement, drawn = stated_round(
                store, round_number, head, miners, trail.domain, committed, stakes
            )
            state_root = statement.digest()
            stakes = stated_settlement(statement, committed is not None, trail.domain).after
            assert sorted(m.address for m in drawn) == sorted(m.address for m in miners)
            if round_number == 2:
                reason = stated_rollback_reason(statement, trail.domain)
                certified = rollback_certificate(
                    trail, 2, miners, state_root, signers=miners[:3], reason=reason
                )
                trail.record_rollback(certified)
                continue
            store.save(toy_model(float(round_number)))
            approval = approval_for(trail, round_number, float(round_number), miners, state_root)
            trail.anchor_round(certificate(trail, approval, miners, miners[:3]))
        trail.write_manifest(run_dir / "chain.json", store.root)
    return store


def audit(run_dir: Path, *args: str) -> int:
    return main(["audit", "--run-dir", str(run_dir), *args])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("run")
    make_run(directory)
    return directory


def test_verify_passes_on_an_untouched_run(run_dir, capsys):
    assert audit(run_dir, "verify") == 0
    out = capsys.readouterr().out
    assert "audit trail OK: 2 anchored and 1 rolled-back rounds" in out
    assert "FAIL" not in out
    # the location may also follow the command, or name the manifest itself
    assert main(["audit", "verify", "--run-dir", str(run_dir)]) == 0
    assert main(["audit", "verify", "--manifest", str(run_dir / "chain.json")]) == 0


def test_list_and_show(run_dir, capsys):
    assert audit(run_dir, "list") == 0
    out = capsys.readouterr().out
    assert "rolled back" in out and "rollback: no candidates" in out
    assert f"0x{model_hash(toy_model(3.0)).hex()[:16]}" in out
    assert "3/4" in out
    assert audit(run_dir, "show", "3") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model_hash"] == "0x" + model_hash(toy_model(3.0)).hex()
    assert shown["previous_hash"] == "0x" + model_hash(toy_model(1.0)).hex()
    store = ModelStore(run_dir / "models")
    assert RoundStatement.from_bytes(store.load_document(shown["state_root"])).round == 3
    assert len(shown["signatures"]) == 3 and shown["operator_signed"] is False
    assert audit(run_dir, "show", "2") == 0
    rolled = json.loads(capsys.readouterr().out)
    assert rolled["kept_model_hash"] == "0x" + model_hash(toy_model(1.0)).hex()
    assert RoundStatement.from_bytes(store.load_document(rolled["state_root"])).round == 2
    assert rolled["reason"] == "rollback: no candidates"
    assert len(rolled["signatures"]) == 3 and rolled["operator_signed"] is False
    assert audit(run_dir, "show", "0") == 0
    assert json.loads(capsys.readouterr().out) == {"round": 0, "genesis_hash": "0x" + GENESIS.hex()}
    assert audit(run_dir, "show", "7") == 1


def test_verify_model_against_its_anchor(run_dir, tmp_path, capsys):
    store = ModelStore(run_dir / "models")
    file = store.path(model_hash(toy_model(1.0)))
    assert audit(run_dir, "verify-model", str(file), "--round", "1") == 0
    assert audit(run_dir, "verify-model", str(file)) == 0
    assert "round(s) [1]" in capsys.readouterr().out
    assert audit(run_dir, "verify-model", str(file), "--round", "3") == 1
    capsys.readouterr()
    # a rolled-back round and one that never ran anchor no model: a mismatch, not a crash
    assert audit(run_dir, "verify-model", str(file), "--round", "2") == 1
    assert "FAIL round 2" in capsys.readouterr().err
    assert audit(run_dir, "verify-model", str(file), "--round", "7") == 1
    assert "FAIL round 7" in capsys.readouterr().err
    stranger = tmp_path / "other.npz"
    np.savez(stranger, w=np.ones(3))
    assert audit(run_dir, "verify-model", str(stranger)) == 1
    assert "is not anchored in any round" in capsys.readouterr().err


def test_verify_fails_after_one_byte_of_one_stored_model_changes(tmp_path, capsys):
    store = make_run(tmp_path)
    assert audit(tmp_path, "verify") == 0
    path = store.path(model_hash(toy_model(3.0)))
    data = bytearray(path.read_bytes())
    offset = data.find(np.float32(3.0).tobytes())
    data[offset + 3] ^= 0x01  # 3.0 -> another float, same length
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert audit(tmp_path, "verify") == 1
    out = capsys.readouterr().out
    assert f"FAIL round 3: model store: {path}" in out
    assert "audit trail INVALID: 1 of" in out


def test_verify_fails_when_a_model_is_missing(tmp_path, capsys):
    store = make_run(tmp_path)
    store.path(model_hash(toy_model(1.0))).unlink()
    assert audit(tmp_path, "verify") == 1
    assert "FAIL round 1: model store: no model" in capsys.readouterr().out


def test_verify_fails_on_a_journal_that_was_cut_short(tmp_path, capsys):
    make_run(tmp_path)
    journal = tmp_path / "chain" / JOURNAL_FILE
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:-1]))  # drop the round-3 anchor
    assert audit(tmp_path, "verify") == 1
    out = capsys.readouterr().out
    assert "the trail ends at round 2, but chain.json recorded round 3" in out
    assert audit(tmp_path, "show", "3") == 1


def test_a_recorded_head_catches_a_truncation_that_chain_json_was_edited_to_hide(tmp_path, capsys):
    make_run(tmp_path)
    assert audit(tmp_path, "head") == 0
    head = json.loads(capsys.readouterr().out)
    assert (head["latest_round"], head["round"]) == (3, 3)
    assert head["model_hash"] == "0x" + model_hash(toy_model(3.0)).hex()
    assert head["genesis_hash"] == "0x" + GENESIS.hex()
    recorded = tmp_path.parent / "head.json"  # kept outside the run directory
    recorded.write_text(json.dumps(head))
    assert audit(tmp_path, "verify", "--head", str(recorded)) == 0
    # Drop the round-3 anchor, and make chain.json agree: no key is needed for either.
    journal = tmp_path / "chain" / JOURNAL_FILE
    journal.write_text("".join(journal.read_text().splitlines(keepends=True)[:-1]))
    manifest = json.loads((tmp_path / "chain.json").read_text())
    manifest["latest_round"] = 2
    manifest["head"] = {"round": 1, "model_hash": "0x" + model_hash(toy_model(1.0)).hex()}
    (tmp_path / "chain.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert audit(tmp_path, "verify") == 0  # what the directory says is consistent
    assert audit(tmp_path, "verify", "--head", str(recorded)) == 1
    out = capsys.readouterr().out
    assert "round 3: the trail ends at round 2, but the recorded head had reached round 3" in out
    assert f"round 3: the recorded head anchored {head['model_hash']}, the trail has no" in out


def test_a_recorded_head_of_another_trail_is_refused(tmp_path, capsys):
    make_run(tmp_path)
    recorded = tmp_path.parent / "other-head.json"
    other = {
        "chain_id": 1,
        "contract": "0x" + "11" * 20,
        "genesis_hash": "0x" + "22" * 32,
        "run": "0x" + "44" * 32,
        "latest_round": 1,
        "round": 1,
        "model_hash": "0x" + "33" * 32,
    }
    recorded.write_text(json.dumps(other))
    assert audit(tmp_path, "verify", "--head", str(recorded)) == 1
    out = capsys.readouterr().out
    assert "the recorded head is on chain 1" in out and "the recorded head is on genesis" in out
    assert "the recorded head is on run 0x4444" in out
    recorded.write_text("{}")
    assert audit(tmp_path, "verify", "--head", str(recorded)) == 2
    assert "lacks the field 'chain_id'" in capsys.readouterr().err


def test_anvil_run_is_verified_from_its_state_dump_when_the_auditor_chooses_anvil(tmp_path, capsys):
    make_run(tmp_path, backend="anvil")
    assert json.loads((tmp_path / "chain.json").read_text())["backend"] == "anvil"
    # The directory's claim alone does not make the auditor start anvil.
    assert audit(tmp_path, "verify") == 1
    err = capsys.readouterr().err
    assert "claims backend 'anvil'" in err and "the auditor chose 'embedded'" in err
    assert audit(tmp_path, "--chain", "anvil", "verify") == 0
    assert "audit trail OK" in capsys.readouterr().out


def test_missing_manifest_is_a_usage_error(tmp_path, capsys):
    assert audit(tmp_path, "list") == 2
    assert "chain.json does not exist" in capsys.readouterr().err


def test_console_entry_point_exits_non_zero_on_mismatch(run_dir, tmp_path):
    stranger = tmp_path / "other.npz"
    np.savez(stranger, w=np.ones(3))
    command = [sys.executable, "-m", "bcsfl_flower.cli", "audit", "--run-dir", str(run_dir)]
    ok = subprocess.run([*command, "verify"], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run(
        [*command, "verify-model", str(stranger)], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 1


NODES = ("0", "1", "2", "3")


def write_results(run_dir: Path, **changes) -> None:
    """The run's results.json as the ServerApp writes it, with round 3's ``changes``."""
    rounds = {
        str(number): {
            "round": number,
            "outcome": "rollback" if number == 2 else "commit",
            "model_hash": "0x" + model_hash(toy_model(1.0 if number == 2 else number)).hex(),
            "rejected": {},
            # round 1's commit rewarded every client (0.05); the rollback changed nothing
            "stakes_before": dict.fromkeys(NODES, 10.0 if number == 1 else 10.05),
            "stakes": dict.fromkeys(NODES, 10.05 + 0.05 if number == 3 else 10.05),
            "accuracy": 0.9,
        }
        for number in (1, 2, 3)
    }
    rounds["3"].update(changes)
    document = {"status": "completed", "final_test_accuracy": 0.9, "rounds": rounds}
    (run_dir / "results.json").write_text(json.dumps(document))


@pytest.mark.parametrize(
    ("changes", "failure"),
    [
        ({"rejected": {"2": "screening: forged"}}, "round 3: results.json says rejected"),
        ({"stakes_before": {"0": 0.01}}, "round 3: results.json says node 0 held stake 0.01"),
        ({"outcome": "rollback"}, "round 3: results.json says outcome 'rollback'"),
        # the table round 3 settled (verify re-derives it, to the bit): two rewards of 0.05
        ({"stakes": {"0": 10.05 + 0.05, "1": 50.0}}, "round 3: results.json says node 1 settled"),
        ({"stakes": {"7": 1.0}}, "round 3: results.json says node 7 settled at stake 1.0, the"),
    ],
)
def test_verify_fails_when_results_json_contradicts_the_trail(tmp_path, capsys, changes, failure):
    make_run(tmp_path)
    write_results(tmp_path)
    assert audit(tmp_path, "verify") == 0
    write_results(tmp_path, **changes)
    capsys.readouterr()
    assert audit(tmp_path, "verify") == 1
    assert f"FAIL {failure}" in capsys.readouterr().out


def test_a_settled_stake_table_that_matches_the_trail_verifies(tmp_path, capsys):
    make_run(tmp_path)
    write_results(tmp_path, stakes=dict.fromkeys(NODES, 10.05 + 0.05))
    assert audit(tmp_path, "verify") == 0, capsys.readouterr().out
    # a table that leaves a client out is not the trail's
    write_results(tmp_path, stakes=dict.fromkeys(NODES[:3], 10.05 + 0.05))
    capsys.readouterr()
    assert audit(tmp_path, "verify") == 1
    assert "round 3: results.json's stakes leaves out" in capsys.readouterr().out


def test_show_labels_what_the_trail_does_not_hold(tmp_path, capsys):
    make_run(tmp_path)
    write_results(tmp_path, accuracy=0.99)  # an edited accuracy verifies: nothing holds it
    assert audit(tmp_path, "verify") == 0
    capsys.readouterr()
    assert audit(tmp_path, "show", "3") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["unverified"]["accuracy"] == 0.99
    assert shown["unverified"]["run"]["final_test_accuracy"] == 0.9  # run-level: unverified
    assert "operator's word" in shown["unverified"]["note"]
    assert "outcome" not in shown["unverified"]
    assert shown["statement"]["decision"]["committed"] is True
    assert shown["statement"]["decision"]["candidate"] == "trusted-mean"
    assert shown["statement"]["rejected"] == {}
