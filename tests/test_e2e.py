"""End-to-end: the real `flwr run` of the example app, through the launcher.

No fakes: a local SuperLink, Ray-simulated SuperNodes, real MNIST. The launcher
reads the run's own results.json, because `flwr run --stream` exits 0 even when the
ServerApp fails; the second test proves that a broken federation is reported.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA_DIR
from rich.console import Console
from rich.progress import Progress

from bcsfl_vision.launch import FederationFailedError, run_federation


def test_two_round_federation_on_mnist_completes_above_chance(tmp_path):
    display = Progress(console=Console(file=io.StringIO()))
    run = run_federation(
        tmp_path / "run",
        num_supernodes=4,
        run_config={"num-server-rounds": 2},
        data_dir=DATA_DIR,
        timeout=900,
        stream=False,
        progress=display,
    )
    results = run.results
    assert results["status"] == "completed"
    assert set(results["rounds"]) == {"0", "1", "2"}
    for rnd in ("1", "2"):
        record = results["rounds"][rnd]
        assert len(record["clients"]) == 4  # every reply passed the checks
        assert record["outcome"] == "commit"
        assert record["chain"]["anchored"] is True
    assert results["final_test_accuracy"] > 0.5  # chance is 0.1
    peaks = [results["rounds"][rnd]["peak_rss_mb"] for rnd in ("0", "1", "2")]
    assert peaks == sorted(peaks) and peaks[0] > 100  # a peak never falls; torch alone > 100
    (followed,) = display.tasks  # the live display followed the run to its last round
    assert (followed.completed, followed.total) == (2, 2)
    assert followed.description.startswith("round 2: commit, acc ")
    assert followed.description.endswith(", anchored")


@pytest.mark.slow
def test_a_failing_federation_is_reported_as_failed(tmp_path):
    with pytest.raises(FederationFailedError, match="did not complete.*not found in data"):
        run_federation(
            tmp_path / "run",
            num_supernodes=2,
            run_config={"num-server-rounds": 1},
            data_dir=tmp_path / "no-mnist-here",
            timeout=600,
            stream=False,
        )


ATTACK_ROUNDS = 3
ATTACK_CONFIG = {"num-server-rounds": ATTACK_ROUNDS, "attacker-fraction": 0.3, "seed": 42}


@pytest.fixture(scope="module")
def attacked_runs(tmp_path_factory):
    """BCSFL and FedAvg on the same 10 clients, partitions and 30% label flippers."""
    root = tmp_path_factory.mktemp("attacked")
    runs = {}
    for strategy in ("bcsfl", "fedavg"):
        runs[strategy] = run_federation(
            root / strategy,
            num_supernodes=10,
            run_config={**ATTACK_CONFIG, "strategy": strategy},
            data_dir=DATA_DIR,
            timeout=1200,
            stream=False,
        )
    return runs


@pytest.mark.slow
def test_bcsfl_rejects_label_flippers_and_beats_fedavg(attacked_runs):
    bcsfl = attacked_runs["bcsfl"].results
    fedavg = attacked_runs["fedavg"].results
    assert len(bcsfl["attacker_partitions"]) == 3
    rounds = [bcsfl["rounds"][str(r)] for r in range(1, ATTACK_ROUNDS + 1)]
    # From a random initial model, flipped and honest updates look alike in round 1;
    # from round 2 on the flippers are rejected, and no honest client ever is.
    # Replies arrive in a different order each run (and, before committees were drawn
    # over addresses, node ids changed the draw), so two runs may commit different
    # candidates. Measured over 3 fresh clones of the 4-round version (rounds 2-4, 9
    # rounds): recall 1.0 in 8, 2/3 in 1 (one flipper let in, in round 4); precision 1.0
    # in all; final accuracy 0.957 to 0.969 against FedAvg's 0.749. So: at most one
    # round may let one flipper in.
    recalls = [r["attacker_recall"] for r in rounds[1:]]
    assert min(recalls) >= 2 / 3 and sum(recall < 1 for recall in recalls) <= 1
    assert all(r["attacker_precision"] in (None, 1.0) for r in rounds)
    assert all(r["outcome"] == "commit" for r in rounds)
    assert bcsfl["final_test_accuracy"] > fedavg["final_test_accuracy"]


@pytest.mark.slow
def test_the_launcher_writes_the_explorer_page_and_a_browser_shows_it_verified(
    attacked_runs, tmp_path
):
    from test_explorer import PAGE_LIMIT, browse

    run = attacked_runs["bcsfl"]
    assert attacked_runs["fedavg"].report is None  # FedAvg keeps no trail to show
    assert run.report is not None and run.report.verified
    assert run.report.path == run.output_dir / "report.html"
    assert run.report.size < PAGE_LIMIT
    seen = browse(run.report.path, tmp_path / "explorer.png")
    assert seen["plots"] == "ready", seen
    assert [(r["round"], r["verified"]) for r in seen["rounds"]] == [
        (n, True) for n in range(1, ATTACK_ROUNDS + 1)
    ]
    reasons = {
        reason
        for number in range(1, ATTACK_ROUNDS + 1)
        for reason in run.results["rounds"][str(number)]["rejected"].values()
    }
    assert seen["rejected_reason"]["visible"] and seen["rejected_reason"]["text"] in reasons
    assert seen["stake_lines"] == 10 == len(seen["stake_legend"])
    assert not seen["errors"] and not seen["requests"]


@pytest.mark.slow
def test_every_committed_round_is_anchored_and_verifiable(attacked_runs):
    run = attacked_runs["bcsfl"]
    rounds = [run.results["rounds"][str(r)] for r in range(1, ATTACK_ROUNDS + 1)]
    for record in rounds:
        if record["outcome"] == "commit":
            assert record["chain"]["anchored"] is True
            assert record["chain"]["certified_by"] == "miners"  # the example app mines
            stored = run.output_dir / "models" / (record["model_hash"][2:] + ".npz")
            assert stored.is_file()
        else:
            assert record["chain"]["anchored"] is False
    audit = [sys.executable, "-m", "bcsfl_flower.cli", "audit", "--run-dir", str(run.output_dir)]
    ok = subprocess.run([*audit, "verify"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    # The example app keeps every round replayable: each round recomputes, from its
    # stored updates and votes, to exactly what the chain anchored.
    replayed = subprocess.run([*audit, "replay"], capture_output=True, text=True)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    lines = replayed.stdout.splitlines()
    numbers = [str(r) for r in range(1, ATTACK_ROUNDS + 1)]
    assert [line.split(":")[1].split()[1] for line in lines] == numbers, lines

    # Change one stored update of round 2: its replay must now fail, naming the update.
    root = next(r for r in trail_rounds(run) if r["round"] == 2)["state_root"]
    statement = json.loads((run.output_dir / "models" / f"{root[2:]}.json").read_text())
    update = statement["replies"][0]["update_hash"]
    flip_one_byte(run.output_dir / "models" / f"{update[2:]}.npz")
    broken = subprocess.run([*audit, "replay", "2"], capture_output=True, text=True)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert broken.stdout.startswith("FAIL round 2, reply 0") and update[2:] in broken.stdout

    # Change one byte of the last anchored model: verification must now fail.
    victim = run.output_dir / "models" / (rounds[-1]["model_hash"][2:] + ".npz")
    flip_one_byte(victim)
    broken = subprocess.run([*audit, "verify"], capture_output=True, text=True)
    assert broken.returncode != 0
    assert victim.stem[:16] in broken.stdout + broken.stderr


def trail_rounds(run) -> list[dict]:
    """The rounds as ``bcsfl audit show`` reads them back from the chain."""
    audit = [sys.executable, "-m", "bcsfl_flower.cli", "audit", "--run-dir", str(run.output_dir)]
    shown = []
    for number in range(1, ATTACK_ROUNDS + 1):
        out = subprocess.run([*audit, "show", str(number)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        shown.append(json.loads(out.stdout))
    return shown


def flip_one_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_users_pytorch_app_runs_with_only_the_strategy_line_changed(tmp_path):
    app_dir = Path(__file__).parent / "dropin_app"
    server = (app_dir / "dropin_app" / "server_app.py").read_text()
    assert "strategy = BCSFL(fraction_train=fraction_train)" in server
    run = run_federation(
        tmp_path / "run",
        num_supernodes=5,
        app_dir=app_dir,
        run_config={"num-server-rounds": 2},
        data_dir=DATA_DIR,
        timeout=900,
        stream=False,
        require_results=False,
    )
    assert run.flower_status == "finished:completed"
    log = run.log_path.read_text()
    assert "Starting BCSFL strategy" in log
    # Its plain evaluate handler served as validator: both rounds were decided by the
    # committee's votes, and round 1 (from a random model) committed. The app seeds
    # nothing, as most apps do not, so a later round may roll back on its own merits
    # (seen once in CI: round 1 admitted 3 of 5 clients and round 2's mean was voted
    # down).
    decisions = [line for line in log.splitlines() if "consensus: " in line]
    assert len(decisions) == 2 and all("(accept votes: " in line for line in decisions)
    assert "consensus: commit" in decisions[0]


CKKS_CONFIG = {
    # Four rounds: by then both runs sit near 97%.
    "num-server-rounds": 4,
    "seed": 42,
    # Every client validates and mines. Committees are drawn with the previous model's
    # hash, which is a ciphertext's in one run and a plaintext's in the other; with the
    # whole federation on the committee both runs ask the same validators about the
    # same candidates (equal up to CKKS noise), so they make the same decisions.
    "num-validators": 5,
    "num-miners": 5,
}


def _decrypt_and_test(run, key_seed: int) -> float:
    """Act as a key holder after the run: decrypt the last anchored model, test it."""
    import torch
    from flwr.app import Array, ArrayRecord

    from bcsfl_flower.chain.model_store import ModelStore
    from bcsfl_flower.client.ckks_mod import key_seed_bytes
    from bcsfl_flower.privacy.ckks import decrypt_arrays, from_array_record
    from bcsfl_flower.privacy.ckks_keys import create_secret_context
    from bcsfl_vision.task.data import load_test_data
    from bcsfl_vision.task.models import MnistCNN
    from bcsfl_vision.task.training import test

    rounds = run.results["rounds"]
    final = rounds[str(max(int(r) for r in rounds))]["model_hash"]
    stored = ModelStore(run.output_dir / "models").load(final)
    record = ArrayRecord({key: Array(value) for key, value in stored.items()})
    secret = create_secret_context(seed=key_seed_bytes(key_seed))
    arrays = decrypt_arrays(from_array_record(record, secret), secret)
    model = MnistCNN()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    return test(model, load_test_data("mnist", DATA_DIR), torch.device("cpu"))[1]


@pytest.mark.slow
def test_ckks_federation_makes_the_plaintext_decisions_and_reaches_its_accuracy(tmp_path):
    plain = run_federation(
        tmp_path / "plain",
        num_supernodes=5,
        run_config=CKKS_CONFIG,
        data_dir=DATA_DIR,
        timeout=900,
        stream=False,
    )
    encrypted = run_federation(
        tmp_path / "ckks",
        num_supernodes=5,
        run_config={**CKKS_CONFIG, "ckks": True},
        data_dir=DATA_DIR,
        timeout=900,
        stream=False,
    )
    for number in range(1, 5):
        ours, theirs = (
            encrypted.results["rounds"][str(number)],
            plain.results["rounds"][str(number)],
        )
        assert ours["gram"]["digest"]  # the committee agreed on one Gram matrix
        # Screening and the round's outcome must match. Which of the quorum-reaching
        # candidates commits may not: the validators score models that differ by CKKS
        # noise, amplified by every round of SGD since, and a lead of about TIE_MARGIN
        # between the trusted mean and its core mean goes either way (measured in CI:
        # round 2 committed the core mean with CKKS and the trusted mean without).
        for key in ("outcome", "candidates", "rejected_partitions"):
            assert ours[key] == theirs[key], (number, key)
    # The server never evaluated: it cannot decrypt.
    assert "test_accuracy" not in encrypted.results["rounds"]["4"]
    accuracy = _decrypt_and_test(encrypted, key_seed=0)
    # Same decisions; what differs is CKKS's ~2e-7 noise in each aggregate (fresh
    # encryption randomness every run), amplified by four rounds of SGD. Measured
    # |difference|: 0.0019 here (0.9731 vs 0.9750) and 0.007 in an earlier 3-round
    # configuration with identical rejections. The 1.3-point gap that once failed this
    # test came from different committees and decisions, which the loop above excludes.
    assert abs(accuracy - plain.results["final_test_accuracy"]) <= 0.01
