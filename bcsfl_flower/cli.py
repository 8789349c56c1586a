"""``bcsfl`` command line: inspect and verify a run's on-chain audit trail.

::

    bcsfl audit list                    [--run-dir DIR | --manifest FILE]
    bcsfl audit show ROUND
    bcsfl audit verify-model FILE [--round N]
    bcsfl audit verify
    bcsfl audit replay [ROUND ...]
    bcsfl audit report [RUN_DIR] [--out FILE]

Every command reads the run's ``chain.json`` (written by the strategy next to its other
outputs; see :class:`~bcsfl_flower.chain.audit.ChainManifest`) and reconnects to the
chain read-only: an embedded run's transaction journal is replayed into a fresh
in-process EVM (which re-executes, and so re-checks, every transaction), an anvil run's
state dump is loaded into a temporary anvil, and a URL is dialled.

``verify`` exits non-zero on any mismatch: a gap or duplicate in the round sequence, a
broken hash link, a certificate that does not recover to a quorum of distinct,
registered committee members under this chain's and contract's EIP-712 domain, a
contract record that disagrees with the transaction that wrote it, or a stored model
that is missing or does not re-hash to its anchored hash, a state statement that
does not hash to its anchored root, or a committee that is not the stake-weighted draw.

``replay`` recomputes rounds (every round by default) from their stored updates and
signed ballots (:mod:`~bcsfl_flower.audit.replay`) and exits non-zero with the first
difference.

``report`` writes the run's explorer page (:mod:`~bcsfl_flower.audit.explorer`): one
self-contained HTML file with every round marked as ``verify`` judged it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from bcsfl_flower.audit.explorer.page import REPORT_FILE, write_page
from bcsfl_flower.audit.replay import ReplayMismatchError, replay_round
from bcsfl_flower.audit.run_results import RESULTS_FILE, RunResults
from bcsfl_flower.audit.verification import load_statement, timeline, verify_trail
from bcsfl_flower.chain.audit import AuditTrail, ChainManifest
from bcsfl_flower.chain.backends import BACKEND_ANVIL, BACKEND_EMBEDDED
from bcsfl_flower.chain.certificates import AnchoredRound
from bcsfl_flower.chain.errors import ChainUnavailableError, RoundNotAnchoredError
from bcsfl_flower.chain.head import TrailHead
from bcsfl_flower.chain.model_store import ModelIntegrityError, ModelStore, load_model_file
from bcsfl_flower.packets import model_hash, to_hex
from bcsfl_flower.round.conclusion import conclude

MANIFEST_NAME = "chain.json"
"""File name of the chain manifest inside a run's output directory."""

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``bcsfl`` command line; return the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_USAGE
    try:
        manifest = ChainManifest.load(_manifest_path(args))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(manifest.claims(), file=sys.stderr)
    try:
        connection, trail = manifest.open(args.chain)
    except (FileNotFoundError, ValueError, ChainUnavailableError) as err:
        print(f"error: cannot open the audit trail of {manifest.path}: {err}", file=sys.stderr)
        return EXIT_MISMATCH
    try:
        return int(args.handler(args, manifest, trail))
    finally:
        connection.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bcsfl", description="BCS-FL for Flower tools.")
    commands = parser.add_subparsers(title="commands")
    audit = commands.add_parser(
        "audit", help="inspect and verify a run's on-chain audit trail", parents=[_location()]
    )
    actions = audit.add_subparsers(title="audit commands", required=True)
    # the location options are accepted after the command too (``audit verify --run-dir D``)
    where = _location(suppress=True)

    listing = actions.add_parser(
        "list", help="list every round: anchored or rolled back", parents=[where]
    )
    listing.set_defaults(handler=_cmd_list)

    show = actions.add_parser("show", help="show one round with its certificate", parents=[where])
    show.add_argument("round", type=int, help="round number (0 is the genesis)")
    show.set_defaults(handler=_cmd_show)

    verify_model = actions.add_parser(
        "verify-model",
        help="check that a model file is the one anchored on chain",
        parents=[where],
    )
    verify_model.add_argument("file", type=Path, help="a model .npz (e.g. from the model store)")
    verify_model.add_argument("--round", type=int, help="the round it must be anchored for")
    verify_model.set_defaults(handler=_cmd_verify_model)

    verify = actions.add_parser(
        "verify",
        help="verify hash links, certificates and every stored model",
        parents=[where],
    )
    verify.add_argument(
        "--head",
        type=Path,
        help="a head recorded earlier by `bcsfl audit head`: fail unless the trail extends it",
    )
    verify.set_defaults(handler=_cmd_verify)

    head = actions.add_parser(
        "head",
        help="print the trail's head (round, hash, contract, chain, genesis) as JSON",
        parents=[where],
    )
    head.set_defaults(handler=_cmd_head)

    replay = actions.add_parser(
        "replay",
        help="recompute a round from its stored updates and ballots, compare with the chain",
        parents=[where],
    )
    replay.add_argument("rounds", type=int, nargs="*", help="round numbers (default: every round)")
    replay.set_defaults(handler=_cmd_replay)

    report = actions.add_parser(
        "report",
        help="write the run's explorer page: one HTML file, every round verified",
        parents=[where],
    )
    report.add_argument(
        "run",
        type=Path,
        nargs="?",
        metavar="RUN_DIR",
        help="the run's output directory (as --run-dir)",
    )
    report.add_argument(
        "--out", type=Path, help=f"where to write the page (default: RUN_DIR/{REPORT_FILE})"
    )
    report.set_defaults(handler=_cmd_report)
    return parser


