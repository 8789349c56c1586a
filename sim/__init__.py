"""Experiments and benchmarks of bcsfl-flower.

- :mod:`sim.experiments`: the robustness grid (strategies x attacks x attacker
  fractions) run as real Flower simulations, with CSV, Markdown and PNG outputs;
- :mod:`sim.consensus`: anchoring latency, throughput and gas vs committee size;
- ``sim/bench_anchor.py`` and ``sim/bench_ckks.py``: micro-benchmarks.
"""
