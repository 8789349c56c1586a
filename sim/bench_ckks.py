"""Benchmark CKKS mode against plaintext for the MNIST CNN (about 20.5k parameters).

Measures, in one run:

- the baseline: TenSEAL's raw operations on one 4096-slot ciphertext (encrypt, add,
  and dot product = multiply + rotate-and-sum);
- one client's round: what it sends (plaintext float32 bytes vs serialised
  ciphertexts), what it receives (the global model), its time (decrypt the global,
  encrypt the update) and the server's time per client (deserialise, weight, add);
- encrypted screening as the number of clients grows: the homomorphic Gram matrix,
  the committee's decryption and the bytes it receives, against the plaintext Gram
  (screening, bounds and candidates are computed from the Gram matrix in both modes);
- the round as users see it: two real ``flwr run`` federations of the grid's label-flip
  30% cell (MNIST, 20 clients, Dirichlet 0.5, BCSFL), one plaintext and one with
  ``ckks=true``. A round's wall time is the sum of its record's ``timing`` (training,
  decision, committee, anchoring; see :mod:`bcsfl_flower.round.timing`), the median
  over rounds 2 to ``--rounds`` (round 1 also loads data and keys). The plaintext
  server's evaluation of the global model is left out: a CKKS server cannot do it.

Times are printed in milliseconds and as multiples of the raw operations measured in
the same run, so the ratios carry over to other machines. The last line is the
encrypted round's wall time over the plaintext round's.

Usage::

    python -m sim.bench_ckks --data-dir ../shared/data   # about 4 minutes on 2 cores
    python -m sim.bench_ckks --clients 2 5 --repeats 3 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
from flwr.app import Array, ArrayRecord

from bcsfl_flower.privacy.ckks import (
    ENCRYPTED_ARRAY_KEY,
    EncryptedModel,
    add_plain,
    decrypt_arrays,
    encrypt_arrays,
    to_array_record,
    weighted_mean,
)
from bcsfl_flower.privacy.ckks_keys import (
    create_secret_context,
    load_public_context,
    public_context,
    slot_count,
)
from bcsfl_flower.privacy.encrypted_screening import decrypt_gram, encrypted_gram, gram_to_cosine
from bcsfl_vision.launch import run_federation
from bcsfl_vision.results import RESULTS_FILE
from bcsfl_vision.task.models import MnistCNN
from sim.experiments import add_data_dir_argument
from sim.grid import LABEL_FLIP, ExperimentSpec


def timed(function: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Return the median wall time in seconds over ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def model_arrays(rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    """Return random arrays with the MNIST CNN's keys and shapes."""
    shapes = {k: tuple(v.shape) for k, v in MnistCNN().state_dict().items()}
    return {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in shapes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 5, 10, 20])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each federation")
    parser.add_argument(
        "--runs-dir", type=Path, help="keep the two federations' runs here (default: discard)"
    )
    parser.add_argument(
        "--federations-only", action="store_true", help="skip the single-operation timings"
    )
    add_data_dir_argument(parser)
    args = parser.parse_args()
    if not args.federations_only:
        time_operations(args.clients, args.repeats, args.seed)
    compare_federation_rounds(args.rounds, args.data_dir, args.runs_dir)


