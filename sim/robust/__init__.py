"""The fast decision-quality bench: robust aggregation on real MNIST, in process.

``python -m sim.robust_bench`` runs it; see ``sim/README.md``.
"""
