"""Example ClientApp: trains and evaluates the task model on one data partition.

Its handlers are an ordinary Flower PyTorch ClientApp's; the strategy's validators
reach it through the standard ``evaluate`` handler, which reports the loss on the
client's own held-out data. The one BCS-FL line is ``bcsfl_ckks_client_app()`` in
place of ``ClientApp()``: it adds the bcsfl mod, which signs train replies and serves
the miners' duty, and the CKKS mod, which (only when the run is in CKKS mode) decrypts
incoming models and encrypts the outgoing update, so the handlers below only ever see
plaintext.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from bcsfl_flower.client.ckks_app import bcsfl_ckks_client_app
from bcsfl_flower.protocol import DP_EPSILON_KEY
from bcsfl_vision.app_metrics import PARTITION_ID_METRIC
from bcsfl_vision.config import RunSettings
from bcsfl_vision.task.attacks import UPDATE_ATTACKS, choose_attackers, poison_update
from bcsfl_vision.task.data import ClientData, load_client_data
from bcsfl_vision.task.models import build_model
from bcsfl_vision.task.training import test, train

app = bcsfl_ckks_client_app()

SILENT_MARGIN_S = 5.0
"""How long after the round's timeout a ``silent`` client answers."""

DP_STATE_KEY = "bcsfl.dp-accountant"
"""Key in ``context.state`` of the DP accountant's history."""


def _client_data(context: Context, settings: RunSettings) -> ClientData:
    return load_client_data(
        settings.dataset,
        settings.resolved_data_dir(),
        int(context.node_config["partition-id"]),
        int(context.node_config["num-partitions"]),
        alpha=settings.dirichlet_alpha,
        seed=settings.seed,
        batch_size=settings.batch_size,
        # Only the label-flip attack poisons the data; update attacks act after training.
        attacker_fraction=settings.attacker_fraction if settings.attack == "label-flip" else 0.0,
    )


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received model on the local partition and return the new weights."""
    settings = RunSettings.from_run_config(context.run_config)
    _inject_fault(msg, context, settings)
    model = build_model(settings.dataset)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    data = _client_data(context, settings)
    config = msg.content["config"]
    epochs = int(config.get("local-epochs", settings.local_epochs))
    learning_rate = float(config.get("learning-rate", settings.learning_rate))
    extra_metrics: dict[str, float] = {}
    if settings.dp:
        train_loss, extra_metrics[DP_EPSILON_KEY] = _train_private(
            model, data, context, settings, epochs, learning_rate, int(config["server-round"])
        )
    else:
        train_loss = train(
            model, data.train, epochs=epochs, learning_rate=learning_rate, device=_device()
        )
    metrics = MetricRecord(
        {
            "train_loss": train_loss,
            "num-examples": len(data.train.dataset),
            # Lets the simulation score attacker detection; never averaged.
            PARTITION_ID_METRIC: int(context.node_config["partition-id"]),
            **extra_metrics,
        }
    )
    arrays = ArrayRecord(model.state_dict())
    if _runs_update_attack(context, settings):
        arrays = _poisoned(msg.content["arrays"], arrays, settings, int(config["server-round"]))
    content = RecordDict({"arrays": arrays, "metrics": metrics})
    return Message(content=content, reply_to=msg)


def _train_private(
    model: torch.nn.Module,
    data: ClientData,
    context: Context,
    settings: RunSettings,
    epochs: int,
    learning_rate: float,
    server_round: int,
) -> tuple[float, float]:
    """Train with Opacus DP-SGD; return the loss and the cumulative epsilon.

    The accountant's history lives in ``context.state`` between rounds (the ClientApp
    itself is rebuilt for every message), so epsilon accumulates over the run. With
    ``dp-target-epsilon`` the round is refused before any data is touched if the rest
    of the run would overspend it.
    """
    # Imported here: importing Opacus configures the root logger, which would double
    # every log line of clients that do not train with DP.
    from bcsfl_flower.privacy.dp import DPConfig, make_private

    state = context.state.config_records.get(DP_STATE_KEY)
    if settings.dp_target_epsilon > 0:
        _check_budget(settings, data, epochs, server_round, state)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9)
    dp_config = DPConfig(
        noise_multiplier=settings.dp_noise_multiplier,
        max_grad_norm=settings.dp_max_grad_norm,
        delta=settings.dp_delta,
    )
    with make_private(
        model,
        optimizer,
        data.train,
        dp_config,
        accountant_state=dict(state) if state is not None else None,
    ) as private:
        loss = train(
            private.model,
            private.data_loader,
            epochs=epochs,
            learning_rate=learning_rate,
            device=_device(),
            optimizer=private.optimizer,
        )
        context.state[DP_STATE_KEY] = ConfigRecord(private.accountant_state())
        return loss, float(private.epsilon())


def _check_budget(
    settings: RunSettings,
    data: ClientData,
    epochs: int,
    server_round: int,
    state: ConfigRecord | None,
) -> None:
    """Refuse this round if the rest of the run would take this client past its budget.

    Opacus samples each batch with rate ``1 / batches per epoch``; this client is
    assumed to train in every remaining round, which is the worst case.
    """
    from bcsfl_flower.privacy.budget import PlannedTraining, check_budget

    batches = len(data.train)
    plan = PlannedTraining(
        noise_multiplier=settings.dp_noise_multiplier,
        sample_rate=1.0 / batches,
        steps_per_round=epochs * batches,
        rounds=max(settings.num_server_rounds - server_round + 1, 1),
    )
    check_budget(settings.dp_target_epsilon, settings.dp_delta, plan, state)


def _inject_fault(msg: Message, context: Context, settings: RunSettings) -> None:
    """Simulate a broken client (run config ``fault``; simulation and tests only).

    ``raise``: the ClientApp raises in ``train`` (Flower sends an error reply).
    ``silent``: it answers only after the round's timeout, as a crashed or cut-off node
    that never answers in time would.
    """
    if settings.fault == "none":
        return
    server_round = int(msg.content["config"].get("server-round", 0))
    partition = int(context.node_config["partition-id"])
    if partition != settings.fault_partition or server_round != settings.fault_round:
        return
    if settings.fault == "raise":
        raise RuntimeError(f"injected fault: partition {partition} fails in round {server_round}")
    time.sleep(settings.round_timeout + SILENT_MARGIN_S)


def _runs_update_attack(context: Context, settings: RunSettings) -> bool:
    if settings.attack not in UPDATE_ATTACKS:
        return False
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    return partition_id in choose_attackers(
        num_partitions, settings.attacker_fraction, settings.seed
    )


def _poisoned(
    global_arrays: ArrayRecord, trained: ArrayRecord, settings: RunSettings, server_round: int
) -> ArrayRecord:
    """Rewrite the update ``w_k - w_t`` with the configured attack (simulation only)."""
    before = {key: global_arrays[key].numpy() for key in trained}
    update = {key: trained[key].numpy() - before[key] for key in trained}
    rng = np.random.default_rng([settings.seed, server_round])
    poisoned = poison_update(update, settings.attack, settings.attack_scale, rng)
    return ArrayRecord({key: Array(before[key] + poisoned[key]) for key in trained})


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the local validation split."""
    settings = RunSettings.from_run_config(context.run_config)
    model = build_model(settings.dataset)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    data = _client_data(context, settings)
    loss, accuracy = test(model, data.validation, _device())
    metrics = MetricRecord(
        {"eval_loss": loss, "eval_acc": accuracy, "num-examples": len(data.validation.dataset)}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