def time_operations(clients: list[int], repeats: int, seed: int) -> None:
    """Print raw TenSEAL costs, one client's round, and encrypted screening as n grows."""
    rng = np.random.default_rng(seed)

    t_keys, secret = timed(lambda: create_secret_context(seed=b"bench-ckks-seed-0123"), 1)
    t_public, public_bytes = timed(lambda: public_context(secret), 1)
    server = load_public_context(public_bytes)
    slots = slot_count(secret)

    # Baseline: raw TenSEAL operations on one full ciphertext.
    x, y = rng.normal(size=slots) * 0.01, rng.normal(size=slots) * 0.01
    t_enc, cx = timed(lambda: ts.ckks_vector(server, x), repeats)
    cy = ts.ckks_vector(server, y)
    t_add, _ = timed(lambda: cx + cy, repeats)
    t_dot, _ = timed(lambda: cx.dot(cy), repeats)
    print(f"CKKS N=8192 ({slots} slots), coeff (60, 40, 40, 60), scale 2^40")
    print(
        f"one-time: secret context {t_keys * 1e3:.0f} ms, public context "
        f"{t_public * 1e3:.0f} ms, {len(public_bytes) / 1e6:.2f} MB to the server"
    )
    print(
        f"baseline (one ciphertext): encrypt {t_enc * 1e3:.2f} ms, add {t_add * 1e3:.3f} ms, "
        f"dot {t_dot * 1e3:.2f} ms"
    )

    # One client's round.
    initial = model_arrays(rng, 0.1)
    update = model_arrays(rng, 0.01)
    num_params = sum(a.size for a in initial.values())
    plain_bytes = sum(a.nbytes for a in update.values())
    t_plain_pack, _ = timed(lambda: ArrayRecord({k: Array(v) for k, v in update.items()}), repeats)
    t_encrypt, encrypted = timed(lambda: encrypt_arrays(update, secret), repeats)
    t_serialize, sent = timed(encrypted.serialize, repeats)
    t_deserialize, received = timed(lambda: EncryptedModel.deserialize(sent, server), repeats)
    t_server_aggregate, aggregate = timed(lambda: weighted_mean([received], [1]), repeats)
    global_model = add_plain(aggregate, initial)
    global_bytes = global_model.serialize()
    t_decrypt, _ = timed(
        lambda: decrypt_arrays(EncryptedModel.deserialize(global_bytes, secret), secret),
        repeats,
    )
    record_bytes = len(to_array_record(encrypted)[ENCRYPTED_ARRAY_KEY].data)
    client_time = t_decrypt + t_encrypt + t_serialize
    server_time = t_deserialize + t_server_aggregate
    print(
        f"\nper client-round, MNIST CNN ({num_params} parameters, "
        f"{len(encrypted.chunks)} ciphertexts)"
    )
    print(
        f"  sent to server   plaintext {plain_bytes / 1e3:8.1f} kB   CKKS "
        f"{len(sent) / 1e3:8.1f} kB (ArrayRecord {record_bytes / 1e3:.1f} kB)   "
        f"ratio {len(sent) / plain_bytes:5.1f}x"
    )
    print(
        f"  global received  plaintext {plain_bytes / 1e3:8.1f} kB   CKKS "
        f"{len(global_bytes) / 1e3:8.1f} kB   ratio {len(global_bytes) / plain_bytes:5.1f}x"
    )
    print(
        f"  client: decrypt global {t_decrypt * 1e3:.1f} ms + encrypt update "
        f"{t_encrypt * 1e3:.1f} ms + serialise {t_serialize * 1e3:.1f} ms = "
        f"{client_time * 1e3:.1f} ms = {client_time / t_enc:.1f}x raw encrypt "
        f"(plaintext ArrayRecord: {t_plain_pack * 1e3:.2f} ms)"
    )
    print(
        f"  server per client: deserialise {t_deserialize * 1e3:.1f} ms + weight and add "
        f"{t_server_aggregate * 1e3:.1f} ms = {server_time * 1e3:.1f} ms "
        f"= {server_time / t_add:.0f}x raw add"
    )

    # Encrypted screening as n grows.
    print(
        "\nencrypted screening (Gram matrix of n updates; the committee decrypts only the"
        " packed Gram entries; 'x per-chunk dots' compares with a TenSEAL dot per chunk"
        " and pair)"
    )
    print(
        f"{'n':>4} {'pairs':>6} {'plain ms':>9} {'HE gram s':>10} {'per pair ms':>12} "
        f"{'x raw dot':>10} {'x per-chunk dots':>17} {'decrypt ms':>11} "
        f"{'to committee kB':>16} {'max |cos err|':>14}"
    )
    direction = model_arrays(rng, 0.02)
    for n in clients:
        updates = [
            {k: direction[k] + v for k, v in model_arrays(rng, 0.01).items()} for _ in range(n)
        ]
        matrix = np.stack(
            [np.concatenate([a.ravel() for a in u.values()]) for u in updates]
        ).astype(np.float64)
        t_plain, plain_gram = timed(lambda m=matrix: m @ m.T, repeats)
        received = [
            EncryptedModel.deserialize(encrypt_arrays(u, secret).serialize(), server)
            for u in updates
        ]
        t_gram, gram = timed(lambda r=received: encrypted_gram(r), 1)
        gram_bytes = gram.serialize()
        t_decrypt_gram, decrypted = timed(lambda g=gram: decrypt_gram(g, secret), repeats)
        error = np.abs(gram_to_cosine(decrypted) - gram_to_cosine(plain_gram)).max()
        pairs = n * (n + 1) // 2
        per_chunk_dots = pairs * len(encrypted.chunks) * t_dot  # TenSEAL's dot per chunk
        print(
            f"{n:>4} {pairs:>6} {t_plain * 1e3:>9.2f} {t_gram:>10.2f} "
            f"{t_gram / pairs * 1e3:>12.1f} {t_gram / t_dot:>10.0f} "
            f"{t_gram / per_chunk_dots:>17.2f} {t_decrypt_gram * 1e3:>11.2f} "
            f"{len(gram_bytes) / 1e3:>16.1f} {error:>14.2e}"
        )


def round_timings(results: Mapping[str, Any]) -> list[dict[str, float]]:
    """Return the ``timing`` of every round after the first, from ``results.json``.

    Each is split into training (messages out to replies in), decision, committee and
    anchoring; their sum is the round's wall time.
    """
    return [
        record["timing"]
        for key, record in sorted(results["rounds"].items(), key=lambda item: int(item[0]))
        if int(key) > 1 and "timing" in record
    ]


def compare_federation_rounds(num_rounds: int, data_dir: Path, runs_dir: Path | None) -> None:
    """Run the plaintext and the CKKS federation and print their round wall times."""
    spec = ExperimentSpec("bcsfl", LABEL_FLIP, 0.3, num_rounds=num_rounds)
    print(
        f"\nreal federations: {spec.run_id} for {num_rounds} rounds, plaintext and "
        "ckks=true (round wall = training + decision + committee + anchoring, median of "
        "rounds 2+)"
    )
    medians = {}
    with tempfile.TemporaryDirectory(prefix="bench-ckks-") as scratch:
        for mode, extra in (("plaintext", {}), ("CKKS", {"ckks": True})):
            run_dir = Path(runs_dir or scratch) / mode
            run_federation(
                run_dir,
                num_supernodes=spec.num_clients,
                run_config={**spec.run_config(), **extra},
                data_dir=data_dir,
                stream=False,
            )
            results = json.loads((run_dir / RESULTS_FILE).read_text())
            timings = round_timings(results)
            parts = {
                part: statistics.median(timing.get(part, 0.0) for timing in timings)
                for part in ("training_s", "decision_s", "committee_s", "anchoring_s")
            }
            medians[mode] = statistics.median(sum(timing.values()) for timing in timings)
            print(
                f"  {mode:>9}: round {medians[mode]:.2f} s ("
                + ", ".join(f"{part[:-2]} {value:.2f}" for part, value in parts.items())
                + ")"
            )
    ratio = medians["CKKS"] / medians["plaintext"]
    print(f"CKKS/plaintext round wall {ratio:.2f}x ({spec.num_clients} clients)")


if __name__ == "__main__":
    main()
