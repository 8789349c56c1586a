"""A round's settlement, re-derived from its anchored statement.

The round settles stakes once, at its end, by :func:`~bcsfl_flower.round.stakes.settle`.
Everything that settlement follows from is in the round's statement, under the hash
the miners signed and the chain records:

* the stake table before the round, by identity;
* the screen's classes: the draw's candidates, and the set-apart ones among them (the
  rest it trusted);
* the clients rejected by a check or by screening;
* the ballots, from which :func:`~bcsfl_flower.round.conclusion.conclude` gives the
  decision (whom the committed candidate drew on, whom a rollback suspects);
* the stake policy.

The chain adds one fact, whether the round committed (a commit the miners did not
certify is recorded as a rollback). :func:`stated_settlement` applies
:func:`~bcsfl_flower.round.stakes.stake_changes`, the rules the round itself applies, to
these. So ``bcsfl audit verify`` checks that each statement's stake table is the one the
round before it settled, and a stopped run resumes from the last recorded round's
settlement without reading anything unverified.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from bcsfl_flower.packets import Eip712Domain
from bcsfl_flower.round.conclusion import conclude
from bcsfl_flower.round.stakes import StakeChanges, settle, stake_changes
from bcsfl_flower.round.state import Settlement
from bcsfl_flower.round.statement import RoundStatement, identity_of


def stated_changes(
    statement: RoundStatement,
    committed: bool,
    domain: Eip712Domain | None,
    earlier_identities: Mapping[str, str] | None = None,
) -> StakeChanges:
    """Return whom the round rewarded and slashed, by identity.

    Parameters
    ----------
    statement : RoundStatement
        The round's anchored statement.
    committed : bool
        Whether the chain records the round as anchored (False for a rollback).
    domain : Eip712Domain | None
        The trail's signing domain, which the ballots are checked against.
    earlier_identities : Mapping[str, str], optional
        Node id -> identity from the earlier rounds' statements: a client rejected by a
        check has no accepted reply in this statement, but its node may have signed
        before, and the round slashed that identity's stake.
    """
    decision, _ = conclude(statement, domain)
    identity = [reply.identity for reply in statement.replies]
    known = {**(earlier_identities or {}), **{r.node: r.identity for r in statement.replies}}

    def identities(rows: Iterable[int]) -> list[str]:
        return [identity[row] for row in rows]

    set_apart = set(statement.set_apart)
    return stake_changes(
        trusted=[c for c in statement.candidates if c not in set_apart],
        set_apart=statement.set_apart,
        rejected=[known.get(node, identity_of(node, None)) for node in statement.rejected],
        support=identities(decision.support) if committed else (),
        suspects=identities(decision.suspects),
        committed=committed,
    )


def stated_settlement(
    statement: RoundStatement,
    committed: bool,
    domain: Eip712Domain | None,
    earlier_identities: Mapping[str, str] | None = None,
) -> Settlement:
    """Return the stake table the round settled, by identity (see :func:`stated_changes`)."""
    changes = stated_changes(statement, committed, domain, earlier_identities)
    return settle(statement.stakes, changes, statement.settings.stake_policy)


class NodeIdentities:
    """Node id -> identity as the rounds so far left it: an address is its latest node's.

    The round's ledger follows an address to the node that signed for it last; the
    node it left keeps its stake as an unsigned ``node:`` identity.
    """

    def __init__(self) -> None:
        self._node_of: dict[str, str] = {}

    def add(self, statement: RoundStatement) -> None:
        """Record the round's accepted replies."""
        self._node_of.update(statement.node_of())

    def as_dict(self) -> dict[str, str]:
        """Return node id -> identity."""
        return {node: identity for identity, node in self._node_of.items()}
