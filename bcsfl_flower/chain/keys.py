"""Signing keys: development accounts for simulation, encrypted keystores for deployment.

.. warning::

   :func:`dev_account` derives keys from the PUBLIC development mnemonic
   ``"test test test test test test test test test test test junk"`` (the one anvil,
   Hardhat and Foundry use). Everybody knows these private keys. They are for local
   simulation only; any funds or trust placed in them anywhere else will be lost. In a
   real deployment every node loads its own key with :func:`load_keystore`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import cast

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

DEV_MNEMONIC = "test test test test test test test test test test test junk"
"""The public development mnemonic. UNSAFE: its keys are known to everyone."""

DEV_HD_PATH = "m/44'/60'/0'/0/{index}"
"""BIP-44 path of development account ``index`` (the Ethereum default, as in anvil)."""

OPERATOR_DEV_INDEX = 0
"""Development account of the server (contract owner); anvil funds it."""

CLIENT_DEV_OFFSET = 1
"""Client with partition id ``p`` uses development account ``CLIENT_DEV_OFFSET + p``, so
that no client shares the operator's key."""

KEYSTORE_PASSWORD_ENV = "BCSFL_KEYSTORE_PASSWORD"
"""Environment variable read for the keystore password when no password file is given."""


@lru_cache(maxsize=1024)
def dev_account(index: int) -> LocalAccount:
    """Return development account ``index`` of the public development mnemonic.

    UNSAFE outside simulation: the mnemonic is public (see the module warning). Index 0
    is anvil's first pre-funded account.

    Parameters
    ----------
    index : int
        Account index in ``m/44'/60'/0'/0/{index}``; must be >= 0.

    Raises
    ------
    ValueError
        If ``index`` is negative or not an int.
    """
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"development account index must be an int >= 0, got {index!r}")
    Account.enable_unaudited_hdwallet_features()
    return cast(
        LocalAccount,
        Account.from_mnemonic(DEV_MNEMONIC, account_path=DEV_HD_PATH.format(index=index)),
    )


def client_dev_account(partition_id: int) -> LocalAccount:
    """Return the development account of the client with ``partition_id`` (UNSAFE).

    It is ``dev_account(CLIENT_DEV_OFFSET + partition_id)``; the server can compute every
    simulated client's address from the partition ids alone, to register them.
    """
    if isinstance(partition_id, bool) or not isinstance(partition_id, int) or partition_id < 0:
        raise ValueError(f"partition_id must be an int >= 0, got {partition_id!r}")
    return dev_account(CLIENT_DEV_OFFSET + partition_id)


DEV_ACCOUNTS_REFUSED = 64
"""How many development accounts a deployment's registry is checked against: anvil's ten
and the clients of partitions 0..62, the keys any simulation of this project signs with."""


def development_addresses(addresses: Iterable[str]) -> list[str]:
    """Return the ``addresses`` that are public development accounts (checksummed).

    A deployment must not register them: their keys are public, so any node could sign
    as one of them. The first :data:`DEV_ACCOUNTS_REFUSED` accounts are checked.
    """
    public = {dev_account(index).address for index in range(DEV_ACCOUNTS_REFUSED)}
    return [to_checksum_address(a) for a in addresses if to_checksum_address(a) in public]


def load_keystore(
    path: str | os.PathLike[str],
    *,
    password: str | None = None,
    password_file: str | os.PathLike[str] | None = None,
    password_env: str = KEYSTORE_PASSWORD_ENV,
) -> LocalAccount:
    """Load an account from an encrypted JSON keystore (Web3 Secret Storage).

    The password is, in order of precedence: ``password``; the first line of
    ``password_file``; the environment variable ``password_env``.

    Parameters
    ----------
    path : str | os.PathLike
        The keystore file, as written by ``Account.encrypt`` / geth / foundry's ``cast``.
    password : str, optional
        The password itself.
    password_file : str | os.PathLike, optional
        A file whose first line is the password.
    password_env : str, optional
        Environment variable holding the password. Default ``BCSFL_KEYSTORE_PASSWORD``.

    Raises
    ------
    FileNotFoundError
        If the keystore or the password file does not exist.
    ValueError
        If no password is available, the file is not a keystore, or the password is wrong.
    """
    keystore_path = Path(path)
    if not keystore_path.is_file():
        raise FileNotFoundError(f"keystore {keystore_path} does not exist")
    if password is None and password_file is not None:
        secret_path = Path(password_file)
        if not secret_path.is_file():
            raise FileNotFoundError(f"keystore password file {secret_path} does not exist")
        password = secret_path.read_text(encoding="utf-8").splitlines()[0]
    if password is None:
        password = os.environ.get(password_env)
    if password is None:
        raise ValueError(
            f"no password for keystore {keystore_path}: pass a password file or set ${password_env}"
        )
    try:
        keyfile = json.loads(keystore_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"keystore {keystore_path} is not JSON: {err}") from err
    try:
        private_key = Account.decrypt(keyfile, password)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot decrypt keystore {keystore_path}: {err}") from err
    return cast(LocalAccount, Account.from_key(private_key))
