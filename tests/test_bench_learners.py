"""The bench's numpy learners take exactly PyTorch's SGD steps, only faster."""

import numpy as np
import pytest
import torch

from sim.robust.tasks import (
    Learner,
    LogisticRegressionLearner,
    MlpLearner,
    logistic_regression,
    small_mlp,
)


@pytest.mark.parametrize(
    ("fast", "net"), [(MlpLearner, small_mlp), (LogisticRegressionLearner, logistic_regression)]
)
def test_a_numpy_learner_matches_pytorch_sgd_step_for_step(fast, net):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((96, 1, 28, 28), generator=generator)
    y = torch.randint(0, 10, (96,), generator=generator)
    ours = fast(0.05, 16, 2)
    start = ours.initial(1)
    reference = Learner(net(), 0.05, 16, 2).train(start, x, y, seed=5)
    trained = ours.train(start, x, y, seed=5)
    assert list(trained) == list(reference)
    for key in reference:
        np.testing.assert_allclose(trained[key], reference[key], atol=1e-6)
    assert not np.allclose(trained[next(iter(trained))], start[next(iter(start))])
