"""What a client's conversation (:mod:`broker.client`) uses of its connection.

A connection over TCP and one over WebSockets offer the same: :class:`broker.connection.Connection`
is both, the WebSocket one writing through a tunnel. The client does no I/O of its own.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Protocol


class Wire(Protocol):
    """What a client's handlers use of its connection."""

    peer: str
    peer_address: tuple[str, int]
    identity: str | None
    """The common name of the client's TLS certificate, when it stands for the user name."""

    def send(self, data: bytes) -> None:
        """Write ``data`` (gathered until the end of the callback)."""

    def send_qos0(self, frame: bytes) -> None:
        """Write a QoS 0 PUBLISH, or drop it when the client lags too far behind."""

    def flush(self) -> None:
        """Write what was gathered."""

    def start(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        """Run ``coro`` before any later packet of this connection is handled."""

    def watch(self, keep_alive: int) -> None:
        """Close the connection when the client is silent for too long [MQTT-3.1.2-24]."""

    def close(self) -> None:
        """Write what is gathered, then close the socket."""

    def abort(self) -> None:
        """Close the socket now, dropping anything unsent."""


class Gone:
    """The wire of a client whose connection was lost: nothing more is written or run.

    The connection puts it in place as it ends, so that it and its client do not hold each
    other: freed at once, not left in a cycle for the garbage collector (tests/test_garbage.py).
    """

    def __init__(self, peer: str, peer_address: tuple[str, int], identity: str | None) -> None:
        """Keep what log lines may still say of the connection."""
        self.peer, self.peer_address, self.identity = peer, peer_address, identity

    def send(self, data: bytes) -> None:
        """Drop ``data``."""

    def send_qos0(self, frame: bytes) -> None:
        """Drop ``frame``."""

    def flush(self) -> None:
        """Nothing is gathered."""

    def start(self, coro: Coroutine[Any, Any, None], what: str) -> None:  # noqa: ARG002
        """Do not run ``coro``."""
        coro.close()

    def watch(self, keep_alive: int) -> None:
        """Nothing to watch."""

    def close(self) -> None:
        """Already closed."""

    def abort(self) -> None:
        """Already closed."""
