"""What an audit reads of a run directory, and what it leaves aside.

A run directory is input from whoever hands it over, so the audit reads only the
directory's own files: :func:`symbolic_links` lists every link in it, each of which
``bcsfl audit verify`` reports as a failure (a link to a pristine copy elsewhere would let
a tampered file pass). :func:`unaccounted_files` lists the files no check reads (notes,
logs, models of rounds a resumed run dropped): they are not part of the trail, and
``verify`` names them rather than letting them pass unmentioned.
:func:`deployment_record_problems` holds the chain folder's deployment record, which a
resumed run attaches by, to the manifest and the chain.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from web3.exceptions import Web3Exception

from bcsfl_flower.audit.run_results import RESULTS_FILE
from bcsfl_flower.chain.audit import DEPLOYMENT_FILE, AuditTrail, ChainManifest
from bcsfl_flower.chain.model_store import ModelStore
from bcsfl_flower.packets import to_hex


def symbolic_links(run_dir: Path) -> list[str]:
    """Return every symbolic link below ``run_dir`` (not followed), relative to it."""
    links = []
    for folder, directories, files in os.walk(run_dir, followlinks=False):
        for name in [*directories, *files]:
            path = Path(folder) / name
            if path.is_symlink():
                links.append(str(path.relative_to(run_dir)))
    return sorted(links)


def unaccounted_files(
    run_dir: Path, manifest: ChainManifest, store: ModelStore, digests: Iterable[str]
) -> list[str]:
    """Return the files below ``run_dir`` that the audit does not read, relative to it.

    Parameters
    ----------
    run_dir : Path
        The run directory (the manifest's folder).
    manifest : ChainManifest
        Its ``chain.json``, which names the chain's journal (or anvil's state) and,
        beside it, the deployment record.
    store : ModelStore
        The model store; of its files, the audit reads those named in ``digests``.
    digests : Iterable[str]
        Hex digests of the models and statements the trail names (genesis, anchored
        models, statements and the updates they hold).
    """
    chain_files = [p for p in (manifest.journal, manifest.anvil_state) if p is not None]
    read = {manifest.path.resolve(), (run_dir / RESULTS_FILE).resolve()}
    read |= {p.resolve() for p in chain_files}
    read |= {(p.parent / DEPLOYMENT_FILE).resolve() for p in chain_files}
    read |= {store.path(digest).resolve() for digest in digests}
    read |= {store.document_path(digest).resolve() for digest in digests}
    unread = []
    for folder, _, files in os.walk(run_dir, followlinks=False):
        for name in files:
            path = Path(folder) / name
            resolved = path.resolve()
            if path.is_symlink() or resolved in read:
                continue
            unread.append(str(path.relative_to(run_dir)))
    root = run_dir.resolve()
    return _by_folder(
        sorted(unread), {str(p.relative_to(root)) for p in read if p.is_relative_to(root)}
    )


def _by_folder(unread: list[str], read: set[str]) -> list[str]:
    """Name a top-level folder the audit reads nothing in once ("flwr-home/ (25 files)")."""
    read_tops = {path.split("/")[0] for path in read if "/" in path}
    grouped: dict[str, list[str]] = {}
    for path in unread:
        top = path.split("/")[0] if "/" in path else path
        grouped.setdefault(top if top not in read_tops else path, []).append(path)
    return [
        f"{key}/ ({len(paths)} files)" if "/" in paths[0] and key != paths[0] else key
        for key, paths in grouped.items()
    ]


def deployment_record_problems(trail: AuditTrail, manifest: ChainManifest) -> list[str]:
    """Return where the chain folder's ``deployment.json`` differs from the trail.

    A resumed run attaches to the contract that record names, so it must be this run's:
    its chain, contract, deployment block and transaction, genesis and operator.
    """
    chain_file = manifest.journal or manifest.anvil_state
    if chain_file is None:  # a JSON-RPC chain: its state is not in the run directory
        return []
    path = chain_file.parent / DEPLOYMENT_FILE
    label = str(path.relative_to(manifest.path.parent))
    if path.is_symlink():  # reported as a link (symbolic_links), and not followed
        return []
    if not path.exists():
        return [f"{label} is missing: a resumed run would deploy a new contract"]
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        receipt = trail.connection.web3.eth.get_transaction_receipt(record["deploy_tx"])
        recorded = {
            "chain_id": int(record["chain_id"]),
            "contract": str(record["contract"]),
            "deploy_block": int(record["deploy_block"]),
            "genesis_hash": str(record["genesis_hash"]),
            "operator": str(record["operator"]),
            "deploy_tx creates": str(receipt["contractAddress"]),
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError, Web3Exception) as err:
        return [f"{label} is not this run's deployment record: {err!r}"]
    expected = {
        "chain_id": manifest.chain_id,
        "contract": trail.address,
        "deploy_block": manifest.deploy_block,
        "genesis_hash": to_hex(manifest.genesis_hash),
        "operator": manifest.operator,
        "deploy_tx creates": trail.address,
    }
    return [
        f"{label}: {key} is {recorded[key]!r}, the trail's is {value!r}"
        for key, value in expected.items()
        if recorded[key] != value
    ]
