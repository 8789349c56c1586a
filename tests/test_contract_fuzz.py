"""The contract fuzzer: every argument of ``anchorRound`` and ``recordRollback``, mutated.

Against a real anvil (started and stopped by pid), one honest certificate of round 1 (a
commit, and a rollback) is built; Hypothesis then draws, with a fixed seed, a mutation of
one argument (the signed fields, the run identity, the committee, the signatures and
their order, the reason, the sender) and a replacement value. Each mutated call must
revert with the custom error named for that mutation, decoded from the revert data as the
Python binding decodes it; nothing is recorded, and the honest certificates still pass at
the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from chain_fixtures import (
    approval_for,
    certificate,
    clients,
    deploy,
    http_connection,
    rollback_certificate,
    running_anvil,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_contract import CURVE_ORDER, rejection_for

from bcsfl_flower.chain.audit import AuditTrail
from bcsfl_flower.chain.certificates import AnchorCertificate

MINERS = 5
EXAMPLES = 120


@dataclass(frozen=True)
class Setting:
    """The deployed trail, its miners, an outsider and the two honest certificates."""

    trail: AuditTrail
    miners: list
    outsider: object
    commit: AnchorCertificate
    rollback: AnchorCertificate


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    with running_anvil() as url:
        connection = http_connection(url, tmp_path_factory.mktemp("fuzz-chain"))
        accounts = clients(MINERS + 1)
        miners, outsider = accounts[:MINERS], accounts[MINERS]
        trail = deploy(connection, miners)
        commit = certificate(trail, approval_for(trail, 1, 1.0, miners), miners, miners)
        rollback = rollback_certificate(trail, 1, miners, bytes([7]) * 32, reason="no quorum")
        yield Setting(trail, miners, outsider, commit, rollback)
        # the honest certificates still pass: the mutations changed nothing on chain
        assert trail.latest_round() == 0
        trail.anchor_round(commit)
        assert trail.latest_round() == 1


Mutate = Callable[[Setting, AnchorCertificate, bytes], tuple[AnchorCertificate, str | None]]
"""Return the mutated certificate (and a reason to send, for a rollback, or None)."""


def _signed(approval, committee: tuple[str, ...], setting: Setting, domain=None):
    """Re-sign ``approval`` by the whole committee (its accounts), under ``domain``."""
    domain = domain or setting.trail.domain
    by_address = {m.address: m for m in [*setting.miners, setting.outsider]}
    signers = tuple(a for a in committee if a in by_address)
    return AnchorCertificate(
        approval,
        committee,
        signers,
        tuple(approval.sign(by_address[a], domain) for a in signers),
    )


def _field(name: str, error: str, zero_error: str | None = None) -> tuple:
    """Replace a signed field of the statement, keep the honest signatures.

    ``zero_error`` is the error when the drawn replacement is the zero hash, where the
    contract checks that first.
    """

    def mutate(setting, cert, value):
        old = getattr(cert.approval, name)
        new = value if isinstance(old, bytes) else (old + 1 + value[0])
        if new == old:
            new = bytes(31) + b"\x01" if isinstance(old, bytes) else old + 1
        return dataclasses.replace(
            cert, approval=dataclasses.replace(cert.approval, **{name: new})
        ), None

    return (f"{name} replaced", mutate, error, zero_error)


def _committee_root(setting, cert, value):
    return dataclasses.replace(
        cert, approval=dataclasses.replace(cert.approval, committee_root=value)
    ), None


def _other_run(setting, cert, value):
    domain = setting.trail.domain
    other = dataclasses.replace(domain, run=value)
    return _signed(cert.approval, cert.committee, setting, other), None


def _reversed_committee(setting, cert, value):
    return dataclasses.replace(cert, committee=tuple(reversed(cert.committee))), None


def _dropped_member(setting, cert, value):
    return dataclasses.replace(cert, committee=cert.committee[: -1 - value[0] % 2]), None


def _added_outsider(setting, cert, value):
    committee = tuple(sorted((*cert.committee, setting.outsider.address), key=lambda a: int(a, 16)))
    return dataclasses.replace(cert, committee=committee), None


def _empty_committee(setting, cert, value):
    return dataclasses.replace(cert, committee=(), signers=(), signatures=()), None


def _below_quorum(setting, cert, value):
    keep = value[0] % 3  # 0..2 of 5: the quorum is 4
    return dataclasses.replace(
        cert, signers=cert.signers[:keep], signatures=cert.signatures[:keep]
    ), None


def _duplicated_signature(setting, cert, value):
    index = value[0] % (len(cert.signatures) - 1)
    signatures = list(cert.signatures)
    signatures[index + 1] = signatures[index]
    return dataclasses.replace(cert, signatures=tuple(signatures)), None


def _swapped_signatures(setting, cert, value):
    index = value[0] % (len(cert.signatures) - 1)
    signatures = list(cert.signatures)
    signatures[index], signatures[index + 1] = signatures[index + 1], signatures[index]
    return dataclasses.replace(cert, signatures=tuple(signatures)), None


def _truncated_signatures(setting, cert, value):
    cut = 1 + value[0] % 64
    signatures = (*cert.signatures[:-1], cert.signatures[-1][:-cut])
    return dataclasses.replace(cert, signatures=signatures), None


def _high_s(setting, cert, value):
    index = value[0] % len(cert.signatures)
    original = cert.signatures[index]
    s = int.from_bytes(original[32:64], "big")
    flipped = original[:32] + (CURVE_ORDER - s).to_bytes(32, "big") + bytes([55 - original[64]])
    signatures = list(cert.signatures)
    signatures[index] = flipped
    return dataclasses.replace(cert, signatures=tuple(signatures)), None


def _outsider_signs(setting, cert, value):
    """The outsider signs in place of the last miner (it is not in the committee)."""
    signatures = (*cert.signatures[:-1], cert.approval.sign(setting.outsider, setting.trail.domain))
    return dataclasses.replace(cert, signatures=signatures), None


def _reason(setting, cert, value):
    return cert, cert.approval.reason + value.hex()[:8]


COMMON: list[tuple] = [
    _field("round", "UnexpectedRound"),
    _field("state_root", "SignerNotInCommittee"),
    ("committee root replaced", _committee_root, "CommitteeRootMismatch"),
    ("signed in another run", _other_run, "SignerNotInCommittee"),
    ("committee reversed", _reversed_committee, "CommitteeNotSorted"),
    ("a member dropped", _dropped_member, "CommitteeRootMismatch"),
    ("an outsider added", _added_outsider, "CommitteeRootMismatch"),
    ("committee empty", _empty_committee, "InvalidCommitteeSize"),
    ("signatures below the quorum", _below_quorum, "QuorumNotReached"),
    ("a signature duplicated", _duplicated_signature, "SignaturesNotSorted"),
    ("two signatures swapped", _swapped_signatures, "SignaturesNotSorted"),
    ("the signatures truncated", _truncated_signatures, "MalformedSignatures"),
    ("a high-s signature", _high_s, "InvalidSignature"),
    ("an outsider's signature", _outsider_signs, "SignerNotInCommittee"),
]
COMMIT = [
    *COMMON,
    _field("model_hash", "SignerNotInCommittee", zero_error="ZeroModelHash"),
    _field("previous_hash", "BrokenHashLink"),
    _field("accepted_root", "SignerNotInCommittee"),
    _field("timestamp", "SignerNotInCommittee"),
]
ROLLBACK = [
    *COMMON,
    _field("kept_model_hash", "BrokenHashLink"),
    ("reason edited", _reason, "ReasonMismatch"),
]


def _call(setting: Setting, cert: AnchorCertificate, reason: str | None, sender: str):
    functions = setting.trail.contract.functions
    if reason is None and hasattr(cert.approval, "model_hash"):
        function = functions.anchorRound(
            cert.approval.as_contract_tuple(), list(cert.committee), cert.packed_signatures
        )
    else:
        function = functions.recordRollback(
            cert.approval.as_contract_tuple(),
            list(cert.committee),
            cert.packed_signatures,
            reason if reason is not None else cert.approval.reason,
        )
    return rejection_for(setting.trail, function, sender)


def _expected(mutation: tuple, value: bytes) -> tuple[str, Mutate, str]:
    """The mutation's name, function and the error it must revert with for ``value``."""
    name, mutate, error, *zero_error = mutation
    if zero_error and zero_error[0] and value == bytes(32):
        error = zero_error[0]
    return name, mutate, error


FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


CASES = [("commit", m) for m in COMMIT] + [("rollback", m) for m in ROLLBACK]
"""Each mutation, with the honest certificate (of a commit or a rollback) it mutates."""


@FUZZ
@given(case=st.sampled_from(CASES), value=st.binary(min_size=32, max_size=32))
def test_a_mutated_anchor_or_rollback_reverts_with_its_custom_error(setting, case, value):
    which, mutation = case
    name, mutate, error = _expected(mutation, value)
    cert, reason = mutate(setting, getattr(setting, which), value)
    rejected = _call(setting, cert, reason, setting.trail.connection.operator.address)
    assert rejected.error_name == error, f"{which}, {name}: {rejected}"


@pytest.mark.parametrize("which", ["commit", "rollback"])
def test_anyone_but_the_operator_sending_an_honest_certificate_is_refused(setting, which):
    cert = getattr(setting, which)
    reason = None if which == "commit" else cert.approval.reason
    rejected = _call(setting, cert, reason, setting.outsider.address)
    assert rejected.error_name == "NotOwner"
