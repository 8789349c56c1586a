"""Local processes the package starts: free loopback ports, and stopping a process tree by pid.

The launcher (a SuperLink and everything it spawns), the anvil backend and the
deployment test all start servers on 127.0.0.1 and must leave nothing behind.
"""

from __future__ import annotations

import contextlib
import socket

import psutil

STOP_GRACE_S = 10.0
"""Seconds a process gets to exit after SIGTERM before it is killed."""


def free_port() -> int:
    """Return a loopback TCP port that is free now (the caller binds it right away)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_in_use(port: int) -> bool:
    """Return whether something accepts connections on loopback ``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def terminate_tree(process: psutil.Process) -> None:
    """Stop ``process`` and every process it spawned: SIGTERM, then SIGKILL after a grace.

    Children are collected first, so a parent that dies first does not orphan them.
    """
    try:
        family = [*process.children(recursive=True), process]
    except psutil.NoSuchProcess:
        return
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(family, timeout=STOP_GRACE_S)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