def _location(*, suppress: bool = False) -> argparse.ArgumentParser:
    """Options that say where the run is; ``suppress`` keeps unset ones from overriding."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--run-dir",
        type=Path,
        default=argparse.SUPPRESS if suppress else Path("."),
        help=f"the run's output directory, holding {MANIFEST_NAME} (default: .)",
    )
    group.add_argument(
        "--manifest",
        type=Path,
        default=argparse.SUPPRESS if suppress else None,
        help=f"path of the run's {MANIFEST_NAME}",
    )
    parser.add_argument(
        "--chain",
        default=argparse.SUPPRESS if suppress else BACKEND_EMBEDDED,
        metavar="BACKEND",
        help=f"'{BACKEND_EMBEDDED}' (default: replay the run's journal), '{BACKEND_ANVIL}' "
        "(load its state dump into this machine's anvil) or a JSON-RPC URL: the auditor "
        f"chooses; a run directory whose {MANIFEST_NAME} claims another backend is refused",
    )
    return parser


def _manifest_path(args: argparse.Namespace) -> Path:
    if getattr(args, "run", None) is not None:  # ``report RUN_DIR``
        return Path(args.run) / MANIFEST_NAME
    return cast(Path, args.manifest if args.manifest is not None else args.run_dir / MANIFEST_NAME)


# ------------------------------------------------------------------------------------------
# list / show / verify-model
# ------------------------------------------------------------------------------------------


def _cmd_list(args: argparse.Namespace, manifest: ChainManifest, trail: AuditTrail) -> int:
    store = ModelStore(manifest.models_dir)
    stored = set(store.hashes())
    print(f"BCSFLAudit {trail.address} on chain {manifest.chain_id} ({manifest.backend})")
    print(f"{'round':>5}  {'status':<11} {'model hash':<18} {'approvals':>9}  {'gas':>7}  stored")
    genesis = manifest.genesis_hash.hex()
    print(f"{0:>5}  {'genesis':<11} 0x{genesis[:16]} {'':>9}  {'':>7}  {_yes(genesis in stored)}")
    for record in timeline(trail):
        if isinstance(record, AnchoredRound):
            digest = record.model_hash.hex()
            approvals = f"{len(record.signers)}/{len(record.committee)}"
            print(
                f"{record.round:>5}  {'anchored':<11} 0x{digest[:16]} {approvals:>9}  "
                f"{record.gas_used:>7}  {_yes(digest in stored)}"
            )
        else:
            approvals = f"{len(record.signers)}/{len(record.committee)}"
            print(
                f"{record.round:>5}  {'rolled back':<11} 0x{record.kept_model_hash.hex()[:16]} "
                f"{approvals:>9}  {'':>7}  {record.reason}"
            )
    return EXIT_OK


def _cmd_show(args: argparse.Namespace, manifest: ChainManifest, trail: AuditTrail) -> int:
    if args.round == 0:
        print(json.dumps({"round": 0, "genesis_hash": to_hex(trail.get_round(0))}, indent=2))
        return EXIT_OK
    for record in timeline(trail):
        if record.round == args.round:
            details = record.to_dict()
            details["operator_signed"] = list(record.committee) == [manifest.operator]
            if isinstance(record, AnchoredRound):
                details["model_file"] = str(ModelStore(manifest.models_dir).path(record.model_hash))
            details["statement"] = _stated(manifest, record.round, record.state_root, trail)
            results = RunResults.read(manifest.path.parent / RESULTS_FILE)
            details["unverified"] = {
                "note": f"{RESULTS_FILE} figures the trail does not hold: the operator's word",
                **results.unverified(record.round),
                "run": results.run_unverified(),
            }
            print(json.dumps(details, indent=2))
            return EXIT_OK
    print(f"error: round {args.round} is not on chain", file=sys.stderr)
    return EXIT_MISMATCH


def _stated(
    manifest: ChainManifest, round_number: int, state_root: bytes, trail: AuditTrail
) -> dict[str, Any]:
    """Return what the round's anchored statement holds, and the decision its ballots make."""
    try:
        statement = load_statement(ModelStore(manifest.models_dir), round_number, state_root)
        decision, reports = conclude(statement, trail.domain)
    except (KeyError, TypeError, ValueError) as err:
        return {"error": repr(err)}
    return {
        "rejected": dict(statement.rejected),
        "stakes": dict(statement.stakes),
        "validators": list(statement.validators),
        "miners": list(statement.miners),
        "candidates": None if statement.plan is None else dict(statement.plan.scored),
        "decision": {
            "committed": decision.committed,
            "candidate": decision.candidate,
            "votes_for": decision.votes_for,
            "quorum": decision.quorum,
            "reason": decision.reason,
        },
        "ballot_problems": {r.validator: list(r.problems) for r in reports if r.problems},
    }


