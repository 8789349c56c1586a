"""Flower messages built in process, as a running federation would deliver them.

Outside a run, Flower has no SuperLink to stamp message metadata, so the bench (and the
unit tests, through ``tests/flower_messages.py``) build it here.
"""

from __future__ import annotations

import time

from flwr.app.metadata import Metadata


def reply_metadata(src_node_id: int, message_type: str = "train") -> Metadata:
    """Return the metadata of a reply from node ``src_node_id`` to the ServerApp."""
    return Metadata(
        run_id=1,
        message_id=f"msg-{src_node_id}-{time.monotonic_ns()}",
        src_node_id=src_node_id,
        dst_node_id=0,
        reply_to_message_id="ins",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=message_type,
    )
