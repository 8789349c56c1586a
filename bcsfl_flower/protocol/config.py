"""The train and evaluate configs every exchange shares: keys, the signing domain, records.

Part of :mod:`bcsfl_flower.protocol` (see its docstring for the exchanges).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    RecordDict,
)

from bcsfl_flower.packets import (
    PACKET_RECORD_KEY,
    Eip712Domain,
)

ConfigValue = bool | int | float | str | bytes
"""A scalar value a ConfigRecord can carry."""


ROUND_KEY = "server-round"
"""Config key with the current round (Flower's strategies set it)."""

CHAIN_ID_KEY = "bcsfl-chain-id"
"""Train-config key with the chain id of the EIP-712 domain clients sign under."""

CONTRACT_KEY = "bcsfl-contract"
"""Train-config key with the audit contract address of the EIP-712 domain."""

RUN_KEY = "bcsfl-run"
"""Train-config key with the run's identity (32 bytes), the first member of every signed
struct (:attr:`~bcsfl_flower.packets.Eip712Domain.run`)."""

DEVELOPMENT_KEYS_KEY = "bcsfl-development-keys"
"""Signing-config key set (``True``) only when the trail registers the PUBLIC development
accounts, i.e. in simulation: a node with no keystore signs with its partition's
development key only then, and refuses to sign otherwise."""

CKKS_CONFIG_KEY = "bcsfl-ckks"
"""Train- and evaluate-config key that switches the CKKS mod on: ``True``."""

CANDIDATE_CONFIG_KEY = "bcsfl-candidate"
"""Evaluate-config key naming the model a validator scores (it also makes every message
to the same validator distinct)."""

BASELINE_CANDIDATE = "w_t"
"""Name under which validators score the current global model."""

DP_EPSILON_KEY = "dp-epsilon"
"""Train metric in which a DP client reports the epsilon it has spent so far."""

BUDGET_REFUSAL = "privacy budget exceeded"
"""A DP client that would overspend ``dp-target-epsilon`` refuses to train with an error
reply whose reason contains this (:mod:`bcsfl_flower.privacy.budget`)."""


def all_refused_for_budget(reasons: Iterable[str]) -> bool:
    """Return whether there were reasons and every one is a privacy budget refusal."""
    reasons = list(reasons)
    return bool(reasons) and all(BUDGET_REFUSAL in reason for reason in reasons)


def config_value(content: RecordDict, key: str) -> ConfigValue | list[Any] | None:
    """Return ``key`` from the first ConfigRecord of ``content`` that holds it.

    Strategies may send their config under any record name (FedAvg's
    ``configrecord_key``), so clients look the key up in every ConfigRecord.
    """
    for record in content.config_records.values():
        if key in record:
            return record[key]
    return None


def signing_config(
    domain: Eip712Domain, *, development_keys: bool = False
) -> dict[str, ConfigValue]:
    """Return the config entries that make clients sign under ``domain``.

    ``development_keys`` tells nodes without a keystore that the trail registered the
    public development accounts (simulation), so they may sign with them.
    """
    config: dict[str, ConfigValue] = {
        CHAIN_ID_KEY: domain.chain_id,
        CONTRACT_KEY: domain.verifying_contract,
        RUN_KEY: domain.run,
    }
    if development_keys:
        config[DEVELOPMENT_KEYS_KEY] = True
    return config


def signing_domain(content: RecordDict) -> Eip712Domain | None:
    """Return the domain a train message asks its reply to be signed under, if any.

    Raises
    ------
    ValueError, TypeError
        If the entries are there but malformed (naming the field).
    """
    keys = (CHAIN_ID_KEY, CONTRACT_KEY, RUN_KEY)
    return config_domain({key: config_value(content, key) for key in keys})


def config_domain(config: Mapping[str, Any]) -> Eip712Domain | None:
    """Return the signing domain in a config mapping (:func:`signing_config`), if any.

    Raises
    ------
    ValueError, TypeError
        If the entries are there but malformed (naming the field).
    """
    values = [config.get(key) for key in (CHAIN_ID_KEY, CONTRACT_KEY, RUN_KEY)]
    if any(value is None for value in values):
        return None
    chain_id, contract, run = values
    # the config's values are a union; Eip712Domain checks the run id's type itself
    return Eip712Domain(int(chain_id), str(contract), run)  # type: ignore[arg-type]


def packet_record(content: RecordDict) -> ConfigRecord | None:
    """Return a train reply's packet record, or None for an unsigned reply."""
    return content.config_records.get(PACKET_RECORD_KEY)


def model_record(content: RecordDict, preferred: str = "arrays") -> tuple[str, ArrayRecord]:
    """Return the name and ArrayRecord of the model in ``content``.

    The record named ``preferred`` wins; otherwise the only ArrayRecord.

    Raises
    ------
    ValueError
        If there is no such record, or several and none is named ``preferred``.
    """
    records = content.array_records
    if preferred in records:
        return preferred, records[preferred]
    if len(records) == 1:
        return next(iter(records.items()))
    raise ValueError(
        f"the message has {len(records)} ArrayRecords and none named {preferred!r}; "
        "cannot tell which holds the model"
    )
