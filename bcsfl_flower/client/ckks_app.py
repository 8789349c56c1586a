"""The ClientApp with the bcsfl mod and, on demand, the CKKS mod.

:func:`bcsfl_ckks_client_app` is what the example app uses in place of ``ClientApp()``.
The CKKS mod (:mod:`bcsfl_flower.client.ckks_mod`) needs TenSEAL, which only the
``ckks`` extra installs, so it is imported on the first message that is CKKS work (a
train or evaluate message flagged ``bcsfl-ckks``, or one of the two CKKS queries). A
node without TenSEAL then runs plaintext federations as usual and answers CKKS work
with an error naming the extra to install.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from bcsfl_flower.client.mod import bcsfl_client_app
from bcsfl_flower.protocol import (
    GRAM_ACTION,
    GRAM_MESSAGE_TYPE,
    PUBLIC_ACTION,
    is_ckks_work,
)


def ckks_on_demand(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the CKKS mod for CKKS work, importing it (and TenSEAL) only then."""
    if not is_ckks_work(msg):
        return call_next(msg, context)
    from bcsfl_flower.client.ckks_mod import ckks_mod

    return ckks_mod(msg, context, call_next)


def ckks_query(msg: Message, context: Context) -> Message:
    """Answer a CKKS query (registered so Flower routes it; the mod answers first)."""
    from bcsfl_flower.client.ckks_mod import ckks_gram, ckks_public

    handler = ckks_gram if msg.metadata.message_type == GRAM_MESSAGE_TYPE else ckks_public
    return handler(msg, context)


def bcsfl_ckks_client_app(mods: Iterable[Mod] = (), **kwargs: Any) -> ClientApp:
    """Return a ClientApp with ``[bcsfl_mod, ckks_on_demand, *mods]`` and every duty.

    The Gram decryption and the public context query are registered, so Flower routes
    them to the mods; the committee duty arrives as ``evaluate``.

    Parameters
    ----------
    mods : Iterable[Mod], optional
        Further mods, applied inside the CKKS mod (they see plaintext models).
    **kwargs
        Passed to :class:`flwr.clientapp.ClientApp`.
    """
    app = bcsfl_client_app(mods=[ckks_on_demand, *mods], **kwargs)
    app.query(GRAM_ACTION)(ckks_query)
    app.query(PUBLIC_ACTION)(ckks_query)
    return app
