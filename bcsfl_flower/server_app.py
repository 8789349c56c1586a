"""ServerApp of the example federation: BCSFL on MNIST (or CIFAR-10) with central evaluation."""

from __future__ import annotations

from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from bcsfl_flower.config import RunSettings
from bcsfl_flower.results import RunRecorder
from bcsfl_flower.strategy import BCSFL
from bcsfl_flower.task.data import load_test_data
from bcsfl_flower.task.models import build_model
from bcsfl_flower.task.training import test

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation and keep ``results.json`` in the output directory up to date."""
    settings = RunSettings.from_run_config(context.run_config)
    recorder = RunRecorder(settings.resolved_output_dir(), context.run_config)
    log(INFO, "bcsfl-flower: results file %s", recorder.path)
    try:
        _run(grid, settings, recorder)
    except BaseException as err:
        recorder.fail(err)
        raise
    recorder.finish()
    log(INFO, "bcsfl-flower: run completed; results in %s", recorder.path)


def _run(grid: Grid, settings: RunSettings, recorder: RunRecorder) -> None:
    torch.manual_seed(settings.seed)
    model = build_model(settings.dataset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    test_loader = load_test_data(settings.dataset, settings.resolved_data_dir())

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = test(model, test_loader, device)
        recorder.record(server_round, {"test_loss": loss, "test_accuracy": accuracy})
        return MetricRecord({"test_loss": loss, "test_accuracy": accuracy})

    strategy = BCSFL(
        fraction_train=settings.fraction_train,
        fraction_evaluate=0.0,
        round_sink=recorder.record,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=settings.num_server_rounds,
        train_config=ConfigRecord(
            {"learning-rate": settings.learning_rate, "local-epochs": settings.local_epochs}
        ),
        evaluate_fn=evaluate,
    )
    final = result.evaluate_metrics_serverapp.get(settings.num_server_rounds)
    if final is not None:
        recorder.set("final_test_accuracy", final["test_accuracy"])
