"""Benchmark the on-chain audit trail: gas per anchored round and anchoring latency.

Measures, in one run:

- gas per ``anchorRound`` with 10, 100 and 1000 registered clients and a committee of 5
  miners, for the certificate BCSFL sends (the quorum of 4 approvals, see
  ``AnchorCertificate.build``), in the first anchor of a contract and in later rounds,
  on a fresh anvil per size; the roots are full 32-byte hashes, as in a real round (a
  zero byte of calldata costs 4 gas, any other 16);
- latency of one anchor, from ``AuditTrail.anchor_round`` to the confirmed receipt, on
  anvil and on the embedded py-evm chain, against a baseline measured in the same run
  on the same chain: a plain ETH transfer sent and confirmed through the same
  ``ChainConnection.send`` path.

Latencies are printed as medians in milliseconds and as multiples of the baseline, so
the ratios carry over to other machines.

Usage::

    python sim/bench_anchor.py                 # 10, 100 and 1000 clients, 20 rounds
    python sim/bench_anchor.py --rounds 50 --clients 10 1000

The last line is ``gas per anchored round: N (5 miners, max over 10..1000 clients)``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from eth_account.signers.local import LocalAccount
from eth_utils import keccak

from bcsfl_flower.chain.audit import AuditTrail
from bcsfl_flower.chain.backends import ChainConnection, connect
from bcsfl_flower.chain.certificates import AnchorCertificate
from bcsfl_flower.chain.keys import client_dev_account, dev_account
from bcsfl_flower.packets import model_hash

COMMITTEE = 5


def toy_model(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((4, 4), value, dtype=np.float32)}


def certificate(
    trail: AuditTrail, round_number: int, miners: list[LocalAccount]
) -> AnchorCertificate:
    """Every miner approves; the certificate keeps the quorum, as the notary's does."""
    approval = trail.prepare_approval(
        round_number,
        model_hash(toy_model(float(round_number))),
        keccak(b"accepted packets %d" % round_number),
        [m.address for m in miners],
        keccak(b"state statement %d" % round_number),
        # Fixed, so the calldata is byte-identical across sizes; no zero byte (a zero byte
        # of calldata is cheaper), as in a timestamp of this decade.
        timestamp=0x69696969 + round_number,
    )
    signatures = {m.address: approval.sign(m, trail.domain) for m in miners}
    return AnchorCertificate.build(approval, [m.address for m in miners], signatures, trail.domain)


def setup(connection: ChainConnection, clients: int) -> tuple[AuditTrail, list[LocalAccount]]:
    accounts = [client_dev_account(i) for i in range(clients)]
    trail = AuditTrail.deploy(connection, model_hash(toy_model(0.0)))
    trail.register_clients({account.address: 1 for account in accounts})
    return trail, accounts[:COMMITTEE]


def measure_gas(sizes: list[int], workdir: Path) -> int:
    """Print gas per anchor for each size and return the largest."""
    print(f"Gas per anchorRound (committee of {COMMITTEE} miners, anvil)")
    print(f"{'clients':>8} {'signatures':>10} {'first round':>12} {'later rounds':>13}")
    worst = 0
    for clients in sizes:
        with connect("anvil", workdir / f"gas-{clients}") as connection:
            trail, miners = setup(connection, clients)
            anchored = [trail.anchor_round(certificate(trail, r, miners)) for r in (1, 2, 3)]
        gas = [a.gas_used for a in anchored]
        later = "/".join(str(g) for g in sorted(set(gas[1:])))
        print(f"{clients:>8} {len(anchored[0].signers):>10} {gas[0]:>12} {later:>13}")
        worst = max(worst, *gas)
    return worst


def transfer_ms(connection: ChainConnection) -> float:
    recipient = dev_account(19).address
    start = time.perf_counter()
    tx = {
        "from": connection.operator.address,
        "to": recipient,
        "value": 1,
        "gas": 21_000,
        "maxFeePerGas": connection.web3.eth.gas_price * 2,
        "maxPriorityFeePerGas": 1,
    }
    receipt = connection.send(tx)
    assert receipt["status"] == 1
    return (time.perf_counter() - start) * 1000


def anchor_ms(trail: AuditTrail, round_number: int, miners: list[LocalAccount]) -> float:
    cert = certificate(trail, round_number, miners)  # signing is the miners' work
    start = time.perf_counter()
    trail.anchor_round(cert)
    return (time.perf_counter() - start) * 1000


def measure_latency(backend: str, rounds: int, workdir: Path) -> tuple[float, float]:
    with connect(backend, workdir / f"latency-{backend}") as connection:
        trail, miners = setup(connection, 10)
        transfer_ms(connection)  # warm-up
        anchors, transfers = [], []
        for round_number in range(1, rounds + 1):
            transfers.append(transfer_ms(connection))
            anchors.append(anchor_ms(trail, round_number, miners))
    return statistics.median(anchors), statistics.median(transfers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        worst = measure_gas(args.clients, workdir)
        print()
        print(f"Anchoring latency, median of {args.rounds} rounds (10 clients, quorum certificate)")
        print(f"{'backend':>9} {'anchor ms':>10} {'transfer ms':>12} {'anchor/transfer':>16}")
        results = {}
        for backend in ("anvil", "embedded"):
            anchor, transfer = measure_latency(backend, args.rounds, workdir)
            results[backend] = anchor
            print(f"{backend:>9} {anchor:>10.1f} {transfer:>12.1f} {anchor / transfer:>16.2f}")
        print(f"embedded / anvil anchor latency: {results['embedded'] / results['anvil']:.1f}x")
    sizes = f"{min(args.clients)}..{max(args.clients)}"
    print(f"gas per anchored round: {worst} ({COMMITTEE} miners, max over {sizes} clients)")


if __name__ == "__main__":
    main()
