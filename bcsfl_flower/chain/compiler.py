"""Compile ``contracts/BCSFLAudit.sol`` into the artifact shipped with the package.

The Flower app bundle carries only ``*.py`` and ``*.json`` (among others), and the
ServerApp may run where no Solidity compiler exists, so the ABI and bytecode are
committed as ``bcsfl_flower/chain/BCSFLAudit.json`` and loaded from there at run time
(:func:`load_artifact`). This module rebuilds that file, and a test rebuilds it to
check that it is not stale.

Compilation uses Solidity's standard-JSON interface with the metadata hash switched off
(``appendCBOR: false``), so the bytecode depends only on the source, the compiler
version and the settings: two builds are byte-identical. The compiler is, in order of
preference:

1. a native ``solc`` of exactly :data:`SOLC_VERSION`, through py-solc-x
   (``solcx.compile_standard``), found in py-solc-x's install folder or on ``PATH``;
2. npm's ``solc`` package (solcjs, the same compiler built to WebAssembly) run with
   ``node``, fed the standard JSON on stdin. py-solc-x cannot download compilers
   without internet; solcjs is installed offline from the npm registry
   (``npm install`` in the repository root).

Regenerate the artifact with ``python -m bcsfl_flower.chain.compiler``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from logging import INFO
from pathlib import Path
from typing import Any, cast

from flwr.common.logger import log

CONTRACT_NAME = "BCSFLAudit"
"""Name of the contract in the source file."""

SOLC_VERSION = "0.8.30"
"""Exact compiler version; the npm ``solc`` dependency is pinned to the same version."""

EVM_VERSION = "cancun"
"""Target EVM; anvil and py-evm both run it."""

SOURCE_NAME = "contracts/BCSFLAudit.sol"
"""Source unit name, relative to the repository root."""

ARTIFACT_PATH = Path(__file__).with_name(f"{CONTRACT_NAME}.json")
"""The committed artifact."""

SOLCJS_ENV = "BCSFL_SOLCJS"
"""Environment variable naming the npm ``solc`` package directory, if not found nearby."""

SETTINGS: dict[str, Any] = {
    # The IR pipeline with a high runs count trims ~4k gas off an anchor (measured).
    "viaIR": True,
    "optimizer": {"enabled": True, "runs": 10000},
    "evmVersion": EVM_VERSION,
    "metadata": {"appendCBOR": False, "bytecodeHash": "none"},
    "outputSelection": {
        "*": {CONTRACT_NAME: ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}
    },
}
"""Standard-JSON settings; part of the artifact so a rebuild uses the same ones."""

OPENZEPPELIN_PACKAGE = "@openzeppelin/contracts"
"""npm package of OpenZeppelin Contracts, which the contract imports (ECDSA, EIP712)."""

# solcjs resolves imports through a callback: `@openzeppelin/...` is read from the
# node_modules folder given as the second argument, nothing else is readable.
_SOLCJS_SCRIPT = (
    "const fs = require('fs'); const path = require('path');"
    "const solc = require(process.argv[1]); const modules = process.argv[2];"
    "function findImports(name) {"
    "  if (!name.startsWith('@openzeppelin/')) return {error: 'import not allowed: ' + name};"
    "  try { return {contents: fs.readFileSync(path.join(modules, name), 'utf8')}; }"
    "  catch (err) { return {error: 'not found: ' + name}; }"
    "}"
    "let input = '';"
    "process.stdin.setEncoding('utf8');"
    "process.stdin.on('data', (chunk) => { input += chunk; });"
    "process.stdin.on('end', () => {"
    "  const output = solc.compile(input, {import: findImports});"
    "  process.stdout.write(JSON.stringify({version: solc.version(),"
    "                                       output: JSON.parse(output)}));"
    "});"
)


class CompilerNotFoundError(RuntimeError):
    """Neither a native solc of the pinned version nor npm's solcjs is available."""


class CompilationError(RuntimeError):
    """The compiler reported errors."""


def repository_root() -> Path:
    """Return the repository root of this checkout (the parent of ``bcsfl_flower``)."""
    return Path(__file__).resolve().parents[2]


def source_path() -> Path:
    """Return the path of ``contracts/BCSFLAudit.sol`` in this checkout."""
    return repository_root() / SOURCE_NAME


def standard_input(source: str) -> dict[str, Any]:
    """Return the standard-JSON compiler input for the contract's source text."""
    return {
        "language": "Solidity",
        "sources": {SOURCE_NAME: {"content": source}},
        "settings": SETTINGS,
    }


def compile_contract(source: Path | None = None) -> dict[str, Any]:
    """Compile the contract and return the artifact (what :func:`load_artifact` returns).

    Parameters
    ----------
    source : Path, optional
        The ``.sol`` file; defaults to this checkout's ``contracts/BCSFLAudit.sol``.

    Returns
    -------
    dict
        ``contractName``, ``sourceName``, ``compiler`` (``version`` without the platform
        suffix, and ``settings``), ``abi``, ``bytecode`` and ``deployedBytecode``
        (``0x``-prefixed hex).

    Raises
    ------
    FileNotFoundError
        If the source file does not exist (an installed wheel ships no ``contracts/``).
    CompilerNotFoundError
        If no compiler of the pinned version is available.
    CompilationError
        If the compiler reports an error.
    """
    path = source if source is not None else source_path()
    if not path.is_file():
        raise FileNotFoundError(f"Solidity source {path} does not exist")
    compiler_input = standard_input(path.read_text(encoding="utf-8"))
    native = _native_solc()
    if native is not None:
        version, output = _compile_native(native, compiler_input)
    else:
        version, output = _compile_solcjs(compiler_input)
    errors = [e for e in output.get("errors", []) if e.get("severity") == "error"]
    if errors:
        messages = "\n".join(e.get("formattedMessage", e.get("message", "")) for e in errors)
        raise CompilationError(f"solc {version} failed to compile {path}:\n{messages}")
    contract = output["contracts"][SOURCE_NAME][CONTRACT_NAME]
    return {
        "contractName": CONTRACT_NAME,
        "sourceName": SOURCE_NAME,
        "compiler": {"version": _base_version(version), "settings": SETTINGS},
        "abi": contract["abi"],
        "bytecode": "0x" + contract["evm"]["bytecode"]["object"],
        "deployedBytecode": "0x" + contract["evm"]["deployedBytecode"]["object"],
    }


