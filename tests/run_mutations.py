"""Every single-step tamper of a run directory, for the trail fuzzer.

:func:`mutations` enumerates, for one pristine run directory:

* every field of every JSON document (the state statements with their ballots and
  replies, ``results.json``, ``chain.json`` and the chain's deployment record): each
  leaf edited, each key deleted, each non-empty list shortened;
* every field of every journal entry (the chain's signed transactions, certificates
  included in their input), every entry deleted, duplicated or swapped with the next;
* every model file: a byte flipped, truncated, replaced by another model, deleted;
* the directory itself: each file deleted, renamed, or replaced by a symbolic link to a
  pristine copy outside the directory; each folder replaced by such a link; extra files.

A :class:`Mutation` knows the round it touches, where it can tell, so the fuzzer can
require that ``bcsfl audit verify`` names it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bcsfl_flower.audit.run_results import RESULTS_FILE
from bcsfl_flower.chain.audit import ChainManifest

Apply = Callable[[Path, Path], None]
"""Apply a mutation to a copy of the run (first argument); the second is a pristine copy
outside it, which a link may point to."""


@dataclass(frozen=True)
class Mutation:
    """One tamper: which file, where in it, what is done, and the round it concerns."""

    file: str
    where: str
    action: str
    apply: Apply
    round: int | None = None

    def __str__(self) -> str:
        return f"{self.file} {self.where}: {self.action}"


def mutations(run_dir: Path) -> list[Mutation]:
    """Return every mutation of ``run_dir`` (see the module docstring), in a stable order."""
    manifest = ChainManifest.load(run_dir / "chain.json")
    rounds = _rounds_of_documents(run_dir, manifest)
    found: list[Mutation] = []
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        name = str(path.relative_to(run_dir))
        if path.suffix == ".json":
            found += _json_mutations(name, json.loads(path.read_text()), rounds.get(name))
        elif path.suffix == ".jsonl":
            found += _journal_mutations(name, path.read_text().splitlines())
        elif path.suffix == ".npz":
            found += _model_mutations(name, rounds.get(name))
        found += _file_mutations(name, rounds.get(name))
    for folder in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        name = folder.name
        found.append(Mutation(name, "folder", "linked outside", _link_outside(name)))
    found += _extra_files(run_dir, manifest)
    return found


def _rounds_of_documents(run_dir: Path, manifest: ChainManifest) -> dict[str, int]:
    """Map each statement and results file section to the round it states."""
    rounds = {}
    for path in (run_dir / "models").glob("*.json"):
        rounds[str(path.relative_to(run_dir))] = int(json.loads(path.read_text())["round"])
    results = json.loads((run_dir / RESULTS_FILE).read_text())
    for number, entry in results["rounds"].items():
        model = entry.get("model_hash", "")[2:]
        if entry.get("outcome") == "commit":
            rounds[f"models/{model}.npz"] = int(number)
    return rounds


def _json_mutations(name: str, document: Any, round_number: int | None) -> Iterator[Mutation]:
    for where, value in _leaves(document, ()):
        touched = _round_of(name, where) or round_number
        if isinstance(value, list) and value:  # a dict's last key is deleted below
            last = len(value) - 1
            yield Mutation(
                name, _path(where), "shortened", _edit_json(name, where, _drop(last)), touched
            )
        elif not isinstance(value, dict | list):
            yield Mutation(
                name,
                _path(where),
                f"edited {value!r:.40}",
                _edit_json(name, where, _changed),
                touched,
            )
        if where and isinstance(where[-1], str):
            yield Mutation(name, _path(where), "deleted", _edit_json(name, where, None), touched)


def _round_of(name: str, where: tuple[str | int, ...]) -> int | None:
    """results.json's ``rounds/N/...`` concerns round N."""
    if name == RESULTS_FILE and len(where) >= 2 and where[0] == "rounds":
        return int(where[1])
    return None


def _leaves(
    value: Any, where: tuple[str | int, ...]
) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    """Yield every node of a JSON value with its path (containers before their items)."""
    if where:
        yield where, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*where, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, (*where, index))


def _path(where: tuple[str | int, ...]) -> str:
    return "/".join(str(part) for part in where)


