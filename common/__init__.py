"""What the broker, ping_client and echo_client share: topics, port, exit codes, the reconnect loop.

Importing this package has no side effects.
"""

from common.constants import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    PING_TOPIC,
    PONG_TOPIC,
    RECONNECT_INTERVAL,
)

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "PING_TOPIC", "PONG_TOPIC", "RECONNECT_INTERVAL"]
