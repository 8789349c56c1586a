"""dropin-app: a Flower / PyTorch app."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dropin_app.task import Net, load_data
from dropin_app.task import test as test_fn
from dropin_app.task import train as train_fn

app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    device = torch.device("cpu")
    trainloader, _ = load_data(
        context.run_config["data-dir"],
        context.node_config["partition-id"],
        context.node_config["num-partitions"],
    )
    train_loss = train_fn(
        model, trainloader, context.run_config["local-epochs"], msg.content["config"]["lr"], device
    )
    model_record = ArrayRecord(model.state_dict())
    metrics = MetricRecord({"train_loss": train_loss, "num-examples": len(trainloader.dataset)})
    return Message(content=RecordDict({"arrays": model_record, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context):
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, valloader = load_data(
        context.run_config["data-dir"],
        context.node_config["partition-id"],
        context.node_config["num-partitions"],
    )
    eval_loss, eval_acc = test_fn(model, valloader, torch.device("cpu"))
    metrics = MetricRecord(
        {"eval_loss": eval_loss, "eval_acc": eval_acc, "num-examples": len(valloader.dataset)}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
