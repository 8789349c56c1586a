"""The two places the plugin reaches below Flower's public API, pinned.

Flower exports neither name from ``flwr.app``, ``flwr.serverapp`` or ``flwr.clientapp``:

* ``flwr.common.constant.ErrorCode.MOD_FAILED_PRECONDITION``: the error code the bcsfl and
  CKKS mods answer with when a message fails their checks (Flower's own mods use it);
* ``flwr.supercore.run.Run``: the type of ``Grid.run``, which :class:`PromptGrid`
  delegates (imported for type checking only).

A Flower release that moves either fails here, naming what moved, instead of in a round.
"""

from __future__ import annotations

import importlib
import inspect
import typing

from flwr.serverapp import Grid


def test_the_mods_error_code_is_where_the_mods_import_it():
    constant = importlib.import_module("flwr.common.constant")
    assert hasattr(constant, "ErrorCode"), "flwr.common.constant.ErrorCode moved"
    assert isinstance(constant.ErrorCode.MOD_FAILED_PRECONDITION, int), (
        "ErrorCode.MOD_FAILED_PRECONDITION moved or changed: the mods answer with it"
    )


def test_grid_run_is_still_typed_as_supercore_run():
    run = importlib.import_module("flwr.supercore.run").Run
    hints = typing.get_type_hints(Grid.set_run, globalns=vars(inspect.getmodule(Grid)))
    assert hints.get("run") is run, (
        f"Grid.set_run now takes {hints.get('run')!r}, not flwr.supercore.run.Run: "
        "update PromptGrid's signatures"
    )
