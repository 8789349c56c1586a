"""Example ClientApp: trains and evaluates the task model on one data partition.

It is an ordinary Flower PyTorch ClientApp; nothing in it is specific to BCSFL. The
strategy's validators reach it through the standard ``evaluate`` handler, which
reports the loss on the client's own held-out data.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from bcsfl_flower.config import RunSettings
from bcsfl_flower.task.data import ClientData, load_client_data
from bcsfl_flower.task.models import build_model
from bcsfl_flower.task.training import test, train

app = ClientApp()


def _client_data(context: Context, settings: RunSettings) -> ClientData:
    return load_client_data(
        settings.dataset,
        settings.resolved_data_dir(),
        int(context.node_config["partition-id"]),
        int(context.node_config["num-partitions"]),
        alpha=settings.dirichlet_alpha,
        seed=settings.seed,
        batch_size=settings.batch_size,
        attacker_fraction=settings.attacker_fraction,
    )


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received model on the local partition and return the new weights."""
    settings = RunSettings.from_run_config(context.run_config)
    model = build_model(settings.dataset)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    data = _client_data(context, settings)
    config = msg.content["config"]
    train_loss = train(
        model,
        data.train,
        epochs=int(config.get("local-epochs", settings.local_epochs)),
        learning_rate=float(config.get("learning-rate", settings.learning_rate)),
        device=_device(),
    )
    metrics = MetricRecord({"train_loss": train_loss, "num-examples": len(data.train.dataset)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


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
