"""A Grid that collects replies as soon as they arrive.

Flower's ``Grid.send_and_receive`` pushes the messages and then pulls replies every
3 seconds. A FedAvg round exchanges messages once, so that costs it up to 3 s; a
BCSFL round exchanges them twice (training, then the committee: validators' scores
and miners' approvals), and the committee answers in well under a second. With a
fixed 3 s poll, about half of a 20-client MNIST round on a CPU was spent waiting.

:class:`PromptGrid` wraps any :class:`~flwr.serverapp.Grid` and keeps everything
but ``send_and_receive``, which polls with an interval that starts short, backs off
geometrically to a ceiling while nothing arrives, and starts short again whenever a
reply does (clients answer one after another, so the next reply is near). Quick
replies are collected within tens of milliseconds, and a long training round is
polled no more often than once per ``max_interval`` (1 s), a load a SuperLink does not
notice.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

if TYPE_CHECKING:  # Grid's own signatures name it; pinned by tests/test_flower_internals.py
    from flwr.supercore.run import Run


class PromptGrid(Grid):
    """Delegate to ``grid``, but poll for replies with a short, growing interval.

    Parameters
    ----------
    grid : Grid
        The Grid Flower handed to the ServerApp.
    min_interval : float (default: 0.05)
        First pause between two pulls, in seconds (> 0).
    max_interval : float (default: 1.0)
        Longest pause between two pulls (Flower's own fixed interval is 3 s).
    backoff : float (default: 1.5)
        Factor by which the pause grows after every pull that brings no reply
        (>= 1); a pull that brings one resets it to ``min_interval``.
    """

    def __init__(
        self,
        grid: Grid,
        *,
        min_interval: float = 0.05,
        max_interval: float = 1.0,
        backoff: float = 1.5,
    ) -> None:
        if not 0 < min_interval <= max_interval:
            raise ValueError(
                f"need 0 < min_interval <= max_interval, got {min_interval}, {max_interval}"
            )
        if backoff < 1:
            raise ValueError(f"backoff must be >= 1, got {backoff}")
        self.grid = grid
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.backoff = backoff

    def set_run(self, run: Run) -> None:
        """Set the run on the wrapped grid."""
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        """Run information of the wrapped grid."""
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create a message with the wrapped grid."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Return the node ids of the wrapped grid."""
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push messages through the wrapped grid."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull replies through the wrapped grid."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages`` and pull their replies until all arrived or ``timeout``.

        The same contract as Flower's ``send_and_receive``: replies that have not
        arrived when ``timeout`` seconds have passed are missing from the result (no
        exception), and ``timeout=None`` waits for every reply.
        """
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = self.min_interval
        replies: list[Message] = []
        while True:
            arrived = list(self.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
            if not pending:
                return replies
            if arrived:  # replies trickle in one client after another: the next is near
                interval = self.min_interval
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return replies
                interval = min(interval, left)
            time.sleep(interval)
            interval = min(interval * self.backoff, self.max_interval)
