"""Privacy for BCS-FL: client-side DP-SGD (Opacus) and CKKS aggregation (TenSEAL).

- :mod:`~bcsfl_flower.privacy.dp`: DP-SGD for any training loop, with an epsilon that
  accumulates across Flower rounds.
- :mod:`~bcsfl_flower.privacy.ckks_keys`: CKKS parameters, the clients' secret context
  and the server's public one.
- :mod:`~bcsfl_flower.privacy.ckks`: encrypted models, their weighted aggregation on
  ciphertexts, transport in an ``ArrayRecord`` and the digest to anchor.
- :mod:`~bcsfl_flower.privacy.encrypted_screening`: the Gram matrix of encrypted
  updates, so screening decrypts only inner products.
"""

import importlib

_MODULES = {
    "dp": (
        "AccountantState",
        "DPConfig",
        "PrivateTraining",
        "check_opacus_compatible",
        "epsilon_from_state",
        "load_accountant_state",
        "make_private",
        "save_accountant_state",
    ),
    "ckks": (
        "ENCRYPTED_ARRAY_KEY",
        "ArraySpec",
        "EncryptedModel",
        "add",
        "add_plain",
        "array_specs",
        "ciphertext_digest",
        "decrypt_arrays",
        "encrypt_arrays",
        "from_array_record",
        "is_encrypted_record",
        "to_array_record",
        "weighted_mean",
        "weighted_sum",
    ),
    "ckks_keys": (
        "CKKSParams",
        "create_secret_context",
        "load_context",
        "load_public_context",
        "load_secret_context",
        "public_context",
        "save_secret_context",
        "slot_count",
    ),
    "encrypted_screening": ("EncryptedGram", "decrypt_gram", "encrypted_gram", "gram_to_cosine"),
}
_MODULE_OF = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> object:
    """Import a name's module on first use.

    Both halves are optional extras (``dp``: PyTorch and Opacus; ``ckks``: TenSEAL), so
    importing this package imports neither; a name whose extra is missing raises
    :class:`~bcsfl_flower.extras.MissingExtraError` naming the extra. Opacus also
    configures the root logger when imported (``logging.basicConfig`` in
    ``opacus.utils.module_utils``), which would double every Flower log line of a
    process that never trains with DP.
    """
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "ENCRYPTED_ARRAY_KEY",
    "AccountantState",
    "ArraySpec",
    "CKKSParams",
    "DPConfig",
    "EncryptedGram",
    "EncryptedModel",
    "PrivateTraining",
    "add",
    "add_plain",
    "array_specs",
    "check_opacus_compatible",
    "ciphertext_digest",
    "create_secret_context",
    "decrypt_arrays",
    "decrypt_gram",
    "encrypt_arrays",
    "encrypted_gram",
    "epsilon_from_state",
    "from_array_record",
    "gram_to_cosine",
    "is_encrypted_record",
    "load_accountant_state",
    "load_context",
    "load_public_context",
    "load_secret_context",
    "make_private",
    "public_context",
    "save_accountant_state",
    "save_secret_context",
    "slot_count",
    "to_array_record",
    "weighted_mean",
    "weighted_sum",
]
