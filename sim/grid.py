"""The experiment grid: which federations to run, and the presets that pick them.

One :class:`ExperimentSpec` is one real Flower simulation run. Its run config is
everything the app needs beyond the defaults of ``[tool.flwr.app.config]``, and its
:attr:`~ExperimentSpec.run_id` names the run's directory, so a spec and its results
find each other again after a restart.

The grid follows the BCS-FL paper's robustness study and extends it: label flipping
(``y -> 9 - y`` on all of an attacker's data) at 0, 10, 30 and 50% attackers, and the
model-poisoning attacks sign-flip, Gaussian noise and scaling at 30%, for every
strategy. The clean federation (0% attackers) is run once and is the reference line
of every attack. A stake-minority cell repeats label flipping at 50% attackers with the
attackers holding only a share of the initial stake (run config ``attacker-stake``):
BCSFL weighs validators by stake, Flower's built-in strategies ignore it, so for them
the cell is the plain 50% cell again, run for comparison.

Attack strengths (run config ``attack-scale``, see
:func:`bcsfl_vision.task.attacks.poison_update`), chosen so that each attack breaks
plain FedAvg at 30% attackers rather than merely slowing it down:

- ``sign-flip`` 4.0: ``d' = -4 d``; the mean update ``0.7 d - 0.3 * 4 d = -0.5 d``
  points against the honest direction;
- ``gaussian-noise`` 10.0: ``d' ~ N(0, (10 std(d))^2)``, pure noise ten times the
  size of an honest update;
- ``scale`` 10.0: ``d' = 10 d``; the attackers' share of the mean is ``3 / 3.7``;
- ``label-flip``: the scale is unused (1.0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
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
DEFAULT_ALPHA = 0.5
"""The grid's Dirichlet alpha (label skew of the partitions)."""
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
        StrategyVariant(
            "centered-clipping", "CenteredClipping", (("strategy", "centered-clipping"),)
        ),
        StrategyVariant("arc-nnm-trmean", "ARC+NNM+TrMean", (("strategy", "arc-nnm-trmean"),)),
    )
}
"""Every strategy of the grid, in the order tables and figures show them."""

FLOWER_GRID_STRATEGIES = tuple(STRATEGIES)[:7]
"""The paper grid's strategies: BCSFL's two selections and Flower's own baselines."""


def share_label(share: float) -> str:
    """Return a stake share as people read it: ``"1/3"`` for 1/3, ``"35%"`` for 0.35.

    A share that is a fraction with a small denominator (up to 12) is written as that
    fraction, any other share in whole percent.
    """
    fraction = Fraction(share).limit_denominator(12)
    if abs(float(fraction) - share) < 1e-9 and fraction.denominator > 1:
        return f"{fraction.numerator}/{fraction.denominator}"
    return f"{share:.0%}"


@dataclass(frozen=True)
class Cell:
    """One attack setting of the grid; a preset runs each of its cells for every strategy.

    Attributes
    ----------
    attack : str
        A key of :data:`ATTACK_SCALES`.
    attacker_fraction : float
        Share of clients that attack; 0.0 is the clean reference cell.
    attacker_stake_share : float | None
        Share of the total initial stake that the attackers hold together; None gives
        every client the same stake.
    """

    attack: str
    attacker_fraction: float
    attacker_stake_share: float | None = None

    @property
    def is_clean(self) -> bool:
        """Whether the cell has no attackers."""
        return self.attacker_fraction == 0

    @property
    def attackers_label(self) -> str:
        """The attackers as the per-run table and legends show them: ``"50%, 1/3 stake"``."""
        text = f"{round(self.attacker_fraction * 100)}%"
        if self.attacker_stake_share is not None:
            text += f", {share_label(self.attacker_stake_share)} stake"
        return text

    @property
    def label(self) -> str:
        """Column title of the cell: ``"clean"``, ``"label-flip 50% (attackers 1/3 stake)"``."""
        if self.is_clean:
            return "clean"
        text = f"{self.attack} {round(self.attacker_fraction * 100)}%"
        if self.attacker_stake_share is not None:
            text += f" (attackers {share_label(self.attacker_stake_share)} stake)"
        return text

    def sort_key(self) -> tuple[int, float, bool, float]:
        """Order of cells in tables: clean, label flipping by fraction, then the other attacks.

        Within an attack, fractions ascend and a stake cell follows its equal-stake cell.
        """
        group = 0 if self.is_clean else 1 + list(ATTACK_SCALES).index(self.attack)
        share = self.attacker_stake_share
        return (group, self.attacker_fraction, share is not None, share or 0.0)


CLEAN = Cell(LABEL_FLIP, 0.0)
"""The clean reference cell: no attackers (run as label flipping at 0%)."""


