"""Validators' signed ballots: what each validator measured, as EIP-712 typed data.

A validator scores the current global model ``w_t`` and every candidate on its own
data. Its :class:`Ballot` signs, for one run and one round, the hash of ``w_t`` (the
previous hash) and each scored model's hash with the loss it measured. A vote is not a
separate field: a validator accepts a candidate when the loss delta clears the round's
tolerance (:func:`~bcsfl_flower.round.consensus.accepts`), a pure function of the signed
losses and the statement's settings, so signing the losses signs the votes and no
validator can sign a vote that contradicts its own measurement.

Losses travel as the 64 bits of their IEEE-754 double (``uint64`` in the typed data):
the decision compares losses exactly, a decimal rendering would round them, and a
missing loss (NaN) has a bit pattern too.

Ballots are checked like packets (:func:`ballot_fault`): the signer is the validator it
names, a drawn validator of the round, and its ballot names the round's run (the domain),
round and previous hash; the statement holds one ballot per validator.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from eth_account.messages import SignableMessage
from eth_account.signers.local import LocalAccount
from eth_utils import is_address, to_checksum_address
from flwr.app import ConfigRecord

from bcsfl_flower.packets import (
    RUN_MEMBER,
    SIGNATURE_BYTES,
    Eip712Domain,
    check_hash,
    from_hex,
    recover_signer,
    to_hex,
    typed_data_digest,
    typed_fields,
)

BALLOT_TYPES: dict[str, list[dict[str, str]]] = {
    "Ballot": [
        RUN_MEMBER,
        {"name": "round", "type": "uint64"},
        {"name": "validator", "type": "address"},
        {"name": "previousHash", "type": "bytes32"},
        {"name": "models", "type": "bytes32[]"},
        {"name": "losses", "type": "uint64[]"},
    ]
}
"""EIP-712 types of a validator's ballot."""

BALLOT_RECORD_KEY = "bcsfl.ballot"
"""Committee duty reply: the ConfigRecord with the validator's signed ballot."""

_DOUBLE = struct.Struct("<d")
_U64 = struct.Struct("<Q")


def loss_bits(loss: float) -> int:
    """Return the 64 bits of ``loss`` as an IEEE-754 double (the ballot's encoding)."""
    return int(_U64.unpack(_DOUBLE.pack(float(loss)))[0])


def loss_from_bits(bits: int) -> float:
    """Return the double whose 64 bits are ``bits`` (inverse of :func:`loss_bits`)."""
    return float(_DOUBLE.unpack(_U64.pack(bits))[0])


@dataclass(frozen=True)
class Ballot:
    """A validator's statement "on my data, these models have these losses".

    Attributes
    ----------
    round : int
        The round.
    validator : str
        The signing validator's address (stored checksummed).
    previous_hash : bytes
        Hash of ``w_t``, the model the round starts from (also one of ``models``).
    models : tuple[bytes, ...]
        Hash of every model scored, ``w_t`` included, in the order scored.
    losses : tuple[float, ...]
        The loss measured on each, NaN where none was measured.
    """

    round: int
    validator: str
    previous_hash: bytes
    models: tuple[bytes, ...]
    losses: tuple[float, ...]

    def __post_init__(self) -> None:
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise ValueError(f"round must be an int >= 0, got {self.round!r}")
        if not isinstance(self.validator, str) or not is_address(self.validator):
            raise ValueError(f"validator must be an address, got {self.validator!r}")
        object.__setattr__(self, "validator", to_checksum_address(self.validator))
        check_hash("previous_hash", self.previous_hash)
        for model in self.models:
            check_hash("model hash", model)
        if len(self.models) != len(self.losses) or len(set(self.models)) != len(self.models):
            raise ValueError("a ballot needs one loss per model, and each model once")
        if not all(isinstance(loss, float) for loss in self.losses):
            raise ValueError(f"losses must be floats, got {self.losses!r}")

    def loss_of(self) -> dict[bytes, float]:
        """Return model hash -> loss."""
        return dict(zip(self.models, self.losses, strict=True))

    def signable(self, domain: Eip712Domain) -> SignableMessage:
        """Return the EIP-712 message for this ballot under ``domain``."""
        return domain.signable(
            BALLOT_TYPES,
            {
                "round": self.round,
                "validator": self.validator,
                "previousHash": self.previous_hash,
                "models": list(self.models),
                "losses": [loss_bits(loss) for loss in self.losses],
            },
        )

    def sign(self, account: LocalAccount, domain: Eip712Domain) -> SignedBallot:
        """Sign the ballot; ``account`` must be its validator."""
        if account.address != self.validator:
            raise ValueError(f"account {account.address} cannot sign {self.validator}'s ballot")
        return SignedBallot(self, bytes(account.sign_message(self.signable(domain)).signature))


