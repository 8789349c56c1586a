"""The experiment grid: which federations to run, and the presets that pick them.

One :class:`ExperimentSpec` is one real Flower simulation run. Its run config is
everything the app needs beyond the defaults of ``[tool.flwr.app.config]``, and its
:attr:`~ExperimentSpec.run_id` names the run's directory, so a spec and its results
find each other again after a restart.

The grid follows the BCS-FL paper's robustness study and extends it: label flipping
(``y -> 9 - y`` on all of an attacker's data) at 0, 10, 30 and 50% attackers, and the
model-poisoning attacks sign-flip, Gaussian noise and scaling at 30%, for every
strategy. The clean federation (0% attackers) is run once and is the reference line
of every attack.

Attack strengths (run config ``attack-scale``, see
:func:`bcsfl_flower.task.attacks.poison_update`), chosen so that each attack breaks
plain FedAvg at 30% attackers rather than merely slowing it down:

- ``sign-flip`` 4.0: ``d' = -4 d``; the mean update ``0.7 d - 0.3 * 4 d = -0.5 d``
  points against the honest direction;
- ``gaussian-noise`` 10.0: ``d' ~ N(0, (10 std(d))^2)``, pure noise ten times the
  size of an honest update;
- ``scale`` 10.0: ``d' = 10 d``; the attackers' share of the mean is ``3 / 3.7``;
- ``label-flip``: the scale is unused (1.0).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DATASETS = ("mnist", "cifar10")

ATTACK_SCALES: Mapping[str, float] = {
    "label-flip": 1.0,
    "sign-flip": 4.0,
    "gaussian-noise": 10.0,
    "scale": 10.0,
}
"""``attack-scale`` used for each attack (see the module docstring for why)."""

LABEL_FLIP = "label-flip"
UPDATE_ATTACKS = ("sign-flip", "gaussian-noise", "scale")


@dataclass(frozen=True)
class StrategyVariant:
    """A strategy as the experiments name it, with the run config that selects it.

    Attributes
    ----------
    label : str
        Short name used in run ids, CSV files and the CLI (e.g. ``"bcsfl-paper"``).
    title : str
        Name shown in tables and figures.
    overrides : tuple[tuple[str, Any], ...]
        Run-config keys that select the strategy.
    """

    label: str
    title: str
    overrides: tuple[tuple[str, Any], ...]


STRATEGIES: Mapping[str, StrategyVariant] = {
    variant.label: variant
    for variant in (
        StrategyVariant("fedavg", "FedAvg", (("strategy", "fedavg"),)),
        StrategyVariant(
            "bcsfl-paper", "BCSFL (paper)", (("strategy", "bcsfl"), ("selection", "paper"))
        ),
        StrategyVariant("bcsfl", "BCSFL", (("strategy", "bcsfl"), ("selection", "trusted-mean"))),
        StrategyVariant("krum", "Krum", (("strategy", "krum"),)),
        StrategyVariant("multikrum", "MultiKrum", (("strategy", "multikrum"),)),
        StrategyVariant("fedmedian", "FedMedian", (("strategy", "fedmedian"),)),
        StrategyVariant("fedtrimmedavg", "FedTrimmedAvg", (("strategy", "fedtrimmedavg"),)),
    )
}
"""Every strategy of the grid, in the order tables and figures show them."""


@dataclass(frozen=True)
class ExperimentSpec:
    """One federation of the grid.

    Attributes
    ----------
    strategy : str
        A key of :data:`STRATEGIES`.
    attack : str
        ``"label-flip"``, ``"sign-flip"``, ``"gaussian-noise"`` or ``"scale"``.
    attacker_fraction : float
        Share of clients that attack, in [0, 1).
    dataset : str
        ``"mnist"`` or ``"cifar10"``.
    num_clients : int
        Simulated SuperNodes (one Dirichlet partition each).
    num_rounds : int
        Federated rounds.
    dirichlet_alpha : float
        Concentration of the label-skewed partitions.
    seed : int
        Seed of partitions, attacker choice, model init and shuffling.
    """

    strategy: str
    attack: str
    attacker_fraction: float
    dataset: str = "mnist"
    num_clients: int = 20
    num_rounds: int = 20
    dirichlet_alpha: float = 0.5
    seed: int = 42

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"unknown strategy {self.strategy!r}; expected one of {list(STRATEGIES)}"
            )
        if self.attack not in ATTACK_SCALES:
            raise ValueError(
                f"unknown attack {self.attack!r}; expected one of {list(ATTACK_SCALES)}"
            )
        if not 0.0 <= self.attacker_fraction < 1.0:
            raise ValueError(f"attacker_fraction must be in [0, 1), got {self.attacker_fraction}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {DATASETS}")
        if self.num_clients < 1 or self.num_rounds < 1:
            raise ValueError(
                f"num_clients and num_rounds must be >= 1, got {self.num_clients}, "
                f"{self.num_rounds}"
            )

    @property
    def percent(self) -> int:
        """The attacker fraction in whole percent (as run ids and tables show it)."""
        return round(self.attacker_fraction * 100)

    @property
    def run_id(self) -> str:
        """Directory name of the run, unique within a grid (e.g. ``mnist-bcsfl-label-flip-30``)."""
        return f"{self.dataset}-{self.strategy}-{self.attack}-{self.percent:02d}-s{self.seed}"

    def run_config(self) -> dict[str, Any]:
        """Return the run-config overrides of this federation (kebab-case keys)."""
        return {
            **dict(STRATEGIES[self.strategy].overrides),
            "num-server-rounds": self.num_rounds,
            "dataset": self.dataset,
            "dirichlet-alpha": self.dirichlet_alpha,
            "seed": self.seed,
            "attacker-fraction": self.attacker_fraction,
            "attack": self.attack,
            "attack-scale": ATTACK_SCALES[self.attack],
        }


@dataclass(frozen=True)
class Preset:
    """A named selection of the grid.

    Attributes
    ----------
    name : str
        ``"fast"`` or ``"full"``.
    strategies : tuple[str, ...]
        Keys of :data:`STRATEGIES`.
    label_flip_fractions : tuple[float, ...]
        Attacker fractions run with label flipping; 0.0 is the clean reference run.
    update_attacks : tuple[str, ...]
        Model-poisoning attacks, each run at ``update_attack_fraction``.
    update_attack_fraction : float
        Attacker fraction of the model-poisoning runs.
    num_clients, num_rounds : int
        Federation size and length.
    dirichlet_alpha : float
        Partition skew.
    seeds : tuple[int, ...]
        One run per seed for every cell of the grid.
    """

    name: str
    strategies: tuple[str, ...]
    label_flip_fractions: tuple[float, ...]
    update_attacks: tuple[str, ...]
    update_attack_fraction: float
    num_clients: int
    num_rounds: int
    dirichlet_alpha: float = 0.5
    seeds: tuple[int, ...] = (42,)

    def specs(
        self, dataset: str = "mnist", strategies: tuple[str, ...] | None = None
    ) -> list[ExperimentSpec]:
        """Return the preset's runs in execution order (cheap cells of every strategy first).

        Parameters
        ----------
        dataset : str
            Dataset of every run.
        strategies : tuple[str, ...], optional
            Restrict the preset to these strategies (keys of :data:`STRATEGIES`).
        """
        chosen = self.strategies if strategies is None else strategies
        unknown = [s for s in chosen if s not in STRATEGIES]
        if unknown:
            raise ValueError(f"unknown strategies {unknown}; expected some of {list(STRATEGIES)}")
        cells = [(LABEL_FLIP, fraction) for fraction in self.label_flip_fractions]
        cells += [(attack, self.update_attack_fraction) for attack in self.update_attacks]
        return [
            ExperimentSpec(
                strategy=strategy,
                attack=attack,
                attacker_fraction=fraction,
                dataset=dataset,
                num_clients=self.num_clients,
                num_rounds=self.num_rounds,
                dirichlet_alpha=self.dirichlet_alpha,
                seed=seed,
            )
            for seed in self.seeds
            for attack, fraction in cells
            for strategy in chosen
        ]


PRESETS: Mapping[str, Preset] = {
    "fast": Preset(
        name="fast",
        strategies=("fedavg", "bcsfl"),
        label_flip_fractions=(0.0, 0.3),
        update_attacks=(),
        update_attack_fraction=0.3,
        num_clients=4,
        num_rounds=2,
    ),
    "full": Preset(
        name="full",
        strategies=tuple(STRATEGIES),
        label_flip_fractions=(0.0, 0.1, 0.3, 0.5),
        update_attacks=UPDATE_ATTACKS,
        update_attack_fraction=0.3,
        num_clients=20,
        num_rounds=20,
    ),
}
"""``fast``: 4 runs of 4 clients x 2 rounds, minutes on 2 cores (run by the tests).
``full``: the paper's grid, 7 strategies x 7 cells = 49 runs of 20 clients x 20 rounds."""