_OPTIONAL_SETTINGS = {"dp_noise_multiplier": "dp", "batch_size": "b", "learning_rate": "lr"}
"""Optional training settings of a spec, with their run-id tags (``-dp1.5``, ``-b256``)."""


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
    attacker_stake_share : float | None
        Share of the total initial stake the attackers hold together, in (0, 1); sets
        run config ``attacker-stake`` (see :attr:`attacker_stake`). None (the default)
        leaves every client at the app's equal stake.
    dp_noise_multiplier : float | None
        Train every client with DP-SGD at this noise multiplier (run config ``dp`` and
        ``dp-noise-multiplier``); None (the default) trains without DP.
    batch_size : int | None
        Clients' (expected) batch size, run config ``batch-size``; None keeps the app's.
    learning_rate : float | None
        Clients' SGD learning rate, run config ``learning-rate``; None keeps the app's.
    """

    strategy: str
    attack: str
    attacker_fraction: float
    dataset: str = "mnist"
    num_clients: int = 20
    num_rounds: int = 20
    dirichlet_alpha: float = DEFAULT_ALPHA
    seed: int = 42
    attacker_stake_share: float | None = None
    dp_noise_multiplier: float | None = None
    batch_size: int | None = None
    learning_rate: float | None = None

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
        for name in _OPTIONAL_SETTINGS:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.attacker_stake_share is not None:
            if not 0.0 < self.attacker_stake_share < 1.0:
                raise ValueError(
                    f"attacker_stake_share must be in (0, 1), got {self.attacker_stake_share}"
                )
            if not 1 <= self.num_attackers < self.num_clients:
                raise ValueError(
                    "attacker_stake_share needs at least one attacker and one honest client; "
                    f"{self.attacker_fraction} of {self.num_clients} clients gives "
                    f"{self.num_attackers} attackers"
                )

    @property
    def percent(self) -> int:
        """The attacker fraction in whole percent (as run ids and tables show it)."""
        return round(self.attacker_fraction * 100)

    @property
    def num_attackers(self) -> int:
        """Number of attacking clients: ``round(attacker_fraction * num_clients)``.

        The app picks that many (:func:`bcsfl_vision.task.attacks.choose_attackers`).
        """
        return round(self.attacker_fraction * self.num_clients)

    @property
    def attacker_stake(self) -> float | None:
        """Initial stake of each attacker relative to an honest client's 1.0 (run config).

        With ``n`` clients, ``k`` attackers and share ``s``, the attackers hold
        ``k x / (k x + n - k) = s``, so ``x = s (n - k) / (k (1 - s))``; e.g. 0.5 for 20
        clients, 10 attackers and ``s = 1/3``. None when :attr:`attacker_stake_share` is.
        """
        share = self.attacker_stake_share
        if share is None:
            return None
        k, n = self.num_attackers, self.num_clients
        return round(share * (n - k) / (k * (1.0 - share)), 12)

    @property
    def cell(self) -> Cell:
        """The spec's cell; every run without attackers is the clean cell."""
        if self.attacker_fraction == 0:
            return CLEAN
        return Cell(self.attack, self.attacker_fraction, self.attacker_stake_share)

    @property
    def run_id(self) -> str:
        """Directory name of the run, unique within a grid.

        E.g. ``mnist-bcsfl-label-flip-30-s42``; a stake cell adds the attackers' share in
        percent: ``mnist-bcsfl-label-flip-50-stake33-s42``; a DP run its noise multiplier:
        ``mnist-bcsfl-label-flip-30-dp1.5-s42``; a batch size or learning rate
        ``-b256-lr0.4``; a Dirichlet alpha other than :data:`DEFAULT_ALPHA` ``-a0.1``.
        """
        cell = f"{self.attack}-{self.percent:02d}"
        if self.attacker_stake_share is not None:
            cell += f"-stake{round(self.attacker_stake_share * 100):02d}"
        for name, tag in _OPTIONAL_SETTINGS.items():
            value = getattr(self, name)
            if value is not None:
                cell += f"-{tag}{value:g}"
        if self.dirichlet_alpha != DEFAULT_ALPHA:
            cell += f"-a{self.dirichlet_alpha:g}"
        return f"{self.dataset}-{self.strategy}-{cell}-s{self.seed}"

    def run_config(self) -> dict[str, Any]:
        """Return the run-config overrides of this federation (kebab-case keys)."""
        config: dict[str, Any] = {
            **dict(STRATEGIES[self.strategy].overrides),
            "num-server-rounds": self.num_rounds,
            "dataset": self.dataset,
            "dirichlet-alpha": self.dirichlet_alpha,
            "seed": self.seed,
            "attacker-fraction": self.attacker_fraction,
            "attack": self.attack,
            "attack-scale": ATTACK_SCALES[self.attack],
        }
        if self.attacker_stake is not None:
            config["attacker-stake"] = self.attacker_stake
        if self.dp_noise_multiplier is not None:
            config.update({"dp": True, "dp-noise-multiplier": self.dp_noise_multiplier})
        if self.batch_size is not None:
            config["batch-size"] = self.batch_size
        if self.learning_rate is not None:
            config["learning-rate"] = self.learning_rate
        return config

    def to_record(self) -> dict[str, Any]:
        """Return the spec as ``spec.json`` stores it.

        The fields of :func:`dataclasses.asdict`, less ``attacker_stake_share`` and the
        settings of :data:`_OPTIONAL_SETTINGS` when they are None: a run made before a
        field existed recorded no such key, and the same federation must still match
        its record.
        """
        record = dataclasses.asdict(self)
        for optional in ("attacker_stake_share", *_OPTIONAL_SETTINGS):
            if record[optional] is None:
                del record[optional]
        return record