@dataclass(frozen=True)
class SignedBallot:
    """A :class:`Ballot` with its 65-byte signature."""

    ballot: Ballot
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_BYTES:
            raise ValueError(f"signature must be {SIGNATURE_BYTES} bytes")

    def recover(self, domain: Eip712Domain) -> str:
        """Return the checksummed address that signed the ballot under ``domain``."""
        return recover_signer(self.ballot.signable(domain), self.signature)

    def digest(self, domain: Eip712Domain) -> bytes:
        """Return the ballot's EIP-712 digest under ``domain``."""
        return typed_data_digest(self.ballot.signable(domain))

    def to_fields(self) -> dict[str, Any]:
        """Return the ballot as the statement records it (JSON: hex, losses as bits)."""
        ballot = self.ballot
        return {
            "round": ballot.round,
            "validator": ballot.validator,
            "previous_hash": to_hex(ballot.previous_hash),
            "models": [to_hex(model) for model in ballot.models],
            "loss_bits": [loss_bits(loss) for loss in ballot.losses],
            "signature": to_hex(self.signature),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> SignedBallot:
        """Rebuild a ballot from :meth:`to_fields`.

        Raises
        ------
        ValueError
            If a field is missing or malformed, naming it.
        """
        try:
            ballot = Ballot(
                round=int(fields["round"]),
                validator=str(fields["validator"]),
                previous_hash=from_hex(fields["previous_hash"]),
                models=tuple(from_hex(model) for model in fields["models"]),
                losses=tuple(loss_from_bits(int(bits)) for bits in fields["loss_bits"]),
            )
            return cls(ballot, from_hex(fields["signature"]))
        except KeyError as err:
            raise ValueError(f"ballot lacks the field {err.args[0]!r}") from err
        except (TypeError, struct.error, OverflowError) as err:
            raise ValueError(f"malformed ballot: {err}") from err

    def to_config_record(self) -> ConfigRecord:
        """Return the ballot as a ConfigRecord (a duty reply's :data:`BALLOT_RECORD_KEY`)."""
        ballot = self.ballot
        return ConfigRecord(
            {
                "round": ballot.round,
                "validator": ballot.validator,
                "previous-hash": ballot.previous_hash,
                "models": list(ballot.models),
                "loss-bits": [loss_bits(loss) for loss in ballot.losses],
                "signature": self.signature,
            }
        )

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> SignedBallot:
        """Parse :meth:`to_config_record`; a client's garbage raises ``ValueError``."""
        try:
            models, bits = record["models"], record["loss-bits"]
            if not isinstance(models, list) or not isinstance(bits, list):
                raise ValueError("'models' and 'loss-bits' must be lists")
            fields = typed_fields(
                record,
                "ballot",
                (
                    ("round", int),
                    ("validator", str),
                    ("previous-hash", bytes),
                    ("signature", bytes),
                ),
            )
            ballot = Ballot(
                round=fields["round"],
                validator=fields["validator"],
                previous_hash=fields["previous_hash"],
                # read from the checked fields above; Ballot checks each element itself
                models=tuple(models),  # type: ignore[arg-type]
                losses=tuple(loss_from_bits(int(b)) for b in bits),
            )
            return cls(ballot, fields["signature"])
        except KeyError as err:
            raise ValueError(f"ballot record lacks the field {err.args[0]!r}") from err
        except (TypeError, struct.error, OverflowError) as err:
            raise ValueError(f"malformed ballot record: {err}") from err


def ballot_fault(
    signed: SignedBallot,
    domain: Eip712Domain,
    round_number: int,
    previous_hash: bytes,
    validator: str,
) -> str | None:
    """Return why ``signed`` is not a valid ballot of ``validator`` in this round, or None.

    ``validator`` is the drawn validator's identity (its address): a ballot by anyone
    else, of another round or run, or from another starting model does not count.
    """
    ballot = signed.ballot
    try:
        signer = signed.recover(domain)
    except ValueError as err:
        return f"the ballot's signature is invalid: {err}"
    if signer != ballot.validator:
        return f"the ballot names {ballot.validator} but was signed by {signer} (another run?)"
    if signer != validator:
        return f"the ballot is {signer}'s, not the drawn validator {validator}'s"
    if ballot.round != round_number:
        return f"the ballot is for round {ballot.round}, not {round_number}"
    if ballot.previous_hash != previous_hash:
        return (
            f"the ballot starts from 0x{ballot.previous_hash.hex()}, the round from "
            f"0x{previous_hash.hex()}"
        )
    return None
