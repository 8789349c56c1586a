"""Privacy for BCS-FL: client-side DP-SGD (Opacus) and CKKS aggregation (TenSEAL)."""

from bcsfl_flower.privacy.dp import (
    AccountantState,
    DPConfig,
    PrivateTraining,
    check_opacus_compatible,
    epsilon_from_state,
    load_accountant_state,
    make_private,
    save_accountant_state,
)

__all__ = [
    "AccountantState",
    "DPConfig",
    "PrivateTraining",
    "check_opacus_compatible",
    "epsilon_from_state",
    "load_accountant_state",
    "make_private",
    "save_accountant_state",
]
