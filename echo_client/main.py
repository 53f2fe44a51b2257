"""The echo client: subscribe to the ping topic, republish each payload on the pong topic."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiomqtt

from common import cli, logs
from common.client import ClientSettings, add_client_options, client_settings, make_client
from common.constants import EXIT_OK
from common.lifecycle import CLIENT_SHUTDOWN_LIMIT, install_stop_handlers
from common.reconnect import Link
from common.show import show

logger = logging.getLogger("echo_client")

DEFAULT_MAX_PAYLOAD = 1024 * 1024


@dataclass(frozen=True, slots=True)
class EchoSettings:
    """Where to echo and what is too big to echo."""

    client: ClientSettings
    max_payload: int = DEFAULT_MAX_PAYLOAD


def parse(argv: Sequence[str] | None, environ: Mapping[str, str]) -> EchoSettings:
    """Parse flags, falling back to ``MQTT_*`` variables; exit 64 on a malformed value."""
    parser = cli.Parser(
        prog="echo_client",
        description="Republish every message on the ping topic, byte for byte, to the pong topic.",
    )
    add_client_options(parser, environ)
    cli.add_option(
        parser,
        environ,
        "--max-payload",
        convert=cli.positive_int,
        default=DEFAULT_MAX_PAYLOAD,
        help="payloads larger than this many bytes are logged and skipped",
    )
    args = parser.parse_args(argv)
    return EchoSettings(
        client=client_settings(parser, args, "echo_client", environ), max_payload=args.max_payload
    )


class Echo:
    """Counts what it echoes; one instance lives across reconnects."""

    def __init__(self, settings: EchoSettings) -> None:
        """Prepare to echo per ``settings``."""
        self.settings = settings
        self.echoed = 0
        self.bytes = 0
        self.skipped = 0

    async def session(self, client: aiomqtt.Client) -> None:
        """Echo until the link breaks (the Link has subscribed to the ping topic)."""
        ping, pong, qos = (
            self.settings.client.ping_topic,
            self.settings.client.pong_topic,
            self.settings.client.qos,
        )
        # QoS 1/2 echoes are not awaited one by one (that would wait a PUBACK per message);
        # they run as tasks kept here, and are cancelled when the link breaks.
        in_flight: set[asyncio.Task[None]] = set()
        try:
            async for message in client.messages:
                payload = message.payload if isinstance(message.payload, bytes) else b""
                if not message.topic.matches(ping):
                    # Never echo anything but ping traffic (a stale subscription, a retained
                    # message on another topic): that is how echo loops start.
                    logger.warning(
                        "Ignoring %s on %s: not the ping topic.", show(payload), message.topic.value
                    )
                    continue
                logger.info("Got %s on %s.", show(payload), message.topic.value)
                if len(payload) > self.settings.max_payload:
                    self.skipped += 1
                    logger.warning(
                        "Skipping %d-byte payload: over the %d-byte limit.",
                        len(payload),
                        self.settings.max_payload,
                    )
                    continue
                logger.info("Publishing %s on %s.", show(payload), pong)
                if qos == 0:
                    await self._publish(client, payload)
                else:
                    task = asyncio.create_task(self._publish(client, payload), name="echo-publish")
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
        finally:
            for task in in_flight:
                task.cancel()

    async def _publish(self, client: aiomqtt.Client, payload: bytes) -> None:
        await client.publish(self.settings.client.pong_topic, payload, qos=self.settings.client.qos)
        self.echoed += 1
        self.bytes += len(payload)


async def amain(settings: EchoSettings) -> int:
    """Echo until SIGTERM/SIGINT, then log a summary; return the exit status."""
    stop = asyncio.Event()
    install_stop_handlers(stop, hard_limit=CLIENT_SHUTDOWN_LIMIT)
    address = f"{settings.client.host}:{settings.client.port}"
    link = Link(
        make_client(settings.client),
        address=address,
        interval=settings.client.reconnect_interval,
        topics=[(settings.client.ping_topic, settings.client.qos)],
    )
    echo = Echo(settings)
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(link.run(echo.session), name="echo-link")
        await stop.wait()
        link.stop()
        runner.cancel()
    logger.info(
        "Echoed %d messages (%d bytes), skipped %d; disconnected %.3f s, %d reconnects.",
        echo.echoed,
        echo.bytes,
        echo.skipped,
        link.downtime(),
        link.reconnects,
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> None:
    """Run the echo client as a program: ``python -m echo_client --help``."""
    settings = parse(argv, os.environ)
    logs.configure("echo_client", settings.client.log_level)
    sys.exit(asyncio.run(amain(settings)))