def _cmd_verify_model(args: argparse.Namespace, manifest: ChainManifest, trail: AuditTrail) -> int:
    try:
        digest = model_hash(load_model_file(args.file))
    except (ModelIntegrityError, TypeError) as err:
        print(f"FAIL {err}", file=sys.stderr)
        return EXIT_MISMATCH
    if args.round is not None:
        try:
            anchored = trail.get_round(args.round)
        except RoundNotAnchoredError as err:
            print(f"FAIL round {args.round}: {err}", file=sys.stderr)
            return EXIT_MISMATCH
        if anchored != digest:
            print(
                f"FAIL {args.file} hashes to 0x{digest.hex()}, round {args.round} anchors "
                f"0x{anchored.hex()}",
                file=sys.stderr,
            )
            return EXIT_MISMATCH
        print(f"OK {args.file} is the model anchored for round {args.round} (0x{digest.hex()})")
        return EXIT_OK
    rounds = [0] if digest == manifest.genesis_hash else []
    rounds += [r.round for r in trail.anchored_rounds() if r.model_hash == digest]
    if not rounds:
        print(f"FAIL {args.file} (0x{digest.hex()}) is not anchored in any round", file=sys.stderr)
        return EXIT_MISMATCH
    print(f"OK {args.file} (0x{digest.hex()}) is anchored for round(s) {rounds}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------
# verify
# ------------------------------------------------------------------------------------------


def _cmd_verify(args: argparse.Namespace, manifest: ChainManifest, trail: AuditTrail) -> int:
    report = verify_trail(trail, manifest)
    failures = [failure.message for failure in report.failures]
    if args.head is not None:
        try:
            recorded = TrailHead.load(args.head)
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USAGE
        failures += [
            f"{problem} (head {args.head})"
            for problem in recorded.extended_by(trail, manifest.chain_id)
        ]
    for failure in failures:
        print(f"FAIL {failure}")
    for note in report.notices():
        print(f"NOTE {note}")
    if failures:
        checks = report.checks + (args.head is not None)
        print(f"audit trail INVALID: {len(failures)} of {checks} checks failed")
        return EXIT_MISMATCH
    print(
        f"audit trail OK: {report.anchored} anchored and {report.rolled_back} rolled-back "
        f"rounds, {report.checks} checks passed ({trail.address} on chain {manifest.chain_id})"
    )
    return EXIT_OK


def _cmd_head(args: argparse.Namespace, manifest: ChainManifest, trail: AuditTrail) -> int:
    print(TrailHead.read(trail, manifest.chain_id).to_json())
    return EXIT_OK


def _cmd_replay(args: argparse.Namespace, manifest: ChainManifest, trail: AuditTrail) -> int:
    for number in args.rounds or range(1, trail.latest_round() + 1):
        try:
            result = replay_round(trail, manifest, number)
        except ReplayMismatchError as err:
            print(f"FAIL {err}")
            return EXIT_MISMATCH
        outcome = "commits" if result.committed else "rolls back to"
        print(
            f"replay OK: round {result.round} {outcome} 0x{result.model_hash.hex()}, as the "
            f"chain records ({result.reason})"
        )
    return EXIT_OK


def _cmd_report(args: argparse.Namespace, manifest: ChainManifest, trail: AuditTrail) -> int:
    try:
        written = write_page(trail, manifest, args.out)
    except (OSError, ValueError) as err:
        print(f"error: cannot write the report: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"report: {written.path} ({written.size / 1e6:.2f} MB); the trail {written.verdict}")
    return EXIT_OK if written.verified else EXIT_MISMATCH


def _yes(flag: bool) -> str:
    return "yes" if flag else "MISSING"


if __name__ == "__main__":
    sys.exit(main())
