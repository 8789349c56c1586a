"""sklearn-app: a Flower / scikit-learn app."""

from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from bcsfl_flower.round.notary import RoundNotary
from bcsfl_flower.strategy import BCSFL
from sklearn_app.task import get_model, get_model_params, set_initial_params

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    num_rounds: int = context.run_config["num-server-rounds"]
    model = get_model(context.run_config["penalty"], context.run_config["local-epochs"])
    set_initial_params(model)
    arrays = ArrayRecord(get_model_params(model))

    # was: strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0)
    notary = RoundNotary.open(
        "embedded",
        Path(context.run_config["output-dir"]),
        arrays,
        num_simulated_clients=len(list(grid.get_node_ids())),
        keep_updates=True,
        require_signed=False,  # its ClientApp runs no bcsfl mod, so its replies are unsigned
    )
    strategy = BCSFL(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        loss_metric_key="test_logloss",
        notary=notary,
    )
    try:
        result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=num_rounds)
    finally:
        notary.close()
    print(f"final arrays: {len(result.arrays)} arrays")
