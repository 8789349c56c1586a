#!/usr/bin/env bash
# Install everything bcsfl-flower needs into ./.venv and ./node_modules, and put the
# offline MNIST files in ./data. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# constraints.txt pins the torch/torchvision pair that installs quickly here.
# --no-compile: pip would byte-compile every module of every package (PyTorch alone has
# thousands), which took half of this script's time here; Python compiles only the
# modules a run imports, once, on first import.
# The plugin (with its dev tools) and the example app (examples/pytorch-vision, which
# depends on the plugin), both editable.
.venv/bin/python -m pip install --quiet --no-compile -c constraints.txt \
  -e ".[dev]" -e ./examples/pytorch-vision
# byzfl (attacks and robust aggregators for the bench, sim/robust_bench.py): its declared
# dependencies are the ones pinned above, so --no-deps keeps this environment's pins.
.venv/bin/python -m pip install --quiet --no-compile --no-deps "byzfl==0.0.11"

# Dev-chain tools: anvil (local Ethereum node), solcjs (offline Solidity compiler) and
# OpenZeppelin Contracts, and playwright-core for the browser tests, exactly as the
# committed lock file pins them (it lists every platform's optional anvil binary, so
# `npm ci` accepts it and changes nothing); install scripts are not needed (see FACTS.md).
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error

# Debian's Chromium, which the explorer page's browser tests (tests/test_explorer.py)
# drive headless through playwright-core (installed above from the lock file).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
      >/dev/null
  else
    echo "setup: /usr/bin/chromium is missing: install Debian's chromium (as root) for" \
      "the browser tests" >&2
  fi
fi

# MNIST: copy the official files from ../shared/data when present (never write there).
if [ ! -f data/MNIST/raw/train-images-idx3-ubyte.gz ] && [ -d ../shared/data/MNIST/raw ]; then
  mkdir -p data/MNIST/raw
  cp ../shared/data/MNIST/raw/*.gz data/MNIST/raw/
fi
echo "setup: done (python: .venv, node tools: node_modules, data: $(pwd)/data)"
