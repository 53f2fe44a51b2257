"""amqtt plugins the broker loads: anonymous access and connection logging.

amqtt's default plugin set logs every packet and event and publishes $SYS topics; each costs time
per message. We load only these two.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from amqtt.plugins.base import BaseAuthPlugin, BasePlugin
from amqtt.session import Session

logger = logging.getLogger(__name__)


class AllowAnonymous(BaseAuthPlugin):
    """Accept every client, with or without a user name.

    Unlike amqtt's AnonymousAuthPlugin it does not mark the session anonymous: amqtt discards
    anonymous sessions on disconnect, which would break clean-session=0 clients.
    """

    @dataclass
    class Config:
        """No options."""

    async def authenticate(self, *, session: Session) -> bool:  # noqa: ARG002 - amqtt's signature
        """Accept the client."""
        return True


class ConnectionLog(BasePlugin[Any]):
    """Log each client's connect and disconnect, with its client id and address."""

    @dataclass
    class Config:
        """No options."""

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        """Log a client that completed CONNECT."""
        logger.info(
            "Client %s connected from %s:%s.",
            client_id,
            client_session.remote_address,
            client_session.remote_port,
        )

    async def on_broker_client_disconnected(
        self, *, client_id: str, client_session: Session
    ) -> None:
        """Log a client that went away, cleanly or not."""
        logger.info(
            "Client %s disconnected from %s:%s.",
            client_id,
            client_session.remote_address,
            client_session.remote_port,
        )
