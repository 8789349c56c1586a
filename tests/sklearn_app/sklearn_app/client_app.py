"""sklearn-app: a Flower / scikit-learn app."""

import warnings

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from sklearn.metrics import log_loss

from bcsfl_flower.client.mod import bcsfl_client_app
from sklearn_app.task import (
    get_model,
    get_model_params,
    load_data,
    set_initial_params,
    set_model_params,
)

app = bcsfl_client_app()  # was: app = ClientApp()


def _model(msg: Message, context: Context):
    model = get_model(context.run_config["penalty"], context.run_config["local-epochs"])
    set_initial_params(model)
    set_model_params(model, msg.content["arrays"].to_numpy_ndarrays())
    return model


def _data(context: Context):
    return load_data(
        int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    model = _model(msg, context)
    x_train, y_train, _, _ = _data(context)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter is small on purpose
        model.fit(x_train, y_train)
    train_logloss = log_loss(y_train, model.predict_proba(x_train), labels=model.classes_)
    metrics = {"num-examples": len(x_train), "train_logloss": train_logloss}
    content = RecordDict(
        {"arrays": ArrayRecord(get_model_params(model)), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = _model(msg, context)
    _, _, x_test, y_test = _data(context)
    loss = log_loss(y_test, model.predict_proba(x_test), labels=model.classes_)
    accuracy = model.score(x_test, y_test)
    metrics = {"num-examples": len(x_test), "test_logloss": loss, "accuracy": accuracy}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