@dataclass(frozen=True)
class Preset:
    """A named selection of the grid.

    Attributes
    ----------
    name : str
        A key of :data:`PRESETS`.
    strategies : tuple[str, ...]
        Keys of :data:`STRATEGIES`.
    cells : tuple[Cell, ...]
        Attack settings, each run for every strategy (the clean cell first where there
        is one).
    num_clients, num_rounds : int
        Federation size and length.
    dirichlet_alpha : float
        Partition skew.
    seeds : tuple[int, ...]
        One run per seed for every cell of the grid.
    """

    name: str
    strategies: tuple[str, ...]
    cells: tuple[Cell, ...]
    num_clients: int
    num_rounds: int
    dirichlet_alpha: float = DEFAULT_ALPHA
    seeds: tuple[int, ...] = (42,)

    def specs(
        self, dataset: str = "mnist", strategies: tuple[str, ...] | None = None
    ) -> list[ExperimentSpec]:
        """Return the preset's runs in execution order: seed by seed, cell by cell.

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
        return [
            ExperimentSpec(
                strategy=strategy,
                attack=cell.attack,
                attacker_fraction=cell.attacker_fraction,
                dataset=dataset,
                num_clients=self.num_clients,
                num_rounds=self.num_rounds,
                dirichlet_alpha=self.dirichlet_alpha,
                seed=seed,
                attacker_stake_share=cell.attacker_stake_share,
            )
            for seed in self.seeds
            for cell in self.cells
            for strategy in chosen
        ]


STAKE_MINORITY = Cell(LABEL_FLIP, 0.5, 1 / 3)
"""Label flipping by half the clients holding a third of the stake."""

PRESETS: Mapping[str, Preset] = {
    "fast": Preset(
        name="fast",
        strategies=("fedavg", "bcsfl"),
        cells=(CLEAN, Cell(LABEL_FLIP, 0.3)),
        num_clients=4,
        num_rounds=2,
    ),
    "small": Preset(
        name="small",
        strategies=("fedavg", "bcsfl", "multikrum", "fedtrimmedavg"),
        cells=(
            CLEAN,
            Cell(LABEL_FLIP, 0.3),
            STAKE_MINORITY,
            Cell("sign-flip", 0.3),
            Cell("scale", 0.3),
        ),
        num_clients=10,
        num_rounds=8,
    ),
    "full": Preset(
        name="full",
        strategies=FLOWER_GRID_STRATEGIES,
        cells=(
            CLEAN,
            *(Cell(LABEL_FLIP, fraction) for fraction in (0.1, 0.3, 0.5)),
            STAKE_MINORITY,
            *(Cell(attack, 0.3) for attack in UPDATE_ATTACKS),
        ),
        num_clients=20,
        num_rounds=20,
    ),
    "skewed": Preset(
        name="skewed",
        strategies=("fedavg", "bcsfl", "multikrum", "centered-clipping"),
        cells=(CLEAN, Cell(LABEL_FLIP, 0.3), Cell("sign-flip", 0.3)),
        num_clients=20,
        num_rounds=20,
        dirichlet_alpha=0.1,
    ),
    "seeds": Preset(
        name="seeds",
        strategies=("fedavg", "bcsfl", "multikrum", "fedmedian", "fedtrimmedavg"),
        cells=(
            Cell(LABEL_FLIP, 0.3),
            Cell(LABEL_FLIP, 0.5),
            STAKE_MINORITY,
            Cell("scale", 0.3),
        ),
        num_clients=20,
        num_rounds=20,
        seeds=(43, 44),
    ),
}
"""The presets, smallest first.

- ``fast``: FedAvg and BCSFL, clean and label-flip 30%, 4 clients x 2 rounds: 4 runs,
  minutes on 2 cores (run by the tests);
- ``small``: quick tuning feedback, 4 strategies x 5 cells (clean, label-flip 30%,
  the stake-minority cell, sign-flip and scale 30%), 10 clients x 8 rounds: 20 runs;
- ``full``: the paper's grid and the stake-minority cell, 7 strategies x 8 cells = 56
  runs of 20 clients x 20 rounds, seed 42;
- ``skewed``: the heterogeneity check of the fast bench in real federations: FedAvg,
  BCSFL, MultiKrum and byzfl's centered clipping (the best baseline of the bench's
  attacked alpha-0.1 cells) at Dirichlet alpha 0.1, clean, label flip 30% and sign
  flip 30% (12 runs of 20 clients x 20 rounds; run ids end in ``-a0.1``);
- ``seeds``: the decisive cells of ``full`` again for 5 strategies with seeds 43 and
  44 (40 runs), meant to share ``full``'s output directory so that its report shows
  the spread over three seeds.
"""
