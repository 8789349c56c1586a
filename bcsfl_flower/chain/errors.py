"""Errors of the audit trail, and decoding of the contract's custom-error reverts."""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from typing import Any

from eth_abi import decode as abi_decode
from eth_utils import function_signature_to_4byte_selector, to_checksum_address

from bcsfl_flower.packets import to_hex


class ChainUnavailableError(RuntimeError):
    """The chain did not answer, even after retrying.

    The run must stop rather than skip a round: the error carries what is needed to
    resume (re-send the same statement once the chain is back).

    Attributes
    ----------
    action : str
        What was being done, e.g. ``"anchorRound"``.
    attempts : int
        How many attempts were made.
    resume : dict
        JSON-friendly description of the pending transaction (round, hashes, committee,
        signatures as hex), enough to retry it later.
    """

    def __init__(
        self, message: str, *, action: str, attempts: int, resume: Mapping[str, Any]
    ) -> None:
        super().__init__(message)
        self.action = action
        self.attempts = attempts
        self.resume = dict(resume)


class RoundNotAnchoredError(LookupError):
    """No ``RoundAnchored`` event exists for the round asked for."""


class ChainRejectedError(RuntimeError):
    """The contract reverted: the statement is invalid and retrying cannot help.

    Attributes
    ----------
    error_name : str | None
        The contract's custom error name, e.g. ``"QuorumNotReached"``, when decoded.
    arguments : dict
        The custom error's arguments, by name.
    """

    def __init__(self, message: str, *, error_name: str | None, arguments: Mapping[str, Any]):
        super().__init__(message)
        self.error_name = error_name
        self.arguments = dict(arguments)


_BYTES_LITERAL = re.compile(r"""b(['"]).*\1""", re.DOTALL)


def revert_data(err: BaseException) -> bytes | None:
    """Return the raw revert data carried by a web3 or eth-tester exception, if any.

    web3 puts it in ``ContractLogicError.data`` (hex). eth-tester's ``TransactionFailed``
    only carries it as the ``repr`` of a bytes object inside its message, which is
    parsed here with :func:`ast.literal_eval` (never ``eval``).
    """
    data = getattr(err, "data", None)
    if isinstance(data, str) and data.startswith("0x"):
        try:
            return bytes.fromhex(data[2:])
        except ValueError:
            return None
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    for arg in getattr(err, "args", ()):
        if isinstance(arg, bytes | bytearray):
            return bytes(arg)
        if isinstance(arg, str) and (match := _BYTES_LITERAL.search(arg)):
            try:
                value = ast.literal_eval(match.group(0))
            except (ValueError, SyntaxError):
                continue
            if isinstance(value, bytes):
                return value
    return None


def decode_custom_error(
    abi: Sequence[Mapping[str, Any]], data: bytes
) -> tuple[str | None, dict[str, Any]]:
    """Decode revert ``data`` against the custom errors declared in ``abi``.

    Returns
    -------
    tuple[str | None, dict]
        The error's name and its arguments by name; ``(None, {})`` if no error matches.
    """
    if len(data) < 4:
        return None, {}
    for entry in abi:
        if entry.get("type") != "error":
            continue
        types = [item["type"] for item in entry.get("inputs", [])]
        signature = f"{entry['name']}({','.join(types)})"
        if function_signature_to_4byte_selector(signature) != data[:4]:
            continue
        values = abi_decode(types, data[4:])
        names = [item["name"] for item in entry.get("inputs", [])]
        return entry["name"], {
            name: _readable(kind, value)
            for name, kind, value in zip(names, types, values, strict=True)
        }
    return None, {}


def _readable(kind: str, value: Any) -> Any:
    if kind == "address":
        return to_checksum_address(value)
    if isinstance(value, bytes):
        return to_hex(value)
    return value


def rejected_error(
    abi: Sequence[Mapping[str, Any]], action: str, err: BaseException
) -> ChainRejectedError:
    """Build a :class:`ChainRejectedError` that names the contract's custom error."""
    data = revert_data(err)
    name, arguments = decode_custom_error(abi, data) if data else (None, {})
    if name is None:
        detail = str(err)
    else:
        detail = f"{name}({', '.join(f'{key}={value}' for key, value in arguments.items())})"
    return ChainRejectedError(
        f"BCSFLAudit rejected {action}: {detail}", error_name=name, arguments=arguments
    )
