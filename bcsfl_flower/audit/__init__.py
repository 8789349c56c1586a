"""Auditing a run: what anyone holding its output directory can check or recompute.

The audit tools sit above the round and reuse its pure functions, so an audit decides
a round exactly as the round did:

- :mod:`~bcsfl_flower.audit.verification`: :func:`verify_trail` checks every anchored
  round (certificates, committees, the decision the ballots make, the stored models);
- :mod:`~bcsfl_flower.audit.replay`: :func:`replay_round` recomputes one round from
  its stored packets and statement;
- :mod:`~bcsfl_flower.audit.run_results`: ``results.json`` cross-checked against the
  trail;
- :mod:`~bcsfl_flower.audit.checkpoint`: what a stopped run resumes from.
"""
