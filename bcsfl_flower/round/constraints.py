"""Declarative checks for settings, in the style of scikit-learn's ``_parameter_constraints``.

A settings dataclass lists, per field, one :class:`Constraint`; :func:`validate_parameters`
checks every field against it once, when the dataclass is built. The rules thereby live
beside the defaults they guard, and a bad value raises one :class:`SettingError` that
names the setting and what it must be, whether it came from the Python API or from the
run config (:mod:`bcsfl_vision.config`, which reports the kebab-case key).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any


class SettingError(ValueError):
    """A setting is out of range.

    Attributes
    ----------
    setting : str
        The snake_case name of the setting (the run config's key with ``-``).
    detail : str
        What is wrong, e.g. ``"must be >= 1, got 0"``.
    """

    def __init__(self, setting: str, detail: str) -> None:
        super().__init__(f"{setting} {detail}")
        self.setting = setting
        self.detail = detail


class Constraint(ABC):
    """What one setting's value must be."""

    @abstractmethod
    def accepts(self, value: Any) -> bool:
        """Return whether ``value`` satisfies the constraint."""

    @abstractmethod
    def describe(self) -> str:
        """Return the requirement, as it completes "must be ..."."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Interval(Constraint):
    """A finite number in ``[low, high]``; ``low_open``/``high_open`` exclude an end.

    ``integer=True`` also demands an ``int`` (a ``bool`` is never a number here).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def accepts(self, value: Any) -> bool:
        """Return whether ``value`` satisfies the constraint."""
        if not _is_number(value) or (self.integer and not isinstance(value, int)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """Return the requirement, as it completes "must be ..."."""
        kind = "an int" if self.integer else "a number"
        if self.high is None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{kind} in {left}{self.low:g}, {self.high:g}{right}"


@dataclass(frozen=True)
class OneOf(Constraint):
    """One of a registry's names (the registry is read when the value is checked)."""

    choices: Callable[[], Iterable[str]]

    def accepts(self, value: Any) -> bool:
        """Return whether ``value`` satisfies the constraint."""
        return isinstance(value, str) and value in set(self.choices())

    def describe(self) -> str:
        """Return the requirement, as it completes "must be ..."."""
        return f"one of {sorted(self.choices())}"


@dataclass(frozen=True)
class NonEmptyString(Constraint):
    """A string with at least one character (a record or metric key)."""

    def accepts(self, value: Any) -> bool:
        """Return whether ``value`` satisfies the constraint."""
        return isinstance(value, str) and value != ""

    def describe(self) -> str:
        """Return the requirement, as it completes "must be ..."."""
        return "a non-empty string"


@dataclass(frozen=True)
class Text(Constraint):
    """Any string, the empty one included (an optional name or path)."""

    def accepts(self, value: Any) -> bool:
        """Return whether ``value`` is a string."""
        return isinstance(value, str)

    def describe(self) -> str:
        """Return the requirement, as it completes "must be ..."."""
        return "a string"


@dataclass(frozen=True)
class Boolean(Constraint):
    """``True`` or ``False`` (not a truthy number or string)."""

    def accepts(self, value: Any) -> bool:
        """Return whether ``value`` satisfies the constraint."""
        return isinstance(value, bool)

    def describe(self) -> str:
        """Return the requirement, as it completes "must be ..."."""
        return "true or false"


def validate_parameters(settings: Any, constraints: Mapping[str, Constraint]) -> None:
    """Check every field of the dataclass ``settings`` against its constraint.

    Raises
    ------
    SettingError
        For the first field whose value is out of range, naming it and its requirement.
    KeyError
        If a field has no constraint: every setting must say what it accepts.
    """
    for field in fields(settings):
        value = getattr(settings, field.name)
        constraint = constraints[field.name]
        if not constraint.accepts(value):
            raise SettingError(field.name, f"must be {constraint.describe()}, got {value!r}")