def _changed(value: Any) -> Any:
    """Return a different value of the same kind: what an editor would slip in."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 0.25
    if isinstance(value, str):
        if value.startswith("0x") and len(value) > 2:
            last = value[-1]
            return value[:-1] + ("1" if last != "1" else "2")
        return value + "~"
    return 1  # None


def _drop(key: str | int) -> Callable[[Any], Any]:
    def drop(container: Any) -> Any:
        container = container.copy()
        del container[key]
        return container

    return drop


def _edit_json(
    name: str, where: tuple[str | int, ...], change: Callable[[Any], Any] | None
) -> Apply:
    """Edit the value at ``where`` (``change`` None deletes its key)."""

    def apply(run_dir: Path, _: Path) -> None:
        path = run_dir / name
        document = json.loads(path.read_text())
        parent = document
        for part in where[:-1]:
            parent = parent[part]
        if change is None:
            del parent[where[-1]]
        else:
            parent[where[-1]] = change(parent[where[-1]])
        path.write_text(json.dumps(document, indent=2))

    return apply


def _journal_mutations(name: str, lines: list[str]) -> Iterator[Mutation]:
    for index, line in enumerate(lines):
        entry = json.loads(line)
        for key, value in entry.items():
            yield Mutation(
                name,
                f"entry {index}/{key}",
                f"edited {value!r:.30}",
                _edit_line(name, index, key),
                None,
            )
        yield Mutation(
            name,
            f"entry {index}",
            "deleted",
            _lines(name, lambda ls, i=index: ls[:i] + ls[i + 1 :]),
        )
        yield Mutation(
            name,
            f"entry {index}",
            "duplicated",
            _lines(name, lambda ls, i=index: ls[: i + 1] + ls[i:]),
        )
        if index + 1 < len(lines):
            swap = lambda ls, i=index: ls[:i] + [ls[i + 1], ls[i]] + ls[i + 2 :]  # noqa: E731
            yield Mutation(name, f"entry {index}", "swapped with the next", _lines(name, swap))


def _edit_line(name: str, index: int, key: str) -> Apply:
    def apply(run_dir: Path, _: Path) -> None:
        path = run_dir / name
        lines = path.read_text().splitlines()
        entry = json.loads(lines[index])
        value = entry[key]
        if key == "raw" and isinstance(value, str):  # a byte in the middle of the input
            middle = len(value) // 2
            value = value[:middle] + ("0" if value[middle] != "0" else "1") + value[middle + 1 :]
        else:
            value = _changed(value)
        entry[key] = value
        lines[index] = json.dumps(entry)
        path.write_text("\n".join(lines) + "\n")

    return apply


def _lines(name: str, edit: Callable[[list[str]], list[str]]) -> Apply:
    def apply(run_dir: Path, _: Path) -> None:
        path = run_dir / name
        path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")

    return apply


def _model_mutations(name: str, round_number: int | None) -> Iterator[Mutation]:
    def flip(run_dir: Path, _: Path) -> None:
        data = bytearray((run_dir / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (run_dir / name).write_bytes(bytes(data))

    def truncate(run_dir: Path, _: Path) -> None:
        data = (run_dir / name).read_bytes()
        (run_dir / name).write_bytes(data[: len(data) // 2])

    def replace(run_dir: Path, _: Path) -> None:
        other = next(
            p for p in sorted((run_dir / "models").glob("*.npz")) if p.name != Path(name).name
        )
        shutil.copyfile(other, run_dir / name)

    yield Mutation(name, "bytes", "one bit flipped", flip, round_number)
    yield Mutation(name, "bytes", "truncated", truncate, round_number)
    yield Mutation(name, "bytes", "replaced by another model", replace, round_number)


def _file_mutations(name: str, round_number: int | None) -> Iterator[Mutation]:
    def delete(run_dir: Path, _: Path) -> None:
        (run_dir / name).unlink()

    def rename(run_dir: Path, _: Path) -> None:
        (run_dir / name).rename(run_dir / f"{name}.orig")

    yield Mutation(name, "file", "deleted", delete, round_number)
    yield Mutation(name, "file", "renamed", rename, round_number)
    yield Mutation(name, "file", "linked outside", _link_outside(name), round_number)


def _link_outside(name: str) -> Apply:
    """Replace ``name`` by a symbolic link to the pristine copy outside the run."""

    def apply(run_dir: Path, outside: Path) -> None:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
        target.symlink_to(outside / name)

    return apply


def _extra_files(run_dir: Path, manifest: ChainManifest) -> list[Mutation]:
    def add(name: str, source: str | None) -> Apply:
        def apply(run: Path, _: Path) -> None:
            data = (run / source).read_bytes() if source else b"a note\n"
            (run / name).write_bytes(data)

        return apply

    genesis = f"models/{manifest.genesis_hash.hex()}.npz"
    statement = str(next((run_dir / "models").glob("*.json")).relative_to(run_dir))
    return [
        Mutation("notes.txt", "file", "added", add("notes.txt", None)),
        Mutation(
            f"models/{'0' * 64}.npz",
            "file",
            "added (a model copy)",
            add(f"models/{'0' * 64}.npz", genesis),
        ),
        Mutation(
            f"models/{'1' * 64}.json",
            "file",
            "added (a statement copy)",
            add(f"models/{'1' * 64}.json", statement),
        ),
    ]