def load_artifact(path: Path = ARTIFACT_PATH) -> dict[str, Any]:
    """Load the committed artifact (ABI and bytecode).

    Raises
    ------
    FileNotFoundError
        If the artifact is missing; rebuild it with ``python -m bcsfl_flower.chain.compiler``.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"contract artifact {path} is missing; run `python -m bcsfl_flower.chain.compiler`"
        )
    return cast("dict[str, Any]", json.loads(path.read_text(encoding="utf-8")))


def write_artifact(artifact: dict[str, Any], path: Path = ARTIFACT_PATH) -> None:
    """Write ``artifact`` as stable, diff-friendly JSON."""
    path.write_text(json.dumps(artifact, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def find_solcjs() -> Path:
    """Return the directory of npm's ``solc`` package.

    Looks at ``$BCSFL_SOLCJS``, then ``node_modules/solc`` in the current directory, this
    checkout's root, and their parents.

    Raises
    ------
    CompilerNotFoundError
        If it is not found.
    """
    env = os.environ.get(SOLCJS_ENV)
    return find_node_package("solc", [Path(env)] if env else [])


def find_node_package(name: str, preferred: list[Path] | None = None) -> Path:
    """Return the directory of the npm package ``name`` (``preferred`` places first).

    Looks in ``node_modules`` of the current directory, this checkout's root, and their
    parents.

    Raises
    ------
    CompilerNotFoundError
        If it is not found.
    """
    candidates = list(preferred or [])
    for start in (Path.cwd(), repository_root()):
        candidates.extend(base / "node_modules" / name for base in (start, *start.parents))
    for candidate in candidates:
        if (candidate / "package.json").is_file():
            return candidate
    raise CompilerNotFoundError(
        f"npm package {name} not found; run `npm install` in the repository root"
    )


def node_modules() -> Path:
    """Return the ``node_modules`` folder that holds OpenZeppelin Contracts."""
    package = find_node_package(OPENZEPPELIN_PACKAGE)
    return package.parents[1]


def _native_solc() -> Path | None:
    try:
        from solcx.exceptions import SolcNotInstalled
        from solcx.install import get_executable
        from solcx.wrapper import get_solc_version
    except ImportError:  # pragma: no cover - py-solc-x is a dependency
        return None
    try:
        return Path(get_executable(SOLC_VERSION))
    except SolcNotInstalled:
        pass
    on_path = shutil.which("solc")
    if on_path is None:
        return None
    try:
        found = get_solc_version(Path(on_path))
    except Exception:  # any broken binary simply is not used
        return None
    return Path(on_path) if str(found) == SOLC_VERSION else None


def _compile_native(solc: Path, compiler_input: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    import solcx
    from solcx.exceptions import SolcError
    from solcx.wrapper import get_solc_version

    version = str(get_solc_version(solc, with_commit_hash=True))
    log(INFO, "Compiling %s with native solc %s (%s)", CONTRACT_NAME, version, solc)
    try:
        modules = node_modules()
        output = solcx.compile_standard(
            compiler_input, base_path=modules, allow_paths=[modules], solc_binary=solc
        )
    except SolcError as err:
        raise CompilationError(str(err)) from err
    return version, output


def _compile_solcjs(compiler_input: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    node = shutil.which("node")
    if node is None:
        raise CompilerNotFoundError(
            f"no native solc {SOLC_VERSION} found and `node` is not on PATH to run solcjs"
        )
    package = find_solcjs()
    log(INFO, "Compiling %s with solcjs from %s", CONTRACT_NAME, package)
    completed = subprocess.run(
        [node, "-e", _SOLCJS_SCRIPT, str(package), str(node_modules())],
        input=json.dumps(compiler_input),
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise CompilationError(f"solcjs exited with {completed.returncode}: {completed.stderr}")
    result = json.loads(completed.stdout)
    version = result["version"]
    if version.split("+", 1)[0] != SOLC_VERSION:
        raise CompilerNotFoundError(
            f"solcjs at {package} is version {version}, but {SOLC_VERSION} is pinned"
        )
    return version, result["output"]


def _base_version(version: str) -> str:
    """Strip the platform suffix: ``0.8.30+commit.73712a01.Emscripten.clang`` -> ``...a01``."""
    parts = version.split("+", 1)
    if len(parts) == 1:
        return version
    commit = parts[1].split(".")
    return f"{parts[0]}+{commit[0]}.{commit[1]}" if len(commit) >= 2 else version


def main() -> None:
    """Rebuild the committed artifact from the Solidity source."""
    artifact = compile_contract()
    write_artifact(artifact)
    print(f"wrote {ARTIFACT_PATH} (solc {artifact['compiler']['version']})")


if __name__ == "__main__":
    main()
