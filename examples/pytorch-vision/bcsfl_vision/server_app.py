"""ServerApp of the example federation: BCSFL (or a baseline) on MNIST or CIFAR-10."""

from __future__ import annotations

import json
import resource
from collections.abc import Iterable
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.superlink.grid import InMemoryGrid

from bcsfl_flower.audit.checkpoint import ResumeError, load_checkpoint
from bcsfl_flower.chain.audit import ChainManifest
from bcsfl_flower.chain.keys import client_dev_account, development_addresses, load_keystore
from bcsfl_flower.chain.retry import RetryPolicy
from bcsfl_flower.protocol import DP_EPSILON_KEY
from bcsfl_flower.round.notary import MANIFEST_FILE, RoundNotary
from bcsfl_flower.strategy import BCSFL
from bcsfl_vision.app_metrics import PARTITION_ID_METRIC, aggregate_train_metrics
from bcsfl_vision.baselines import build_baseline
from bcsfl_vision.config import RunSettings
from bcsfl_vision.results import RunRecorder, load_results
from bcsfl_vision.task.attacks import choose_attackers, rejection_scores
from bcsfl_vision.task.data import load_test_data
from bcsfl_vision.task.models import build_model
from bcsfl_vision.task.training import evaluate_confusion

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the federation and keep ``results.json`` up to date."""
    settings = RunSettings.from_run_config(context.run_config)
    output_dir = settings.resolved_output_dir()
    previous = previous_results(output_dir) if settings.resume else None
    recorder = RunRecorder(output_dir, context.run_config, previous)
    log(INFO, "bcsfl-flower: results file %s", recorder.path)
    try:
        _run(grid, settings, recorder, previous)
    except BaseException as err:
        recorder.fail(err)
        raise
    recorder.finish()
    log(INFO, "bcsfl-flower: run completed; results in %s", recorder.path)


def previous_results(output_dir: Path) -> dict[str, Any]:
    """Return the results of the run to resume in ``output_dir``.

    Raises
    ------
    ResumeError
        If there is no run there, or it finished (its results stay untouched).
    """
    try:
        results = load_results(output_dir)
    except (OSError, ValueError) as err:
        raise ResumeError(f"no run to resume in {output_dir}: {err}") from err
    if results.get("status") == "completed":
        raise ResumeError(f"the run in {output_dir} finished; there is nothing to resume")
    return results


def _run(
    grid: Grid,
    settings: RunSettings,
    recorder: RunRecorder,
    previous: dict[str, Any] | None,
) -> None:
    torch.manual_seed(settings.seed)
    model = build_model(settings.dataset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    test_loader = load_test_data(settings.dataset, settings.resolved_data_dir())
    num_partitions = len(list(grid.get_node_ids()))
    attackers = choose_attackers(num_partitions, settings.attacker_fraction, settings.seed)
    recorder.set("attacker_partitions", sorted(attackers))

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, confusion = evaluate_confusion(model, test_loader, device)
        accuracy = float(confusion.trace() / confusion.sum())
        recorder.record(
            server_round,
            {
                "test_loss": loss,
                "test_accuracy": accuracy,
                "confusion": confusion.tolist(),
                "peak_rss_mb": peak_rss_mb(),
            },
        )
        return MetricRecord({"test_loss": loss, "test_accuracy": accuracy})

    def record_round(server_round: int, record: dict[str, Any]) -> None:
        record.update(_attack_scores(record, set(attackers)))
        recorder.record(server_round, record)

    initial_arrays = ArrayRecord(model.state_dict())
    manifest = None
    if previous is not None:  # read before the notary rewrites it
        try:
            manifest = ChainManifest.load(recorder.output_dir / MANIFEST_FILE)
        except (OSError, ValueError) as err:
            raise ResumeError(f"the run has no readable audit trail to resume: {err}") from err
    notary = open_notary(
        settings,
        recorder.output_dir,
        initial_arrays,
        num_partitions,
        simulated=isinstance(grid, InMemoryGrid),
    )
    try:
        stakes = attacker_stakes(settings, attackers)
        start_round = 1
        if previous is not None and notary is not None and manifest is not None:
            checkpoint = load_checkpoint(manifest, notary, previous, settings.num_server_rounds)
            recorder.keep_through(checkpoint.round)
            stakes.update(checkpoint.stakes)
            initial_arrays, start_round = checkpoint.arrays, checkpoint.round + 1
            log(INFO, "bcsfl-flower: resuming with round %d", start_round)
        strategy = build_strategy(
            settings, record_round, num_partitions, notary, stakes, start_round
        )
        result = strategy.start(
            grid=grid,
            initial_arrays=initial_arrays,
            num_rounds=settings.num_server_rounds,
            timeout=settings.round_timeout,
            train_config=ConfigRecord(
                {"learning-rate": settings.learning_rate, "local-epochs": settings.local_epochs}
            ),
            # The server cannot decrypt a CKKS model, so it cannot evaluate it.
            evaluate_fn=None if settings.ckks else evaluate,
        )
    finally:
        if notary is not None:
            notary.close()
    if settings.strategy != "bcsfl":  # BCSFL records its rounds itself, epsilon included
        for server_round, metrics in result.train_metrics_clientapp.items():
            if DP_EPSILON_KEY in metrics:
                recorder.record(server_round, {"max_dp_epsilon": float(metrics[DP_EPSILON_KEY])})
    final = result.evaluate_metrics_serverapp.get(settings.num_server_rounds)
    if final is not None:
        recorder.set("final_test_accuracy", final["test_accuracy"])


def peak_rss_mb() -> float:
    """Return the peak resident memory of this process so far, in MiB.

    Recorded with every evaluation, so a run shows how the ServerApp's memory grows
    with rounds and clients. In simulation this process also drives Ray; the
    ClientApps run in Ray's worker processes and are not counted.
    """
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def open_notary(
    settings: RunSettings,
    output_dir: Path,
    initial_arrays: ArrayRecord,
    num_partitions: int,
    *,
    simulated: bool = True,
) -> RoundNotary | None:
    """Open the audit trail named by run config ``chain`` (None for ``"none"`` or baselines).

    In simulation the development accounts of every partition are registered (the keys
    the bcsfl mod signs with); ``client-registry`` adds a deployment's client addresses.
    On a shared chain (a URL), ``operator-keystore`` is the account that deploys the
    contract and sends every transaction; without it, the PUBLIC development key does.

    Raises
    ------
    ValueError
        On Flower's deployment engine (``simulated`` false) without ``client-registry``:
        the development keys are public, so registering them would let any node sign as
        any client; or when the registry lists a development account.
    """
    if settings.chain == "none" or settings.strategy != "bcsfl":
        return None
    if not simulated and not settings.client_registry:
        raise ValueError(
            "client-registry is unset on Flower's deployment engine: the PUBLIC development "
            "keys are for simulation only. Set client-registry to a JSON list of the nodes' "
            "own addresses (one keystore per SuperNode, bcsfl-keystore in its node config)"
        )
    registered: list[str] = []
    bindings: dict[str, int] = {}
    if settings.client_registry:
        registered, bindings = read_client_registry(Path(settings.client_registry))
        if public := development_addresses(registered):
            raise ValueError(
                f"client-registry lists public development accounts {public}: their keys "
                "are public, so any node could sign as them; register the nodes' own keys"
            )
    operator = None
    if settings.operator_keystore:
        operator = load_keystore(
            settings.operator_keystore,
            password_file=settings.operator_keystore_password_file or None,
        )
    return RoundNotary.open(
        settings.chain,
        output_dir,
        initial_arrays,
        operator=operator,
        num_simulated_clients=0 if registered else num_partitions,
        registered=registered,
        node_bindings=bindings,
        retry=RetryPolicy(
            attempts=settings.chain_retry_attempts,
            base_delay_s=settings.chain_retry_base_delay,
        ),
        packet_window_s=settings.packet_window_s,
        require_signed=settings.require_signed,
        keep_updates=settings.replayable_rounds,
    )


def read_client_registry(path: Path) -> tuple[list[str], dict[str, int]]:
    """Return a deployment's client addresses and the node id each is bound to.

    The registry is a JSON list of addresses, or an object mapping each address to the
    node id ``flwr supernode register`` printed for that SuperNode's key: with SuperNode
    authentication, a bound address is accepted only from its own node.

    Raises
    ------
    ValueError
        If the file is neither, or a node id is not a positive integer.
    """
    raw = json.loads(path.read_text())
    if isinstance(raw, list) and all(isinstance(a, str) for a in raw):
        return list(raw), {}
    if isinstance(raw, dict):
        bad = {
            a: n for a, n in raw.items() if isinstance(n, bool) or not isinstance(n, int) or n < 1
        }
        if bad:
            raise ValueError(f"client-registry binds addresses to invalid node ids {bad}")
        return list(raw), dict(raw)
    raise ValueError(
        "client-registry must be a JSON list of client addresses, or an object mapping "
        "each address to its SuperNode's node id"
    )


def attacker_stakes(settings: RunSettings, attackers: Iterable[int]) -> dict[str, float]:
    """Return the simulated attackers' initial stakes, keyed by their development address.

    Run config ``attacker-stake`` is each attacker's initial stake relative to an honest
    client's 1.0 (simulation only: the threat model where attackers bought less stake).
    A client proves its address with its signed packet, so the stake follows the key,
    not the node id.
    """
    if settings.attacker_stake == 1.0:
        return {}
    return {client_dev_account(p).address: settings.attacker_stake for p in attackers}


def build_strategy(
    settings: RunSettings,
    round_sink: Any,
    num_nodes: int,
    notary: RoundNotary | None = None,
    initial_stakes: dict[str, float] | None = None,
    start_round: int = 1,
) -> Strategy:
    """Return the strategy named by run config ``strategy``, configured from ``settings``.

    Federated evaluation is off (``fraction_evaluate=0``): the global model is
    evaluated centrally, and BCSFL's validators already evaluate every candidate.
    """
    if settings.strategy != "bcsfl":
        return build_baseline(
            settings.strategy,
            num_nodes=num_nodes,
            attacker_fraction=settings.attacker_fraction,
            fraction_train=settings.fraction_train,
        )
    return BCSFL(
        settings.round_settings(),
        initial_stakes=initial_stakes,
        notary=notary,
        start_round=start_round,
        round_sink=round_sink,
        fraction_train=settings.fraction_train,
        fraction_evaluate=0.0,
        train_metrics_aggr_fn=aggregate_train_metrics,
    )


def _attack_scores(record: dict[str, Any], attackers: set[int]) -> dict[str, Any]:
    """Score the round's rejections against the simulated attackers, by partition id."""
    partition_of = {
        node: int(metrics[PARTITION_ID_METRIC])
        for node, metrics in record.get("clients", {}).items()
        if PARTITION_ID_METRIC in metrics
    }
    rejected = {partition_of[n] for n in record.get("rejected", {}) if n in partition_of}
    scores = rejection_scores(rejected, attackers, set(partition_of.values()))
    scores["rejected_partitions"] = sorted(rejected)
    return scores
