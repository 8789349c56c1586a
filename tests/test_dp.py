import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bcsfl_flower.privacy.dp import (
    DPConfig,
    check_opacus_compatible,
    epsilon_from_state,
    make_private,
)


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def _loader(seed: int = 0, n: int = 64, batch_size: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)


def _train(model, optimizer, loader) -> None:
    model.train()
    for images, labels in loader:
        if len(labels) == 0:
            continue
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()


def _flat(state_dict) -> np.ndarray:
    return np.concatenate([v.detach().numpy().ravel() for v in state_dict.values()])


def _round(initial, config, accountant_state, seed):
    """One simulated Flower round: fresh model, optimizer and engine, as a new ClientApp."""
    torch.manual_seed(seed)
    model = _cnn()
    model.load_state_dict(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    private = make_private(
        model,
        optimizer,
        _loader(seed),
        config,
        accountant_state=accountant_state,
        noise_generator=torch.Generator().manual_seed(seed),
    )
    with private:
        _train(private.model, private.optimizer, private.data_loader)
    return model, private


def test_dp_training_changes_the_update_against_plain_training():
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in _cnn().state_dict().items()}

    torch.manual_seed(1)
    plain = _cnn()
    plain.load_state_dict(initial)
    _train(plain, torch.optim.SGD(plain.parameters(), lr=0.1), _loader(1))

    private_model, _ = _round(initial, DPConfig(1.0, 1.0), None, seed=1)

    start = _flat(initial)
    plain_update = _flat(plain.state_dict()) - start
    dp_update = _flat(private_model.state_dict()) - start
    assert np.linalg.norm(plain_update) > 0
    assert np.linalg.norm(dp_update) > 0
    assert np.linalg.norm(dp_update - plain_update) > 1e-3 * np.linalg.norm(plain_update)


def test_same_seed_dp_training_is_reproducible():
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in _cnn().state_dict().items()}
    first, _ = _round(initial, DPConfig(1.0, 1.0), None, seed=3)
    second, _ = _round(initial, DPConfig(1.0, 1.0), None, seed=3)
    np.testing.assert_array_equal(_flat(first.state_dict()), _flat(second.state_dict()))


def test_epsilon_is_finite_and_grows_across_rounds_with_restored_state():
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in _cnn().state_dict().items()}
    config = DPConfig(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5)
    stored = None  # what a ClientApp keeps in context.state between rounds
    epsilons = []
    for server_round in range(3):
        state = None if stored is None else dict(stored)
        model, private = _round(initial, config, state, seed=10 + server_round)
        epsilons.append(private.epsilon())
        stored = ConfigRecord(private.accountant_state())
        initial = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(math.isfinite(e) and e > 0 for e in epsilons)
    assert epsilons[0] < epsilons[1] < epsilons[2]
    # the history after 3 rounds covers 3 x 4 steps (64 examples, batch 16)
    assert sum(stored["steps"]) == 12
    assert epsilon_from_state(dict(stored), 1e-5) == pytest.approx(epsilons[-1])


def test_without_restored_state_epsilon_does_not_accumulate():
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in _cnn().state_dict().items()}
    config = DPConfig(1.1, 1.0)
    _, first = _round(initial, config, None, seed=1)
    _, second = _round(initial, config, None, seed=2)
    _, continued = _round(initial, config, first.accountant_state(), seed=2)
    assert second.epsilon() == pytest.approx(first.epsilon())
    assert continued.epsilon() > first.epsilon()


def test_state_dict_keys_are_the_original_ones():
    model = _cnn()
    keys = list(model.state_dict())
    private = make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), _loader(), DPConfig(1.0, 1.0)
    )
    assert private.model is model
    _train(private.model, private.optimizer, private.data_loader)
    assert list(private.model.state_dict()) == keys
    assert not any(k.startswith("_module.") for k in private.model.state_dict())
    private.close()
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    private.close()  # idempotent


def test_epsilon_is_zero_before_any_step_and_depends_on_delta():
    model = _cnn()
    private = make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), _loader(), DPConfig(1.0, 1.0)
    )
    assert private.epsilon() == 0.0
    _train(private.model, private.optimizer, private.data_loader)
    assert private.epsilon(1e-3) < private.epsilon(1e-7)
    with pytest.raises(ValueError, match="delta"):
        private.epsilon(0.0)
    private.close()


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"noise_multiplier": 0.0, "max_grad_norm": 1.0}, ValueError, "noise_multiplier"),
        ({"noise_multiplier": -1.0, "max_grad_norm": 1.0}, ValueError, "noise_multiplier"),
        ({"noise_multiplier": float("nan"), "max_grad_norm": 1.0}, ValueError, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, ValueError, "max_grad_norm"),
        ({"noise_multiplier": 1.0, "max_grad_norm": float("inf")}, ValueError, "max_grad_norm"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 0.0}, ValueError, "delta"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1.0}, ValueError, "delta"),
        ({"noise_multiplier": "1", "max_grad_norm": 1.0}, TypeError, "noise_multiplier"),
        ({"noise_multiplier": True, "max_grad_norm": 1.0}, TypeError, "noise_multiplier"),
        (
            {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "poisson_sampling": 1},
            TypeError,
            "poisson_sampling",
        ),
    ],
)
def test_invalid_config_is_rejected(kwargs, error, name):
    with pytest.raises(error, match=name):
        DPConfig(**kwargs)


def test_incompatible_model_gets_a_clear_error():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ValueError, match="BatchNorm"):
        check_opacus_compatible(model)
    with pytest.raises(ValueError, match="ModuleValidator.fix"):
        make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), _loader(), DPConfig(1.0, 1.0)
        )


def test_make_private_rejects_a_non_config():
    model = _cnn()
    with pytest.raises(TypeError, match="DPConfig"):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), _loader(), {"x": 1})


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"noise_multipliers": [1.0], "sample_rates": [0.1]}, "missing"),
        ({"noise_multipliers": [1.0], "sample_rates": [0.1], "steps": [1, 2]}, "length"),
        ({"noise_multipliers": [0.0], "sample_rates": [0.1], "steps": [1]}, "noise_multipliers"),
        ({"noise_multipliers": [1.0], "sample_rates": [1.5], "steps": [1]}, "sample_rates"),
        ({"noise_multipliers": [1.0], "sample_rates": [0.1], "steps": [0]}, "steps"),
        ({"noise_multipliers": [1.0], "sample_rates": [0.1], "steps": [1.5]}, "steps"),
    ],
)
def test_malformed_accountant_state_is_rejected(state, match):
    model = _cnn()
    with pytest.raises(ValueError, match=match):
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            _loader(),
            DPConfig(1.0, 1.0),
            accountant_state=state,
        )
