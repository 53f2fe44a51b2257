"""The amqtt plugin the broker loads for anonymous access (FileAuthPlugin, with a password file).

amqtt's default plugin set logs every packet and event and publishes $SYS topics; each costs time
per message. The connection layer logs connects and disconnects itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session


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
