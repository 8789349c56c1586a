"""Build Flower reply Messages in unit tests, outside a running federation."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.message import make_message
from flwr.app.metadata import Metadata


def metadata(src_node_id: int, message_type: str = "train") -> Metadata:
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


def train_reply(
    node_id: int,
    arrays: dict[str, np.ndarray] | ArrayRecord,
    num_examples: object = 10,
    **metrics: float,
) -> Message:
    record = (
        arrays
        if isinstance(arrays, ArrayRecord)
        else ArrayRecord({key: Array(np.asarray(value)) for key, value in arrays.items()})
    )
    content = RecordDict(
        {"arrays": record, "metrics": MetricRecord({"num-examples": num_examples, **metrics})}
    )
    return make_message(metadata=metadata(node_id), content=content)


def error_reply(node_id: int, reason: str) -> Message:
    return make_message(metadata=metadata(node_id), error=Error(code=1, reason=reason))
