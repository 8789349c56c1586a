"""sklearn-app: logistic regression on a small tabular task, as in Flower's example.

Flower's example loads Iris from the Hub with flwr-datasets; this one makes a
comparable 3-class, 4-feature task with scikit-learn, so it runs offline.
"""

import numpy as np
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

N_CLASSES = 3
N_FEATURES = 4


def get_model(penalty: str, local_epochs: int) -> LogisticRegression:
    return LogisticRegression(penalty=penalty, max_iter=local_epochs, warm_start=True)


def get_model_params(model: LogisticRegression) -> list[np.ndarray]:
    return [model.coef_, model.intercept_]


def set_model_params(model: LogisticRegression, params: list[np.ndarray]) -> None:
    model.coef_ = params[0]
    model.intercept_ = params[1]


def set_initial_params(model: LogisticRegression) -> None:
    model.classes_ = np.arange(N_CLASSES)
    model.coef_ = np.zeros((N_CLASSES, N_FEATURES))
    model.intercept_ = np.zeros((N_CLASSES,))


def load_data(partition_id: int, num_partitions: int):
    """Return this partition's (X_train, y_train, X_test, y_test)."""
    features, labels = make_classification(
        n_samples=1200,
        n_features=N_FEATURES,
        n_informative=3,
        n_redundant=0,
        n_classes=N_CLASSES,
        random_state=42,
    )
    part = np.array_split(np.arange(len(labels)), num_partitions)[partition_id]
    x, y = features[part], labels[part]
    split = int(0.8 * len(y))
    return x[:split], y[:split], x[split:], y[split:]
