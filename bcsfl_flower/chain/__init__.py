"""On-chain audit trail of a BCS-FL run.

One module per concern; import from them directly (this package imports nothing
eagerly, so client processes that only need keys do not load web3's contract stack):

- :mod:`~bcsfl_flower.chain.backends`: :func:`connect` to the ``embedded`` chain,
  a spawned ``anvil``, or an ``http(s)://`` URL;
- :mod:`~bcsfl_flower.chain.audit`: :class:`AuditTrail` (deploy/attach, register,
  anchor, record rollbacks, read back) and ``chain.json`` (:class:`ChainManifest`);
- :mod:`~bcsfl_flower.chain.head`: :class:`TrailHead`, a checkpoint `verify --head` checks;
- :mod:`~bcsfl_flower.chain.certificates`: :class:`AnchorCertificate` (the miners'
  quorum certificate) and the anchored and rolled-back rounds read back;
- :mod:`~bcsfl_flower.chain.retry`: :class:`RetryPolicy` and the backoff loop shared
  by reads and transactions;
- :mod:`~bcsfl_flower.chain.model_store`: the content-addressed store of global models;
- :mod:`~bcsfl_flower.chain.keys`: development keys (simulation only) and keystores;
- :mod:`~bcsfl_flower.chain.compiler`: rebuilds the committed ``BCSFLAudit.json``;
- :mod:`~bcsfl_flower.chain.errors`: ``ChainUnavailableError``, ``ChainRejectedError``.
"""
