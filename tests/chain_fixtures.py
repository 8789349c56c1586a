"""Shared chain helpers for tests: a real anvil, connections, contracts, certificates."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
from eth_account.signers.local import LocalAccount
from web3 import Web3

from bcsfl_flower.approvals import (
    RoundApproval,
    RoundRollback,
    committee_root,
)
from bcsfl_flower.ballots import Ballot
from bcsfl_flower.chain.audit import AuditTrail
from bcsfl_flower.chain.backends import ChainConnection, spawn_anvil, stop_anvil
from bcsfl_flower.chain.certificates import AnchorCertificate
from bcsfl_flower.chain.keys import client_dev_account, dev_account
from bcsfl_flower.chain.model_store import ModelStore
from bcsfl_flower.packets import (
    Eip712Domain,
    model_hash,
)
from bcsfl_flower.round.statement import (
    DecisionSettings,
    RoundStatement,
    StatedPlan,
    StatedReply,
    redraw,
)


@contextmanager
def running_anvil() -> Iterator[str]:
    """Start the real anvil binary on a free port; stop it by pid on exit."""
    process, url = spawn_anvil()
    try:
        yield url
    finally:
        stop_anvil(process)
        if process.poll() is None:
            raise RuntimeError(f"anvil (pid {process.pid}) is still running")


def http_connection(url: str, state_dir: Path) -> ChainConnection:
    """A connection to ``url`` signing as development account 0 (the contract owner)."""
    web3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 10}))
    return ChainConnection(web3, "http", dev_account(0), state_dir, rpc_url=url)


def clients(count: int) -> list[LocalAccount]:
    """The development accounts of partitions 0..count-1."""
    return [client_dev_account(index) for index in range(count)]


def toy_model(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), value, dtype=np.float32), "b": np.arange(3, dtype=np.int64)}


GENESIS = model_hash(toy_model(0.0))


def deploy(connection: ChainConnection, registered: Sequence[LocalAccount]) -> AuditTrail:
    """Deploy a fresh trail (genesis = toy_model(0)) and register ``registered``."""
    trail = AuditTrail.deploy(connection, GENESIS)
    trail.register_clients({account.address: 100 for account in registered})
    return trail


def approval_for(
    trail: AuditTrail,
    round_number: int,
    value: float,
    miners: Sequence[LocalAccount],
    state_root: bytes = bytes(32),
) -> RoundApproval:
    """The approval of round ``round_number`` anchoring ``toy_model(value)``."""
    return trail.prepare_approval(
        round_number,
        model_hash(toy_model(value)),
        bytes(32),
        [miner.address for miner in miners],
        state_root,
        timestamp=1_700_000_000 + round_number,
    )


def certificate(
    trail: AuditTrail,
    approval: RoundApproval | RoundRollback,
    committee: Sequence[LocalAccount],
    signers: Sequence[LocalAccount],
) -> AnchorCertificate:
    """A certificate signed by ``signers``, built without the off-chain quorum check."""
    ordered = sorted(signers, key=lambda account: int(account.address, 16))
    return AnchorCertificate(
        approval,
        tuple(sorted((m.address for m in committee), key=lambda a: int(a, 16))),
        tuple(account.address for account in ordered),
        tuple(approval.sign(account, trail.domain) for account in ordered),
    )


def rollback_certificate(
    trail: AuditTrail,
    round_number: int,
    miners: Sequence[LocalAccount],
    state_root: bytes = bytes(32),
    signers: Sequence[LocalAccount] | None = None,
    reason: str = "no quorum",
) -> AnchorCertificate:
    """A certificate of round ``round_number``'s rollback, signed by ``signers`` (all miners)."""
    committee = [m.address for m in miners]
    rollback = trail.prepare_rollback(round_number, committee, state_root, reason)
    return certificate(trail, rollback, miners, miners if signers is None else signers)


def committee_of(miners: Sequence[LocalAccount]) -> bytes:
    return committee_root([miner.address for miner in miners])


def stated_round(
    store: ModelStore,
    round_number: int,
    previous_hash: bytes,
    members: Sequence[LocalAccount],
    domain: Eip712Domain,
    committed: bytes | None,
    stakes: Mapping[str, float] | None = None,
) -> tuple[RoundStatement, list[LocalAccount]]:
    """Store round ``round_number``'s state statement; return it and its drawn miners.

    The committee is the stake-weighted draw over ``members`` (equal stakes) with a
    miner seat for each, so every member with stake is drawn: the statement is what
    :func:`~bcsfl_flower.audit.verification.verify_trail` checks an anchored committee
    against. Its one candidate hashes to ``committed`` (when given), and the two drawn
    validators' signed ballots accept it, so the ballots commit it; without it the
    round has no candidate, and the ballots commit nothing. ``stakes`` (the last
    round's settlement) defaults to 10 each.
    """
    addresses = sorted(m.address for m in members)
    statement = RoundStatement(
        round=round_number,
        previous_hash="0x" + previous_hash.hex(),
        settings=DecisionSettings(
            num_validators=min(2, len(members)),
            num_miners=len(members),
            vote_tolerance=0.0,
            outlier_norm_ratio=3.0,
            split_margin=0.0,
            example_cap_ratio=2.0,
            selection="trusted-mean",
            space="plain",
        ),
        stakes=dict(stakes) if stakes is not None else dict.fromkeys(addresses, 10.0),
        replies=tuple(
            StatedReply(str(i), address, 1.0, "0x" + bytes([i + 1]).hex() * 32)
            for i, address in enumerate(addresses)
        ),
        candidates=tuple(addresses),
    )
    drawn = redraw(statement)
    statement = replace(statement, validators=drawn.validators, miners=drawn.miners)
    account = {m.address: m for m in members}
    if committed is not None:
        models = (previous_hash, committed)
        statement = replace(
            statement,
            plan=StatedPlan(
                names=("trusted-mean",),
                scored={"trusted-mean": "0x" + committed.hex()},
                supports=(tuple(range(len(addresses))),),
            ),
            ballots=tuple(
                Ballot(round_number, v, previous_hash, models, (1.0, 0.5))
                .sign(account[v], domain)
                .to_fields()
                for v in drawn.validators
            ),
        )
    root = store.save_document(statement.to_bytes())
    assert root == statement.digest()
    return statement, [account[address] for address in drawn.miners]
