"""Optional features and the pip extras that install them.

The core install (``pip install bcsfl-flower``) holds what the strategy and the audit
trail need: Flower, NumPy, SciPy (screening's clustering) and the Ethereum stack. The
rest is opt-in, so that a scikit-learn or JAX user who swaps one strategy line does not
pull in PyTorch. (The example app, ``examples/pytorch-vision``, is a package of its
own with its own dependencies.)

========  =======================================  ====================================
extra     installs                                 needed for
========  =======================================  ====================================
ckks      TenSEAL                                  CKKS aggregation (``ckks=True``)
dp        PyTorch, Opacus                          client-side DP-SGD (``dp=true``)
dev       all of the above, pytest, ruff, ...      working on bcsfl-flower itself
========  =======================================  ====================================

Asking for a feature whose extra is missing fails at start-up with
:class:`MissingExtraError`, which names the extra to install.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from types import ModuleType

EXTRAS: Mapping[str, tuple[str, ...]] = {
    "ckks": ("tenseal",),
    "dp": ("torch", "opacus"),
}
"""Extra name -> the top-level modules it installs."""


class MissingExtraError(ImportError):
    """A feature was asked for whose optional dependencies are not installed."""


def missing_extra(extra: str, feature: str) -> MissingExtraError:
    """Return the error for ``feature``, naming the modules missing and the extra."""
    missing = [module for module in EXTRAS[extra] if importlib.util.find_spec(module) is None]
    modules = ", ".join(missing or EXTRAS[extra])
    return MissingExtraError(
        f"{feature} needs {modules}, which bcsfl-flower installs only with its "
        f"'{extra}' extra: pip install 'bcsfl-flower[{extra}]'"
    )


def require_extra(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` unless every module of ``extra`` is installed.

    Only looks the modules up (``importlib.util.find_spec``); nothing is imported.
    """
    if any(importlib.util.find_spec(module) is None for module in EXTRAS[extra]):
        raise missing_extra(extra, feature)


def import_extra(extra: str, module: str, feature: str) -> ModuleType:
    """Import ``module`` of ``extra``, or raise :class:`MissingExtraError` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise missing_extra(extra, feature) from err
